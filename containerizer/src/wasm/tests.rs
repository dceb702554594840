//! Engine tests: WAT guests inline, and the Rust guest of `tests/guests/rust-guest` built for
//! wasm32-wasip1 (core module) and wasm32-wasip2 (component).
use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn engine() -> Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        Engine::new(EngineConfig {
            max_instances: 64,
            ..EngineConfig::default()
        })
        .unwrap()
    })
    .clone()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// Builds the Rust guest for `target`, once per process. `None` (a skip) when the target is not
/// installed, except under CI where that is a failure.
fn guest(target: &str) -> Option<PathBuf> {
    static P1: OnceLock<Option<PathBuf>> = OnceLock::new();
    static P2: OnceLock<Option<PathBuf>> = OnceLock::new();
    let cell = if target == "wasm32-wasip1" { &P1 } else { &P2 };
    cell.get_or_init(|| {
        let ws = workspace();
        let target_dir = ws.join("target/wasm-guests");
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--quiet", "--target", target])
            .arg("--manifest-path")
            .arg(ws.join("tests/guests/rust-guest/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .env_remove("RUSTFLAGS")
            .output()
            .expect("run cargo");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if std::env::var_os("CI").is_some() {
                panic!("building the {target} guest failed: {err}");
            }
            eprintln!(
                "skipping: cannot build the {target} guest (rustup target add {target}): {err}"
            );
            return None;
        }
        Some(target_dir.join(target).join("release/caisson-guest.wasm"))
    })
    .clone()
}

fn wat(name: &str, text: &str) -> Source {
    Source::bytes(name, text.as_bytes().to_vec())
}

const HELLO: &str = include_str!("../../../tests/guests/hello.wat");

struct Captured {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `program` with stdout/stderr in temp files and returns what they got.
fn run_captured(program: &Program, mut task: TaskSpec) -> Captured {
    let d = tempfile::tempdir().unwrap();
    let (out, err) = (d.path().join("out"), d.path().join("err"));
    task.stdout = Stdio::Path(out.clone());
    task.stderr = Stdio::Path(err.clone());
    let status = engine().run(program, task).unwrap();
    Captured {
        status,
        stdout: std::fs::read_to_string(out).unwrap_or_default(),
        stderr: std::fs::read_to_string(err).unwrap_or_default(),
    }
}

#[test]
fn output_on_write_creates_only_the_logs_written_to() {
    let p = engine().load(&wat("hello.wat", HELLO)).unwrap();
    let d = tempfile::tempdir().unwrap();
    let (out, err) = (d.path().join("out"), d.path().join("err"));
    std::fs::write(&out, "before\n").unwrap();
    let task = TaskSpec {
        stdout: Stdio::PathOnWrite(out.clone()),
        stderr: Stdio::PathOnWrite(err.clone()),
        ..TaskSpec::new(["hello"])
    };
    assert_eq!(
        engine().run(&p, task).unwrap(),
        ExitStatus::Exited { code: 0 }
    );
    // Appended to, as a `Path` is; the stream never written to was never created.
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "before\nhello, world\n"
    );
    assert!(!err.exists());
    // A log that cannot be created fails the guest's write, not the task's setup.
    let task = TaskSpec {
        stdout: Stdio::PathOnWrite(d.path().join("missing/out")),
        ..TaskSpec::new(["hello"])
    };
    assert!(engine().run(&p, task).is_ok());
}

#[test]
fn hello_wat_writes_stdout_and_exits_zero() {
    let p = engine().load(&wat("hello.wat", HELLO)).unwrap();
    assert_eq!(p.kind(), ProgramKind::WasiP1Module);
    assert!(p.digest().starts_with("sha256:"));
    let c = run_captured(&p, TaskSpec::new(["hello"]));
    assert_eq!(c.status, ExitStatus::Exited { code: 0 });
    assert_eq!(c.stdout, "hello, world\n");
    // The second load is the same template.
    let (p2, origin) = engine().load_with_origin(&wat("hello.wat", HELLO)).unwrap();
    assert_eq!(origin, CacheOrigin::Memory);
    assert_eq!(p2.digest(), p.digest());
}

#[test]
fn stdout_to_an_open_file() {
    let p = engine().load(&wat("hello.wat", HELLO)).unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    let task = TaskSpec {
        stdout: Stdio::File(f.reopen().unwrap()),
        ..TaskSpec::new(["hello"])
    };
    assert!(engine().run(&p, task).unwrap().success());
    assert_eq!(std::fs::read_to_string(f.path()).unwrap(), "hello, world\n");
}

#[test]
fn trap_reports_the_message_and_backtrace() {
    let p = engine()
        .load(&wat(
            "trap.wat",
            include_str!("../../../tests/guests/trap.wat"),
        ))
        .unwrap();
    match engine().run(&p, TaskSpec::new(["trap"])).unwrap() {
        ExitStatus::Trap { message, backtrace } => {
            assert!(message.contains("unreachable"), "{message}");
            assert!(backtrace.contains("boom"), "{backtrace}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn timeout_stops_an_infinite_loop() {
    let p = engine()
        .load(&wat(
            "loop.wat",
            include_str!("../../../tests/guests/loop.wat"),
        ))
        .unwrap();
    let t0 = Instant::now();
    let task = TaskSpec {
        timeout: Some(Duration::from_millis(200)),
        ..TaskSpec::new(["loop"])
    };
    let status = engine().run(&p, task).unwrap();
    let took = t0.elapsed();
    assert_eq!(status, ExitStatus::Timeout { after_ms: 200 });
    assert_eq!(status.exit_code(), EXIT_TIMEOUT);
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn kill_switch_stops_an_infinite_loop() {
    let p = engine()
        .load(&wat(
            "loop.wat",
            include_str!("../../../tests/guests/loop.wat"),
        ))
        .unwrap();
    let kill = KillSwitch::new();
    let k = kill.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        k.kill();
    });
    let task = TaskSpec {
        kill: Some(kill),
        ..TaskSpec::new(["loop"])
    };
    assert_eq!(engine().run(&p, task).unwrap(), ExitStatus::Killed);
    t.join().unwrap();
}

#[test]
fn terminate_reports_the_signal() {
    let p = engine()
        .load(&wat(
            "loop.wat",
            include_str!("../../../tests/guests/loop.wat"),
        ))
        .unwrap();
    let kill = KillSwitch::new();
    let k = kill.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        k.terminate(15);
        // A later terminate does not change the reason.
        k.terminate(2);
    });
    let task = TaskSpec {
        kill: Some(kill),
        ..TaskSpec::new(["loop"])
    };
    let status = engine().run(&p, task).unwrap();
    assert_eq!(status, ExitStatus::Terminated { signal: 15 });
    assert_eq!(status.exit_code(), 143);
    assert_eq!(status.to_string(), "terminated by SIGTERM");
    t.join().unwrap();
}

#[test]
fn memory_limit_traps_growth_and_is_reported() {
    let p = engine()
        .load(&wat(
            "grow.wat",
            include_str!("../../../tests/guests/grow.wat"),
        ))
        .unwrap();
    let task = TaskSpec {
        limits: Limits {
            memory_bytes: Some(4 << 20),
            table_elements: None,
        },
        ..TaskSpec::new(["grow"])
    };
    match engine().run(&p, task).unwrap() {
        s @ ExitStatus::MemoryLimit { .. } => {
            assert_eq!(s.exit_code(), EXIT_KILLED);
            assert!(s.to_string().contains("4194304"), "{s}");
        }
        other => panic!("expected the memory limit, got {other:?}"),
    }
    // An initial memory over the limit fails at instantiation, reported the same way.
    let big = engine()
        .load(&wat(
            "big.wat",
            r#"(module (memory 100) (func (export "_start")))"#,
        ))
        .unwrap();
    let task = TaskSpec {
        limits: Limits {
            memory_bytes: Some(1 << 20),
            table_elements: None,
        },
        ..TaskSpec::new(["big"])
    };
    assert!(matches!(
        engine().run(&big, task).unwrap(),
        ExitStatus::MemoryLimit { .. }
    ));
}

#[test]
fn table_limit_is_a_memory_limit() {
    let p = engine()
        .load(&wat(
            "table.wat",
            r#"(module (table 1 funcref)
                 (func (export "_start")
                   (drop (table.grow (ref.null func) (i32.const 1000)))))"#,
        ))
        .unwrap();
    let task = TaskSpec {
        limits: Limits {
            memory_bytes: None,
            table_elements: Some(100),
        },
        ..TaskSpec::new(["t"])
    };
    assert!(matches!(
        engine().run(&p, task).unwrap(),
        ExitStatus::MemoryLimit { .. }
    ));
}

#[test]
fn proc_exit_is_a_status() {
    let p = engine()
        .load(&wat(
            "exit.wat",
            r#"(module
                 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                 (memory (export "memory") 1)
                 (func (export "_start") (call $exit (i32.const 42))))"#,
        ))
        .unwrap();
    let s = engine().run(&p, TaskSpec::new(["exit"])).unwrap();
    assert_eq!(s, ExitStatus::Exited { code: 42 });
    assert_eq!(s.exit_code(), 42);
}

#[test]
fn bad_inputs_have_clear_errors() {
    let e = engine();
    let err = e
        .load(&Source::bytes("elf", b"\x7fELF\x02\x01".to_vec()))
        .unwrap_err();
    assert!(matches!(err, Error::NotWasm { .. }), "{err}");
    assert!(err.to_string().contains("ELF"), "{err}");
    assert_eq!(err.exit_code(), EXIT_CANNOT_RUN);

    let err = e.load(&Source::bytes("empty", Vec::new())).unwrap_err();
    assert!(matches!(err, Error::NotWasm { .. }), "{err}");

    let err = e
        .load(&wat(
            "bad.wat",
            "(module (func (export \"_start\") i32.add))",
        ))
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");

    let err = e.load(&Source::path("/nonexistent/x.wasm")).unwrap_err();
    assert_eq!(err.exit_code(), EXIT_NOT_FOUND, "{err}");

    let err = e
        .load(&wat("lib.wat", r#"(module (func (export "add")))"#))
        .unwrap_err();
    assert!(matches!(err, Error::NotCommand { .. }), "{err}");
    assert!(err.to_string().contains("_start"), "{err}");

    let err = e
        .load(&wat(
            "reactor.wat",
            r#"(module (func (export "_initialize")))"#,
        ))
        .unwrap_err();
    assert!(err.to_string().contains("reactor"), "{err}");

    let err = e
        .load(&wat(
            "env.wat",
            r#"(module (import "env" "host_magic" (func)) (func (export "_start")))"#,
        ))
        .unwrap_err();
    assert!(matches!(err, Error::UnknownImport { .. }), "{err}");
    assert!(err.to_string().contains("env::host_magic"), "{err}");

    let err = e
        .load(&wat(
            "nofn.wat",
            r#"(module (import "wasi_snapshot_preview1" "teleport" (func)) (func (export "_start")))"#,
        ))
        .unwrap_err();
    assert!(matches!(err, Error::UnknownImport { .. }), "{err}");
    assert!(
        err.to_string().contains("wasi_snapshot_preview1::teleport"),
        "{err}"
    );

    let err = e
        .load(&wat(
            "p0.wat",
            r#"(module (import "wasi_unstable" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                 (func (export "_start")))"#,
        ))
        .unwrap_err();
    assert!(matches!(err, Error::WrongWasiVersion { .. }), "{err}");
    assert!(err.to_string().contains("preview 0"), "{err}");

    // A signature that does not match the WASI function is a link error naming it.
    let err = e
        .load(&wat(
            "sig.wat",
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32)))
                 (func (export "_start")))"#,
        ))
        .unwrap_err();
    assert!(matches!(err, Error::Link { .. }), "{err}");
    assert!(err.to_string().contains("fd_write"), "{err}");

    // Components: not a command, unknown imports, WASI 0.3.
    let err = e
        .load(&wat("empty-component.wat", "(component)"))
        .unwrap_err();
    assert!(matches!(err, Error::NotCommand { .. }), "{err}");
    assert!(err.to_string().contains("wasi:cli/run"), "{err}");

    let err = e
        .load(&wat(
            "imp-component.wat",
            r#"(component (import "acme:magic/wand@1.0.0" (instance)))"#,
        ))
        .unwrap_err();
    assert!(matches!(err, Error::UnknownImport { .. }), "{err}");
    assert!(err.to_string().contains("acme:magic/wand@1.0.0"), "{err}");

    let err = e
        .load(&wat(
            "p3-component.wat",
            r#"(component (import "wasi:cli/environment@0.3.0" (instance)))"#,
        ))
        .unwrap_err();
    assert!(matches!(err, Error::WrongWasiVersion { .. }), "{err}");
}

#[test]
fn disk_cache_is_keyed_by_digest_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || EngineConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        max_instances: 4,
        ..EngineConfig::default()
    };
    let e1 = Engine::new(cfg()).unwrap();
    let (p, origin) = e1.load_with_origin(&wat("hello.wat", HELLO)).unwrap();
    assert_eq!(origin, CacheOrigin::Compiled);
    let hex = p.digest().trim_start_matches("sha256:").to_string();
    let cdir = dir.path().join(e1.compatibility_hash());
    assert_eq!(e1.cache_dir(), Some(cdir.as_path()));
    assert!(cdir.join(format!("{hex}.module.cwasm")).exists());

    // A fresh engine (another process, in effect) maps the artifact instead of compiling.
    let e2 = Engine::new(cfg()).unwrap();
    let (p2, origin) = e2.load_with_origin(&wat("hello.wat", HELLO)).unwrap();
    assert_eq!(origin, CacheOrigin::Disk);
    let d = tempfile::tempdir().unwrap();
    let task = TaskSpec {
        stdout: Stdio::Path(d.path().join("o")),
        ..TaskSpec::new(["hello"])
    };
    assert!(e2.run(&p2, task).unwrap().success());
    assert_eq!(
        std::fs::read_to_string(d.path().join("o")).unwrap(),
        "hello, world\n"
    );

    // A corrupt entry is ignored and replaced. (Replaced by a new file: rewriting a mapped
    // artifact in place would crash the engines that mapped it, which is why the cache only ever
    // renames.)
    drop((e1, e2, p, p2));
    let entry = cdir.join(format!("{hex}.module.cwasm"));
    std::fs::remove_file(&entry).unwrap();
    std::fs::write(&entry, b"garbage").unwrap();
    let e3 = Engine::new(cfg()).unwrap();
    let (_, origin) = e3.load_with_origin(&wat("hello.wat", HELLO)).unwrap();
    assert_eq!(origin, CacheOrigin::Compiled);
    let e4 = Engine::new(cfg()).unwrap();
    let (_, origin) = e4.load_with_origin(&wat("hello.wat", HELLO)).unwrap();
    assert_eq!(origin, CacheOrigin::Disk);
}

#[test]
fn path_sources_are_remembered_until_the_file_changes() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("m.wat");
    std::fs::write(&path, HELLO).unwrap();
    let e = engine();
    let p1 = e.load(&Source::path(&path)).unwrap();
    let (_, origin) = e.load_with_origin(&Source::path(&path)).unwrap();
    assert_eq!(origin, CacheOrigin::Memory);
    std::fs::write(&path, r#"(module (func (export "_start")))"#).unwrap();
    let p3 = e.load(&Source::path(&path)).unwrap();
    assert_ne!(p1.digest(), p3.digest());
}

/// Everything the Rust guest checks, for the module (p1) and the component (p2) alike.
fn rust_guest_suite(target: &str, kind: ProgramKind) {
    // Rust's wasip2 libc exits through `wasi:cli/exit.exit(result)`: only 0 or 1 survive.
    let exit = |code: i32| ExitStatus::Exited {
        code: if kind == ProgramKind::WasiP2Component {
            code.min(1)
        } else {
            code
        },
    };
    let Some(wasm) = guest(target) else { return };
    let e = engine();
    let p = e.load(&Source::path(&wasm)).unwrap();
    assert_eq!(p.kind(), kind);

    let c = run_captured(&p, TaskSpec::new(["guest", "hello"]));
    assert_eq!(c.status, ExitStatus::Exited { code: 0 });
    assert_eq!(c.stdout, "hello from wasm\n");

    let c = run_captured(&p, TaskSpec::new(["guest.wasm", "args", "a b", "ü", ""]));
    assert_eq!(c.stdout, "guest.wasm\nargs\na b\nü\n\n");

    let task = TaskSpec {
        env: vec![("A".into(), "1".into()), ("EMPTY".into(), String::new())],
        ..TaskSpec::new(["g", "env"])
    };
    assert_eq!(run_captured(&p, task).stdout, "A=1\nEMPTY=\n");

    let c = run_captured(&p, TaskSpec::new(["g", "streams"]));
    assert_eq!(
        (c.stdout.as_str(), c.stderr.as_str()),
        ("to stdout\n", "to stderr\n")
    );

    // Files in a read-write and a read-only preopen.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in.txt"), "file contents\n").unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("keep.txt"), "ro\n").unwrap();
    let preopens = || {
        vec![
            Preopen {
                host: data.path().into(),
                guest: "/data".into(),
                read_only: false,
            },
            Preopen {
                host: ro.path().into(),
                guest: "/ro".into(),
                read_only: true,
            },
        ]
    };
    let task = TaskSpec {
        preopens: preopens(),
        ..TaskSpec::new(["g", "cat", "/data/in.txt", "/ro/keep.txt"])
    };
    let c = run_captured(&p, task);
    assert_eq!(c.stdout, "file contents\nro\n", "{}", c.stderr);
    let task = TaskSpec {
        preopens: preopens(),
        ..TaskSpec::new(["g", "write", "/data/out.txt", "written by wasm"])
    };
    assert!(run_captured(&p, task).status.success());
    assert_eq!(
        std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
        "written by wasm"
    );
    let task = TaskSpec {
        preopens: preopens(),
        ..TaskSpec::new(["g", "write", "/ro/new.txt", "nope"])
    };
    let c = run_captured(&p, task);
    assert_eq!(c.status, exit(3), "{}", c.stderr);
    assert!(!ro.path().join("new.txt").exists());
    // Nothing outside the preopens.
    let c = run_captured(&p, TaskSpec::new(["g", "cat", "/etc/hostname"]));
    assert_eq!(c.status, exit(2));

    // stdin from a file.
    let input = data.path().join("stdin.txt");
    std::fs::write(&input, "shout\n").unwrap();
    let task = TaskSpec {
        stdin: Stdio::Path(input),
        ..TaskSpec::new(["g", "stdin"])
    };
    assert_eq!(run_captured(&p, task).stdout, "SHOUT\n");

    // Exit codes, panics (a trap), memory limit, timeout.
    for code in [0, 1, 7, 125] {
        let c = run_captured(
            &p,
            TaskSpec::new(["g".to_string(), "exit".into(), code.to_string()]),
        );
        assert_eq!(c.status, exit(code));
    }
    if kind == ProgramKind::WasiP1Module {
        // WASI p1 exit codes stop at 125 (wasmtime's rule, so a code never looks like a signal).
        let c = run_captured(&p, TaskSpec::new(["g", "exit", "200"]));
        match c.status {
            ExitStatus::Trap { message, .. } => {
                assert!(message.contains("invalid exit status"), "{message}")
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    let c = run_captured(&p, TaskSpec::new(["g", "panic"]));
    match &c.status {
        ExitStatus::Trap { message, .. } => assert!(message.contains("unreachable"), "{message}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(
        c.stderr.contains("guest panicked on purpose"),
        "{}",
        c.stderr
    );

    let task = TaskSpec {
        limits: Limits {
            memory_bytes: Some(16 << 20),
            table_elements: None,
        },
        ..TaskSpec::new(["g", "alloc", "64"])
    };
    let c = run_captured(&p, task);
    assert!(
        matches!(c.status, ExitStatus::MemoryLimit { .. }),
        "{:?}",
        c.status
    );
    let task = TaskSpec {
        limits: Limits {
            memory_bytes: Some(64 << 20),
            table_elements: None,
        },
        ..TaskSpec::new(["g", "alloc", "8"])
    };
    assert_eq!(run_captured(&p, task).stdout, "allocated 8 MiB\n");

    let task = TaskSpec {
        timeout: Some(Duration::from_millis(150)),
        ..TaskSpec::new(["g", "loop"])
    };
    assert_eq!(
        run_captured(&p, task).status,
        ExitStatus::Timeout { after_ms: 150 }
    );
}

#[test]
fn rust_guest_as_a_wasip1_module() {
    rust_guest_suite("wasm32-wasip1", ProgramKind::WasiP1Module);
}

#[test]
fn rust_guest_as_a_wasip2_component() {
    rust_guest_suite("wasm32-wasip2", ProgramKind::WasiP2Component);
}

#[test]
fn tasks_run_concurrently_from_many_threads() {
    let p = engine().load(&wat("hello.wat", HELLO)).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let s = engine().run(&p, TaskSpec::new(["hello"])).unwrap();
                    assert!(s.success());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn setup_errors_name_the_path() {
    let p = engine().load(&wat("hello.wat", HELLO)).unwrap();
    let task = TaskSpec {
        preopens: vec![Preopen {
            host: "/nonexistent/dir".into(),
            guest: "/x".into(),
            read_only: false,
        }],
        ..TaskSpec::new(["hello"])
    };
    let err = engine().run(&p, task).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/dir"), "{err}");
    let task = TaskSpec {
        stdout: Stdio::Path("/nonexistent/dir/log".into()),
        ..TaskSpec::new(["hello"])
    };
    let err = engine().run(&p, task).unwrap_err();
    assert!(
        err.to_string().contains("stdout /nonexistent/dir/log"),
        "{err}"
    );
}

#[test]
fn images_wasi_platform_rootfs_and_wasm_artifact_layer() {
    let Some(wasm) = guest("wasm32-wasip1") else {
        return;
    };
    let bytes = std::fs::read(&wasm).unwrap();
    // A `wasi/wasm` image unpacked to a rootfs: the entrypoint names the module.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("app")).unwrap();
    std::fs::write(root.path().join("app/guest.wasm"), &bytes).unwrap();
    let entrypoint = vec!["/app/guest.wasm".to_string(), "args".to_string()];
    let (source, argv) = module_from_rootfs(root.path(), &entrypoint).unwrap();
    let p = engine().load(&source).unwrap();
    let c = run_captured(&p, TaskSpec::new(argv));
    assert_eq!(c.stdout, "/app/guest.wasm\nargs\n");
    // An OCI Wasm artifact: the layer blob is the module.
    let source = module_from_layer(
        "registry.example/guest:1",
        "application/vnd.wasm.content.layer.v1+wasm",
        bytes,
    )
    .unwrap();
    let p2 = engine().load(&source).unwrap();
    assert_eq!(p2.digest(), p.digest());
    assert_eq!(
        run_captured(&p2, TaskSpec::new(["guest", "hello"])).stdout,
        "hello from wasm\n"
    );
}
