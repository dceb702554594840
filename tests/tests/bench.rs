//! `caisson bench launch`: the report's structure and sanity (counts, ordered percentiles, every
//! phase present, errors counted), for native and Wasm tasks. Never timings.
use caisson_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const NATIVE_PHASES: &[&str] = &[
    "rootfs",
    "launcher",
    "spawn",
    "cgroup",
    "namespaces",
    "cgroup_join",
    "mounts",
    "exec",
    "launch_to_exec",
    "exit",
    "launch_to_exit",
    "teardown",
    "total",
];
const WASM_PHASES: &[&str] = &["load", "setup", "instantiate", "run", "teardown", "total"];

fn guest(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guests")
        .join(name)
}

/// Runs `caisson bench launch ARGS --json`; returns (exit code, report).
fn bench(c: &Caisson, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["bench", "launch", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = c.run(&all);
    let report = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("bench {args:?}: not JSON ({e}): {out}{err}"));
    (code, report)
}

/// Checks counts and that every phase is there with n == ok and min<=p50<=p90<=p99<=max.
fn check(r: &Value, count: usize, ok: usize, phases: &[&str]) {
    assert_eq!(r["count"], count, "{r}");
    assert_eq!(r["ok"], ok, "{r}");
    assert_eq!(r["errors"], count - ok, "{r}");
    let codes: u64 = r["exit_codes"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        codes as usize, count,
        "every task has an exit code entry: {r}"
    );
    let got = r["phases"].as_array().unwrap();
    if ok == 0 {
        assert!(
            got.is_empty(),
            "no statistics without a successful task: {r}"
        );
        assert_eq!(r["throughput_per_second"], 0.0);
        return;
    }
    let names: Vec<&str> = got.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, phases);
    for p in got {
        assert_eq!(p["n"], ok, "{p}");
        let v = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("{k} in {p}"));
        let seq = [
            v("min_us"),
            v("p50_us"),
            v("p90_us"),
            v("p99_us"),
            v("max_us"),
        ];
        assert!(seq.windows(2).all(|w| w[0] <= w[1]), "unordered: {p}");
        assert!(seq[0] >= 0.0);
        assert!(seq[0] <= v("mean_us") && v("mean_us") <= seq[4], "{p}");
    }
    // The total covers each of its parts.
    let total = &got[got.len() - 1];
    for p in got {
        assert!(
            p["max_us"].as_f64() <= total["max_us"].as_f64(),
            "{p} vs {total}"
        );
    }
    assert!(r["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(r["throughput_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn wasm_report_counts_phases_and_errors() {
    let c = Caisson::new();
    let hello = guest("hello.wat");
    let (code, r) = bench(
        &c,
        &[
            "--kind",
            "wasm",
            "--module",
            hello.to_str().unwrap(),
            "--count",
            "40",
            "--concurrency",
            "2",
        ],
    );
    assert_eq!(code, 0, "{r}");
    check(&r, 40, 40, WASM_PHASES);
    assert_eq!(r["kind"], "wasm");
    assert_eq!(r["concurrency"], 2);
    assert_eq!(r["exit_codes"]["0"], 40);

    // A trapping guest: every task is an error, with its exit code and message.
    let trap = guest("trap.wat");
    let (code, r) = bench(
        &c,
        &[
            "--kind",
            "wasm",
            "--module",
            trap.to_str().unwrap(),
            "-n",
            "5",
            "--warmup",
            "0",
        ],
    );
    assert_eq!(code, 1, "errors make the exit code 1: {r}");
    check(&r, 5, 0, WASM_PHASES);
    assert_eq!(r["exit_codes"]["134"], 5, "{r}");
    assert!(!r["error_messages"].as_array().unwrap().is_empty());
}

#[test]
fn wasm_table_and_plot() {
    let c = Caisson::new();
    let svg = c.root.path().join("h.svg");
    let hello = guest("hello.wat");
    let out = c.ok(&[
        "bench",
        "launch",
        "--kind",
        "wasm",
        "--module",
        hello.to_str().unwrap(),
        "-n",
        "30",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(out.contains("30 ok, 0 errors"), "{out}");
    for p in WASM_PHASES {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{p} "))),
            "{p}: {out}"
        );
    }
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.contains("p99") && svg.contains("<rect"), "{svg}");
}

#[test]
fn bad_input_is_refused_clearly() {
    let c = Caisson::new();
    let (code, _, err) = c.run(&["bench", "launch", "--kind", "wasm"]);
    assert_eq!(code, 125, "usage error (podman's 125): {err}");
    assert!(err.contains("--module"), "{err}");
    let (code, _, err) = c.run(&["bench", "launch", "--kind", "native"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("--image"), "{err}");
    let missing = c.root.path().join("missing.wasm");
    let (code, _, err) = c.run(&[
        "bench",
        "launch",
        "--kind",
        "wasm",
        "--module",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("missing.wasm"), "{err}");
    let hello = guest("hello.wat");
    let (code, _, err) = c.run(&[
        "bench",
        "launch",
        "--kind",
        "wasm",
        "--module",
        hello.to_str().unwrap(),
        "--count",
        "0",
    ]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("--count"), "{err}");
}

fn mounts_under(p: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(p.to_str().unwrap()))
        .count()
}

#[test]
fn native_report_counts_phases_errors_and_leaves_nothing() {
    if !require_root() || !require_tool("umoci") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "latest").unwrap();
    let c = Caisson::new();
    c.ok(&["load", "-q", "-i", &format!("{}:latest", layout.display())]);
    let image = "localhost/oci:latest";

    let svg = c.root.path().join("native.svg");
    let (code, r) = bench(
        &c,
        &[
            "--kind",
            "native",
            "--image",
            image,
            "-n",
            "6",
            "-c",
            "2",
            "--warmup",
            "1",
            "--plot",
            svg.to_str().unwrap(),
            "--",
            "/bin/true",
        ],
    );
    assert_eq!(code, 0, "{r}");
    check(&r, 6, 6, NATIVE_PHASES);
    assert_eq!(r["kind"], "native");
    assert_eq!(r["target"], image);
    assert_eq!(r["command"], serde_json::json!(["/bin/true"]));
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    assert!(r.get("warm_sandboxes").is_none(), "cold by default: {r}");

    // Warm sandboxes: every task takes one, the report says so and how the pool was refilled.
    let (code, r) = bench(
        &c,
        &[
            "--kind",
            "native",
            "--image",
            image,
            "-n",
            "4",
            "--warmup",
            "0",
            "--warm-sandboxes",
            "1",
            "--",
            "/bin/true",
        ],
    );
    assert_eq!(code, 0, "{r}");
    check(&r, 4, 4, NATIVE_PHASES);
    assert_eq!(r["warm_sandboxes"]["pool"], 1, "{r}");
    assert_eq!(r["warm_sandboxes"]["tasks_in_sandboxes"], 4, "{r}");
    assert!(r["warm_sandboxes"]["refill"]
        .as_str()
        .unwrap()
        .contains("between launches"));

    // A task that writes gets a first_output phase (before exit): the time from its start to
    // its first byte, so after the 0.3 s it sleeps first, and within the task's total.
    let (code, r) = bench(
        &c,
        &[
            "--kind",
            "native",
            "--image",
            image,
            "-n",
            "3",
            "--warmup",
            "0",
            "--",
            "/bin/sh",
            "-c",
            "sleep 0.3; echo hi; sleep 0.1",
        ],
    );
    assert_eq!(code, 0, "{r}");
    let mut with_output = NATIVE_PHASES.to_vec();
    let exit = with_output.iter().position(|p| *p == "exit").unwrap();
    with_output.insert(exit, "first_output");
    check(&r, 3, 3, &with_output);
    let phase = |name: &str| {
        r["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone()
    };
    let (first, total) = (phase("first_output"), phase("total"));
    assert!(first["min_us"].as_f64().unwrap() >= 300_000.0, "{first}");
    assert!(
        first["max_us"].as_f64().unwrap() + 100_000.0 <= total["max_us"].as_f64().unwrap(),
        "the output came 0.1 s before the end: {first} vs {total}"
    );

    // Tasks that exit non-zero are counted as errors with their code; the image's command
    // runs when none is given (here `sh -c 'exit 3'` through the entrypoint-less image).
    let (code, r) = bench(
        &c,
        &[
            "--kind", "native", "--image", image, "-n", "3", "--warmup", "0", "--", "/bin/sh",
            "-c", "exit 3",
        ],
    );
    assert_eq!(code, 1, "{r}");
    check(&r, 3, 0, NATIVE_PHASES);
    assert_eq!(r["exit_codes"]["3"], 3, "{r}");
    // A command that does not exist fails the launch: counted, not fatal.
    let (code, r) = bench(
        &c,
        &[
            "--kind", "native", "--image", image, "-n", "2", "--warmup", "0", "--", "/nope",
        ],
    );
    assert_eq!(code, 1, "{r}");
    check(&r, 2, 0, NATIVE_PHASES);
    assert!(
        r["error_messages"][0].as_str().unwrap().contains("/nope"),
        "{r}"
    );

    // Nothing left behind: no containers, no mounts, no root filesystems.
    let ps: Value = serde_json::from_str(&c.ok(&["ps", "-a", "--json"])).unwrap();
    assert_eq!(ps, serde_json::json!([]), "containers left: {ps}");
    assert_eq!(mounts_under(c.root.path()), 0, "mounts left");
    let rootfs = std::fs::read_dir(c.root.path().join("rootfs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(rootfs, 0, "root filesystems left");
}
