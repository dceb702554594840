//! GPUs without GPUs: a fake `libnvidia-ml.so.1` built from tests/fake-nvml/fake_nvml.c
//! (tests/build.rs) is loaded through the real nvml-wrapper path (`--nvml-lib`); the GPUs' device
//! nodes (char 195:N) exist only in the tasks' /dev, where the device cgroup decides: an
//! allowed node without a driver opens with ENXIO, a denied one with EPERM.
use caisson_tests::*;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const FAKE_NVML: &str = env!("FAKE_NVML_LIB");
const ENXIO: &str = "No such device or address";
const EPERM: &str = "Operation not permitted";

fn uuid(i: u32) -> String {
    format!("GPU-fa4e0000-0000-0000-0000-{i:012}")
}

/// A caisson root whose commands see `n` fake GPUs.
struct Host {
    c: Caisson,
    n: u32,
    image: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Host {
    fn new(n: u32) -> Host {
        Host {
            c: Caisson::new(),
            n,
            image: String::new(),
            _tmp: None,
        }
    }

    /// With a busybox image loaded (needs root and umoci).
    fn with_image(n: u32) -> Option<Host> {
        if !require_root() || !require_tool("umoci") {
            return None;
        }
        let mut h = Host::new(n);
        let tmp = tempfile::Builder::new()
            .prefix("caisson-gpu")
            .tempdir()
            .unwrap();
        let layout = busybox_layout(tmp.path(), "gpu").unwrap();
        h.c.ok(&["load", "-i", &format!("{}:gpu", layout.display())]);
        h.image = "localhost/oci:gpu".into();
        h._tmp = Some(tmp);
        Some(h)
    }

    fn cmd(&self) -> Command {
        let mut c = self.c.cmd();
        c.env("CAISSON_NVML_LIB", FAKE_NVML)
            .env("FAKE_NVML_GPUS", self.n.to_string())
            .env_remove("CAISSON_GPUS")
            .env_remove("FAKE_NVML_INIT_FAIL");
        c
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        out3(self.cmd().args(args).output().unwrap())
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "caisson {args:?}: {out}{err}");
        out
    }

    fn gpus(&self) -> Vec<Value> {
        serde_json::from_str(&self.ok(&["gpus", "--json"])).unwrap()
    }

    /// Task id holding each GPU, by index.
    fn holders(&self) -> Vec<Option<String>> {
        self.gpus()
            .iter()
            .map(|g| g["task"].as_str().map(String::from))
            .collect()
    }

    fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v: Value = serde_json::from_str(&self.ok(&["inspect", id])).unwrap();
            if v[0]["state"]["status"] == want {
                return;
            }
            assert!(Instant::now() < deadline, "{id} never {want}: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn env_of(&self, id: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ok(&["inspect", id])).unwrap();
        v[0]["spec"]["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect()
    }
}

fn out3(o: Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn gpus_lists_the_fake_gpus_and_selections() {
    let h = Host::new(3);
    let gpus = h.gpus();
    assert_eq!(gpus.len(), 3, "{gpus:?}");
    for (i, g) in gpus.iter().enumerate() {
        let i = i as u32;
        assert_eq!(g["index"], i);
        assert_eq!(g["uuid"], uuid(i));
        assert_eq!(g["name"], format!("Fake NVIDIA GPU {i}"));
        assert_eq!(g["memory_bytes"], (u64::from(i) + 1) << 34);
        assert_eq!(g["minor"], i);
        assert_eq!(g["pci_bus_id"], format!("00000000:{i:02X}:00.0"));
        assert_eq!(g["task"], Value::Null);
    }
    let table = h.ok(&["gpus"]);
    assert!(table.starts_with("INDEX"), "{table}");
    assert!(
        table.contains(&uuid(2)) && table.contains("48 GiB"),
        "{table}"
    );

    // The selection of managed GPUs, by index and by UUID.
    let sel = |s: &str| -> Vec<u64> {
        let out = h.ok(&["--gpus", s, "gpus", "--json"]);
        let v: Vec<Value> = serde_json::from_str(&out).unwrap();
        v.iter().map(|g| g["index"].as_u64().unwrap()).collect()
    };
    assert_eq!(sel("2,0"), [0, 2]);
    assert_eq!(sel(&uuid(1)), [1]);
    assert!(sel("none").is_empty());
    let (code, _, err) = h.run(&["--gpus", "7", "gpus"]);
    assert_eq!(code, 125);
    assert!(err.contains("GPU \"7\" is not present"), "{err}");
    let (code, _, err) = h.run(&["--gpus", "first", "gpus"]);
    assert_eq!(code, 125);
    assert!(err.contains("invalid GPU selection"), "{err}");

    // Minor numbers come from NVML, not from the index.
    let out = h
        .cmd()
        .env("FAKE_NVML_MINOR_BASE", "4")
        .args(["gpus", "--json"])
        .output()
        .unwrap();
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[1]["minor"], 5);
}

/// `caisson-nvml` (what the static build of `scripts/build-dist.sh` lists GPUs with): the
/// inventory as JSON, loaded through the real nvml-wrapper path; no library: none, and why.
#[test]
fn nvml_helper_prints_the_inventory() {
    let helper = bin_dir().join("caisson-nvml");
    let run = |lib: &str| {
        let o = Command::new(&helper)
            .arg(lib)
            .env("FAKE_NVML_GPUS", "2")
            .env_remove("FAKE_NVML_INIT_FAIL")
            .output()
            .unwrap();
        let (code, out, err) = out3(o);
        assert_eq!(code, 0, "{err}");
        (serde_json::from_str::<Value>(&out).unwrap(), err)
    };
    let (v, err) = run(FAKE_NVML);
    assert_eq!(v["unavailable"], Value::Null, "{v}");
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2, "{v}");
    assert_eq!(gpus[1]["uuid"], uuid(1));
    assert_eq!(gpus[1]["minor"], 1);
    assert!(err.is_empty(), "{err}");

    let (v, err) = run("/nonexistent/libnvidia-ml.so.1");
    assert_eq!(v["gpus"], Value::Array(vec![]));
    let why = v["unavailable"].as_str().unwrap();
    assert!(why.contains("/nonexistent/libnvidia-ml.so.1"), "{why}");
    assert!(err.contains("NVML unavailable"), "{err}");
}

#[test]
fn no_driver_means_zero_gpus_and_one_clear_line() {
    let h = Host::new(3);
    let out = h
        .cmd()
        .env("FAKE_NVML_INIT_FAIL", "1")
        .args(["gpus", "--json"])
        .output()
        .unwrap();
    let (code, stdout, stderr) = out3(out);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap(),
        Value::Array(vec![])
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("NVML unavailable") && stderr.contains("driver is not loaded"),
        "{stderr}"
    );

    // No library at all: the same, naming the path.
    let (code, stdout, stderr) = out3(
        h.cmd()
            .env("CAISSON_NVML_LIB", "/nonexistent/libnvidia-ml.so.1")
            .args(["gpus", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!((code, stdout.trim()), (0, "[]"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("/nonexistent/libnvidia-ml.so.1"),
        "{stderr}"
    );

    // Asking a task for GPUs there is refused, and leaves nothing behind.
    let rootfs = h.c.root.path().join("empty-rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let (code, _, err) = out3(
        h.cmd()
            .env("FAKE_NVML_INIT_FAIL", "1")
            .args([
                "run",
                "--gpus",
                "1",
                "--rootfs",
                rootfs.to_str().unwrap(),
                "true",
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 125);
    assert!(err.contains("no GPUs for caisson to manage"), "{err}");
    assert!(!h.c.root.path().join("containers").exists() || h.ok(&["ps", "-aq"]).is_empty());
}

/// What the probe script prints: the env, the nodes, and the open() result of the allocated
/// node, the control node, and a node of another GPU made inside the task.
const PROBE: &str = "echo \"VIS=$NVIDIA_VISIBLE_DEVICES\"; echo \"CUDA=$CUDA_VISIBLE_DEVICES\"; \
    ls /dev | busybox grep nvidia | busybox tr '\\n' ' '; echo; \
    cat /dev/nvidia0 2>&1; cat /dev/nvidiactl 2>&1; \
    busybox mknod /dev/nvidia2 c 195 2 && cat /dev/nvidia2 2>&1; \
    busybox grep :devices: /proc/self/cgroup; true";

fn check_probe(out: &str) {
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(format!("VIS={}", uuid(0)).as_str()),
        "{out}"
    );
    assert_eq!(
        lines.next(),
        Some(format!("CUDA={}", uuid(0)).as_str()),
        "{out}"
    );
    // Only the allocated GPU's node (and the control node) in the task's /dev.
    assert_eq!(lines.next(), Some("nvidia0 nvidiactl "), "{out}");
    let nv0 = lines.next().unwrap_or_default();
    assert!(
        nv0.contains("/dev/nvidia0") && nv0.contains(ENXIO),
        "allowed: {out}"
    );
    let ctl = lines.next().unwrap_or_default();
    assert!(
        ctl.contains("/dev/nvidiactl") && ctl.contains(ENXIO),
        "control: {out}"
    );
    let nv2 = lines.next().unwrap_or_default();
    assert!(
        nv2.contains("/dev/nvidia2") && nv2.contains(EPERM),
        "denied: {out}"
    );
}

#[test]
fn root_gpu_devices_isolated_by_the_v1_device_cgroup() {
    let Some(h) = Host::with_image(3) else { return };
    let (code, out, err) = h.run(&["run", "--rm", "--gpus", "1", &h.image, "sh", "-c", PROBE]);
    assert_eq!(code, 0, "{out}{err}");
    check_probe(&out);
    if !containerizer::cgroups::is_v2() {
        // The v1 devices hierarchy holds the task (on a pure v2 host this is the BPF path).
        assert!(
            out.lines().last().unwrap().contains(":devices:/caisson/"),
            "{out}"
        );
    }
    assert_eq!(h.holders(), [None, None, None], "released after --rm");
}

/// The cgroup v2 device program (BPF_PROG_TYPE_CGROUP_DEVICE) on a hybrid host: in a private
/// mount namespace the host's cgroup2 mount is bound over /sys/fs/cgroup, so caisson takes
/// its v2 path (task born in a cgroup2 cgroup with the program attached, no v1 devices cgroup).
#[test]
fn root_gpu_devices_isolated_by_the_v2_bpf_program() {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let Some(h) = Host::with_image(3) else { return };
    if !unified.join("cgroup.procs").exists() {
        // A pure v2 host runs this path in the v1 test already; a pure v1 host has no cgroup2.
        assert!(
            containerizer::cgroups::is_v2() || std::env::var_os("CI").is_none(),
            "no cgroup2 mount to test the BPF device program on"
        );
        return;
    }
    let mut c = Command::new("unshare");
    c.args([
        "-m",
        "sh",
        "-c",
        "mount --make-rprivate / && mount --bind /sys/fs/cgroup/unified /sys/fs/cgroup && exec \"$0\" \"$@\"",
    ])
    .arg(caisson_bin())
    .arg("--root")
    .arg(h.c.root.path())
    .args(["run", "--rm", "--gpus", "1", &h.image, "sh", "-c", PROBE])
    .env("CAISSON_NVML_LIB", FAKE_NVML)
    .env("FAKE_NVML_GPUS", "3");
    let (code, out, err) = out3(c.output().unwrap());
    assert_eq!(code, 0, "{out}{err}");
    check_probe(&out);
    // No v1 devices cgroup of its own: the BPF program alone denied nvidia2.
    assert!(!out.lines().last().unwrap().contains("caisson"), "{out}");
    assert_eq!(h.holders(), [None, None, None]);
}

#[test]
fn root_gpu_allocation_concurrency_exhaustion_release_and_restart() {
    let Some(h) = Host::with_image(3) else { return };
    // Five launches at once, from five processes, for three GPUs.
    let children: Vec<_> = (0..5)
        .map(|_| {
            h.cmd()
                .args(["run", "-d", "--gpus", "1", &h.image, "sleep", "60"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = vec![];
    let mut refused = 0;
    for c in children {
        let (code, out, err) = out3(c.wait_with_output().unwrap());
        match code {
            0 => ids.push(out.trim().to_string()),
            125 => {
                assert!(
                    err.contains("cannot allocate 1 GPU(s): 0 of 3 free"),
                    "{err}"
                );
                refused += 1;
            }
            _ => panic!("unexpected {code}: {out}{err}"),
        }
    }
    assert_eq!((ids.len(), refused), (3, 2));
    // Each of a new process's view (the CLI is daemonless): one task per GPU, all distinct.
    let holders: Vec<String> = h.holders().into_iter().map(|t| t.expect("held")).collect();
    let distinct: HashSet<&String> = holders.iter().collect();
    assert_eq!(distinct.len(), 3);
    assert_eq!(distinct, ids.iter().collect::<HashSet<_>>());
    let mut visible = HashSet::new();
    for (i, t) in holders.iter().enumerate() {
        let env = h.env_of(t);
        assert!(
            env.contains(&format!("NVIDIA_VISIBLE_DEVICES={}", uuid(i as u32))),
            "{env:?}"
        );
        visible.insert(env.into_iter().find(|e| e.starts_with("NVIDIA_")).unwrap());
    }
    assert_eq!(visible.len(), 3);
    // Refused launches left no container behind.
    assert_eq!(h.ok(&["ps", "-aq"]).lines().count(), 3);

    // Exhaustion names the holders.
    let (code, _, err) = h.run(&["run", "--rm", "--gpus", "1", &h.image, "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("GPU 0 held by"), "{err}");

    // A killed task's GPU is free again (the task ended; it is still listed).
    let gpu1 = holders[1].clone();
    h.ok(&["kill", &gpu1]);
    h.wait_status(&gpu1, "exited");
    assert_eq!(h.holders()[1], None);
    let again = h.ok(&["run", "-d", "--gpus", "1", &h.image, "sleep", "60"]);
    let again = again.trim().to_string();
    assert_eq!(h.holders()[1].as_deref(), Some(again.as_str()));

    // A task that exits by itself releases its GPU.
    h.ok(&["rm", "-f", &holders[0]]);
    let short = h.ok(&["run", "-d", "--gpus", "1", &h.image, "sh", "-c", "exit 3"]);
    let short = short.trim().to_string();
    h.wait_status(&short, "exited");
    assert_eq!(h.holders()[0], None);

    // rm releases; a foreground --rm run takes and gives back several at once.
    h.ok(&["rm", "-f", &holders[2], &again]);
    assert_eq!(h.holders(), [None, None, None]);
    let (code, out, err) = h.run(&[
        "run",
        "--rm",
        "--gpus",
        "all",
        &h.image,
        "sh",
        "-c",
        "echo $NVIDIA_VISIBLE_DEVICES",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{},{},{}", uuid(0), uuid(1), uuid(2)));
    let (code, _, err) = h.run(&["run", "--rm", "--gpus", "4", &h.image, "true"]);
    assert_eq!(code, 125);
    assert!(
        err.contains("cannot allocate 4 GPU(s): 3 of 3 free"),
        "{err}"
    );
    h.ok(&["rm", "-f", &gpu1, &short]);
    assert!(h.ok(&["ps", "-aq"]).is_empty());
    assert_eq!(h.holders(), [None, None, None]);
}

#[test]
fn gpus_lists_mig_devices_under_their_parent() {
    let h = Host::new(3);
    let out = h
        .cmd()
        .env("FAKE_NVML_MIG", "0:2,2:0")
        .args(["gpus", "--json"])
        .output()
        .unwrap();
    let (code, stdout, stderr) = out3(out);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stderr, "",
        "MIG not supported on GPU 1 is not worth a warning"
    );
    let v: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v[0]["mig_mode"], true);
    let migs = v[0]["mig_devices"].as_array().unwrap();
    assert_eq!(migs.len(), 2, "{stdout}");
    for (j, m) in migs.iter().enumerate() {
        assert_eq!(m["index"], j);
        assert_eq!(
            m["uuid"],
            format!("MIG-fa4e0000-0000-0000-0000-{j:012}").as_str()
        );
        assert_eq!(
            m["name"],
            format!("Fake NVIDIA GPU 0 MIG {}g.{}gb", j + 1, (j + 1) * 10).as_str()
        );
        assert_eq!(
            m["profile"],
            format!("{}g.{}gb", j + 1, (j + 1) * 10).as_str()
        );
        assert_eq!(m["memory_bytes"], ((j as u64 + 1) * 10) << 30);
    }
    // GPU 1 does not support MIG; GPU 2 is in MIG mode without instances.
    assert_eq!(v[1].get("mig_mode"), None);
    assert_eq!(v[1].get("mig_devices"), None);
    assert_eq!(v[2]["mig_mode"], true);
    assert_eq!(v[2].get("mig_devices"), None);

    let table = String::from_utf8(
        h.cmd()
            .env("FAKE_NVML_MIG", "0:2")
            .arg("gpus")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(
        rows.len(),
        6,
        "header, GPU 0, its 2 MIG devices, GPUs 1 and 2: {table}"
    );
    assert!(rows[1].starts_with("0  "), "{table}");
    assert!(
        rows[2].starts_with("0:0")
            && rows[2].contains("MIG-fa4e0000")
            && rows[2].contains("MIG 1g.10gb"),
        "{table}"
    );
    assert!(
        rows[3].starts_with("0:1") && rows[3].contains("20 GiB"),
        "{table}"
    );
    assert!(rows[4].starts_with("1  "), "{table}");
}
