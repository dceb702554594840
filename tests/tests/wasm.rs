//! End-to-end Wasm tests: the real `caisson-wasm` binary running guests built from
//! `tests/guests` (WAT files, and the Rust guest for wasm32-wasip1 and wasm32-wasip2).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// The `caisson-wasm` binary under test (`caisson_tests::bin_dir`).
fn bin() -> PathBuf {
    let bin = caisson_tests::bin_dir().join("caisson-wasm");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

fn guests() -> PathBuf {
    workspace().join("tests/guests")
}

/// The Rust guest for `target`, built once per test process; `None` (skip) if the target is
/// not installed, a failure under CI.
fn rust_guest(target: &'static str) -> Option<PathBuf> {
    static P1: OnceLock<Option<PathBuf>> = OnceLock::new();
    static P2: OnceLock<Option<PathBuf>> = OnceLock::new();
    let cell = if target == "wasm32-wasip1" { &P1 } else { &P2 };
    cell.get_or_init(|| caisson_tests::build_guest("rust-guest", target, "caisson-guest.wasm"))
        .clone()
}

/// A `caisson-wasm` with its own compile cache.
struct Host {
    cache: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        Self {
            cache: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(bin())
            .arg("run")
            .arg("--cache")
            .arg(self.cache.path())
            .args(args)
            .output()
            .unwrap();
        eprintln!(
            "caisson-wasm run {args:?} -> {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not signalled")
}
fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn hello_wat_runs_and_is_cached_on_disk() {
    let h = Host::new();
    let hello = guests().join("hello.wat");
    let o = h.run(&[p(&hello)]);
    assert_eq!(code(&o), 0);
    assert_eq!(stdout(&o), "hello, world\n");
    // One artifact, under the engine's compatibility hash.
    let entries: Vec<_> = walk(h.cache.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let o = h.run(&[p(&hello)]);
    assert_eq!(stdout(&o), "hello, world\n");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn traps_timeouts_and_memory_limits_have_exit_codes() {
    let h = Host::new();
    let o = h.run(&[p(&guests().join("trap.wat"))]);
    assert_eq!(code(&o), 134);
    assert!(stderr(&o).contains("unreachable"), "{}", stderr(&o));

    let t0 = Instant::now();
    let o = h.run(&["--timeout", "0.3", p(&guests().join("loop.wat"))]);
    assert_eq!(code(&o), 124);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));

    let o = h.run(&["--memory", "2m", p(&guests().join("grow.wat"))]);
    assert_eq!(code(&o), 137);
    assert!(stderr(&o).contains("memory limit"), "{}", stderr(&o));
}

#[test]
fn bad_inputs_are_named() {
    let h = Host::new();
    let d = tempfile::tempdir().unwrap();
    let o = h.run(&["/bin/true"]);
    assert_eq!(code(&o), 126);
    assert!(stderr(&o).contains("ELF"), "{}", stderr(&o));

    let o = h.run(&[p(&d.path().join("missing.wasm"))]);
    assert_eq!(code(&o), 127);

    let imp = d.path().join("imp.wat");
    std::fs::write(
        &imp,
        r#"(module (import "env" "gpu_magic" (func)) (func (export "_start")))"#,
    )
    .unwrap();
    let o = h.run(&[p(&imp)]);
    assert_eq!(code(&o), 126);
    assert!(stderr(&o).contains("env::gpu_magic"), "{}", stderr(&o));

    let lib = d.path().join("lib.wat");
    std::fs::write(&lib, r#"(module (func (export "add")))"#).unwrap();
    let o = h.run(&[p(&lib)]);
    assert_eq!(code(&o), 126);
    assert!(stderr(&o).contains("not a WASI command"), "{}", stderr(&o));

    let p0 = d.path().join("p0.wat");
    std::fs::write(
        &p0,
        r#"(module (import "wasi_unstable" "proc_exit" (func (param i32))) (func (export "_start")))"#,
    )
    .unwrap();
    let o = h.run(&[p(&p0)]);
    assert_eq!(code(&o), 126);
    assert!(stderr(&o).contains("WASI preview 0"), "{}", stderr(&o));
}

fn rust_guest_end_to_end(target: &'static str) {
    let Some(guest) = rust_guest(target) else {
        return;
    };
    // Rust's wasip2 libc exits through `wasi:cli/exit.exit(result)`: only 0 or 1 survive.
    let exit = |c: i32| {
        if target == "wasm32-wasip2" {
            c.min(1)
        } else {
            c
        }
    };
    let g = p(&guest);
    let h = Host::new();

    let o = h.run(&[g, "args", "--flag", "two words"]);
    assert_eq!(stdout(&o), "caisson-guest.wasm\nargs\n--flag\ntwo words\n");

    let o = h.run(&["-e", "GREETING=hi", "--env", "B=2", g, "env"]);
    assert_eq!(stdout(&o), "B=2\nGREETING=hi\n");

    for c in [0, 3, 42] {
        let o = h.run(&[g, "exit", &c.to_string()]);
        assert_eq!(code(&o), exit(c));
    }

    let o = h.run(&[g, "panic"]);
    assert_eq!(code(&o), 134);
    assert!(stderr(&o).contains("guest panicked on purpose"));
    assert!(stderr(&o).contains("unreachable"));

    // Directories: wasmtime's --dir, podman's -v with :ro.
    let data = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("a.txt"), "A\n").unwrap();
    std::fs::write(ro.path().join("b.txt"), "B\n").unwrap();
    let dir = format!("{}::/data", p(data.path()));
    let vol = format!("{}:/ro:ro", p(ro.path()));
    let o = h.run(&[
        "--dir",
        &dir,
        "-v",
        &vol,
        g,
        "cat",
        "/data/a.txt",
        "/ro/b.txt",
    ]);
    assert_eq!(stdout(&o), "A\nB\n");
    let o = h.run(&["--dir", &dir, "-v", &vol, g, "write", "/ro/c.txt", "x"]);
    assert_eq!(code(&o), exit(3));
    let o = h.run(&["--dir", &dir, g, "write", "/data/c.txt", "x"]);
    assert_eq!(code(&o), 0);
    assert_eq!(
        std::fs::read_to_string(data.path().join("c.txt")).unwrap(),
        "x"
    );

    // Streams into log files (appended, as a task's logs are), stdin from a file.
    let logs = tempfile::tempdir().unwrap();
    let (out, err) = (
        logs.path().join("stdout.log"),
        logs.path().join("stderr.log"),
    );
    for _ in 0..2 {
        let o = h.run(&["--stdout", p(&out), "--stderr", p(&err), g, "streams"]);
        assert_eq!(code(&o), 0);
        assert_eq!(stdout(&o), "");
    }
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "to stdout\nto stdout\n"
    );
    assert_eq!(
        std::fs::read_to_string(&err).unwrap(),
        "to stderr\nto stderr\n"
    );
    let input = logs.path().join("in.txt");
    std::fs::write(&input, "quiet\n").unwrap();
    let o = h.run(&["--stdin", p(&input), g, "stdin"]);
    assert_eq!(stdout(&o), "QUIET\n");

    let o = h.run(&["--memory", "8m", g, "alloc", "32"]);
    assert_eq!(code(&o), 137);
    let o = h.run(&["--timeout", "0.2", g, "loop"]);
    assert_eq!(code(&o), 124);
    // Sleeping in a host call: the host process's watchdog ends it.
    let t0 = Instant::now();
    let o = h.run(&["--timeout", "0.2", g, "sleep", "20000"]);
    assert_eq!(code(&o), 124);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn rust_guest_wasip1_module() {
    rust_guest_end_to_end("wasm32-wasip1");
}

#[test]
fn rust_guest_wasip2_component() {
    rust_guest_end_to_end("wasm32-wasip2");
}

#[test]
fn json_spec_and_status_file() {
    let Some(guest) = rust_guest("wasm32-wasip1") else {
        return;
    };
    let h = Host::new();
    let d = tempfile::tempdir().unwrap();
    let spec = serde_json::json!({
        "module": guest,
        "argv": ["guest", "exit", "5"],
        "env": ["X=1"],
        "stdout": d.path().join("out"),
        "limits": {"memory_bytes": 67108864},
        "timeout_ms": 10000,
    });
    let spec_path = d.path().join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let status = d.path().join("status.json");
    let o = h.run(&["--spec", p(&spec_path), "--status-file", p(&status)]);
    assert_eq!(code(&o), 5);
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
    assert_eq!(s, serde_json::json!({"status": "exited", "code": 5}));

    std::fs::write(&spec_path, br#"{"module": "x.wasm", "memroy": 1}"#).unwrap();
    let o = h.run(&["--spec", p(&spec_path)]);
    assert_eq!(code(&o), 125);
    assert!(stderr(&o).contains("memroy"), "{}", stderr(&o));
}
