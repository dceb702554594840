//! `caisson run` of Wasm tasks end to end: files, registry images and artifacts, the same verbs
//! and records as native tasks, limits, supervision across a `kill -9` of the launcher, and
//! bad input.
use caisson_tests::{require_root, require_tool, Caisson, LayoutWriter, Registry};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn guest(name: &str) -> String {
    workspace()
        .join("tests/guests")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The Rust guest for wasm32-wasip1, built once; `None` (skip) if the target is missing, a
/// failure under CI.
fn rust_guest() -> Option<String> {
    static P1: OnceLock<Option<String>> = OnceLock::new();
    P1.get_or_init(|| {
        caisson_tests::build_guest("rust-guest", "wasm32-wasip1", "caisson-guest.wasm")
            .map(|p| p.to_string_lossy().into_owned())
    })
    .clone()
}

fn inspect(c: &Caisson, id: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["inspect", id])).unwrap();
    v[0].clone()
}

fn wait_status(c: &Caisson, id: &str, want: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The launcher may not have recorded the task yet.
        let (code, out, _) = c.run(&["inspect", id]);
        let v: serde_json::Value = if code == 0 {
            serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
        } else {
            serde_json::Value::Null
        };
        if v["state"]["status"] == want {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never became {want}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn containers(c: &Caisson) -> Vec<String> {
    std::fs::read_dir(c.root.path().join("containers"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "names")
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn wasm_file_runs_with_no_flag_and_is_a_task() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    let (code, out, err) = c.run(&["run", "--name", "hello", &guest("hello.wat")]);
    assert_eq!((code, out.as_str()), (0, "hello, world\n"), "{err}");
    let v = inspect(&c, "hello");
    assert_eq!(v["state"]["status"], "exited");
    assert_eq!(v["state"]["exit_code"], 0);
    assert!(v["spec"]["wasm"]["module"]
        .as_str()
        .unwrap()
        .ends_with("hello.wat"));
    assert_eq!(c.ok(&["logs", "hello"]), "hello, world\n");
    let ps = c.ok(&["ps", "-a"]);
    assert!(ps.contains("Exited (0)") && ps.contains("hello"), "{ps}");
    c.ok(&["rm", "hello"]);
    assert!(containers(&c).is_empty());
    // --rm leaves nothing either.
    let (code, out, _) = c.run(&["run", "--rm", &guest("hello.wat")]);
    assert_eq!((code, out.as_str()), (0, "hello, world\n"));
    assert!(containers(&c).is_empty(), "{:?}", containers(&c));
}

#[test]
fn args_env_volumes_sandbox_and_streams() {
    if !require_root() {
        return;
    }
    let Some(g) = rust_guest() else { return };
    let c = Caisson::new();
    let out = c.ok(&["run", "--rm", &g, "args", "a b", "--flag"]);
    assert_eq!(out, "caisson-guest.wasm\nargs\na b\n--flag\n");
    let out = c.ok(&[
        "run",
        "--rm",
        "-e",
        "GREETING=hi",
        "-e",
        "ANSWER=42",
        &g,
        "env",
    ]);
    assert_eq!(out, "ANSWER=42\nGREETING=hi\n");

    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in.txt"), "from the host\n").unwrap();
    let vol = format!("{}:/data", data.path().display());
    let out = c.ok(&["run", "--rm", "-v", &vol, &g, "cat", "/data/in.txt"]);
    assert_eq!(out, "from the host\n");
    c.ok(&[
        "run",
        "--rm",
        "-v",
        &vol,
        &g,
        "write",
        "/data/out.txt",
        "guest wrote",
    ]);
    assert_eq!(
        std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
        "guest wrote"
    );
    // Read-only volumes refuse writes.
    let ro = format!("{}:/data:ro", data.path().display());
    let (code, _, err) = c.run(&["run", "--rm", "-v", &ro, &g, "write", "/data/x", "no"]);
    assert_eq!(code, 3, "{err}");
    assert!(!data.path().join("x").exists());

    // Without volumes the guest's `/` is the task's sandbox.
    c.ok(&[
        "run",
        "--name",
        "sb",
        &g,
        "write",
        "/note.txt",
        "in the sandbox",
    ]);
    let dir = PathBuf::from(inspect(&c, "sb")["dir"].as_str().unwrap().to_string());
    assert_eq!(
        std::fs::read_to_string(dir.join("sandbox/note.txt")).unwrap(),
        "in the sandbox"
    );

    // stdout and stderr go to the task's logs.
    let (code, out, err) = c.run(&["run", "--name", "streams", &g, "streams"]);
    assert_eq!(code, 0);
    assert_eq!(out, "to stdout\n");
    assert!(err.contains("to stderr"), "{err}");
    let dir = PathBuf::from(inspect(&c, "streams")["dir"].as_str().unwrap().to_string());
    assert_eq!(
        std::fs::read_to_string(dir.join("stdout.log")).unwrap(),
        "to stdout\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("stderr.log")).unwrap(),
        "to stderr\n"
    );
    let out = c.cmd().args(["logs", "streams"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to stdout\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to stderr\n");
    c.ok(&["rm", "sb", "streams"]);
}

#[test]
fn exit_codes_traps_memory_limit_and_timeout() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    if let Some(g) = rust_guest() {
        let (code, _, _) = c.run(&["run", "--name", "seven", &g, "exit", "7"]);
        assert_eq!(code, 7);
        let v = inspect(&c, "seven");
        assert_eq!(v["state"]["exit_code"], 7);
        assert!(v["state"]["reason"].is_null());
    }

    let (code, _, err) = c.run(&["run", "--name", "trap", &guest("trap.wat")]);
    assert_eq!(code, 134, "{err}");
    assert!(err.contains("unreachable"), "{err}");
    let st = &inspect(&c, "trap")["state"];
    assert_eq!(st["exit_code"], 134);
    assert!(
        st["reason"].as_str().unwrap().contains("unreachable"),
        "{st}"
    );
    let logs = c.cmd().args(["logs", "trap"]).output().unwrap();
    assert!(String::from_utf8_lossy(&logs.stderr).contains("unreachable"));

    let (code, _, err) = c.run(&[
        "run",
        "--name",
        "grow",
        "--memory",
        "2m",
        &guest("grow.wat"),
    ]);
    assert_eq!(code, 137, "{err}");
    let st = &inspect(&c, "grow")["state"];
    assert_eq!(st["reason"], "memory limit", "{st}");
    assert_eq!(st["oom_killed"], true);
    assert!(st["error"].as_str().unwrap().contains("2097152"), "{st}");

    let t0 = Instant::now();
    let (code, _, err) = c.run(&[
        "run",
        "--name",
        "spin",
        "--timeout",
        "0.5",
        &guest("loop.wat"),
    ]);
    assert_eq!(code, 124, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let st = &inspect(&c, "spin")["state"];
    assert!(
        st["reason"].as_str().unwrap().starts_with("timeout"),
        "{st}"
    );
    // The loop ran on the CPU, and the task's cgroup accounted for it.
    assert!(
        st["usage"]["cpu_ns"].as_u64().unwrap() > 100_000_000,
        "{st}"
    );

    // --timeout is for Wasm tasks only.
    let (code, _, err) = c.run(&["run", "--rootfs", "--timeout", "1", "/", "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("Wasm tasks only"), "{err}");
}

#[test]
fn kill_stop_and_wait_stop_an_infinite_loop() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    let id = c.ok(&["run", "-d", "--name", "spin", &guest("loop.wat")]);
    let id = id.trim();
    assert_eq!(id.len(), 64);
    wait_status(&c, "spin", "running");
    assert!(c.ok(&["ps"]).contains("spin"));
    c.ok(&["kill", "spin"]);
    let v = wait_status(&c, "spin", "exited");
    assert_eq!(v["state"]["exit_code"], 137);
    assert_eq!(v["state"]["reason"], "killed by signal 9");
    assert_eq!(c.ok(&["wait", "spin"]).trim(), "137");

    c.ok(&["run", "-d", "--name", "spin2", &guest("loop.wat")]);
    let v = wait_status(&c, "spin2", "running");
    // The task process starts with its threads on one CPU (copy-on-write faults after the fork
    // then need no TLB-flush interrupts) and lets go of it 20 ms later: a long guest runs on
    // any CPU it was allowed, as this test's process may.
    let pid = v["state"]["pid"].as_i64().unwrap();
    let allowed = |status: &Path| {
        std::fs::read_to_string(status)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list:"))
            .map(str::to_string)
    };
    let ours = allowed(Path::new("/proc/self/status")).unwrap();
    caisson_tests::eventually("the task's threads on all the CPUs they may use", || {
        let threads: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|t| allowed(&t.path().join("status")))
            .collect();
        !threads.is_empty() && threads.iter().all(|a| a.as_deref() == Some(ours.as_str()))
    });
    c.ok(&["stop", "-t", "1", "spin2"]);
    let v = inspect(&c, "spin2");
    assert_eq!(v["state"]["status"], "exited");
    // SIGTERM interrupts the guest at its next epoch check; reported like a native task
    // ended by SIGTERM: 128 + 15.
    assert_eq!(v["state"]["exit_code"], 143);
    assert_eq!(v["state"]["reason"], "terminated by SIGTERM");
    assert_eq!(v["state"]["signal"], 15);
    c.ok(&["rm", "spin", "spin2"]);
    assert!(containers(&c).is_empty());
}

#[test]
fn wasm_task_survives_kill_9_of_its_launcher() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    let mut launcher = c
        .cmd()
        .args(["run", "--name", "orphan", &guest("loop.wat")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let v = wait_status(&c, "orphan", "running");
    let pid = v["state"]["pid"].as_i64().unwrap() as i32;
    launcher.kill().unwrap(); // SIGKILL
    launcher.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let v = inspect(&c, "orphan");
    assert_eq!(v["state"]["status"], "running", "{v}");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let ps = c.ok(&["ps"]);
    assert!(ps.contains("orphan"), "{ps}");
    c.ok(&["stop", "-t", "0", "orphan"]);
    let v = inspect(&c, "orphan");
    assert_eq!(v["state"]["status"], "exited");
    assert_eq!(v["state"]["exit_code"], 137);
    c.ok(&["rm", "orphan"]);
}

/// The session id (field 6 of /proc/PID/stat) and the executable of a process.
fn session_and_exe(pid: i64) -> (i64, PathBuf) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let sid = rest.split_whitespace().nth(3).unwrap().parse().unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    (sid, exe)
}

#[test]
fn a_wasm_command_runs_in_forks_of_the_launcher_or_through_the_shim() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    // The first run of a module (a new root: nothing cached) compiles it on threads that stay
    // in the launcher, which then does not fork: caisson-shim execs caisson-wasm.
    c.ok(&["run", "-d", "--name", "first", &guest("loop.wat")]);
    let v = wait_status(&c, "first", "running");
    let (_, shim_exe) = session_and_exe(v["state"]["shim_pid"].as_i64().unwrap());
    assert_eq!(name(&shim_exe), "caisson-shim");
    c.ok(&["rm", "-f", "first"]);
    // Then (compiled, cached): the supervisor and the task process are forks of `caisson`
    // itself (no program started), the supervisor in a session of its own, the task in the
    // task's cgroup.
    c.ok(&["run", "-d", "--name", "forked", &guest("loop.wat")]);
    let v = wait_status(&c, "forked", "running");
    let (pid, shim) = (
        v["state"]["pid"].as_i64().unwrap(),
        v["state"]["shim_pid"].as_i64().unwrap(),
    );
    assert_ne!(pid, shim);
    let (shim_sid, shim_exe) = session_and_exe(shim);
    let (_, task_exe) = session_and_exe(pid);
    assert_eq!(shim_sid, shim, "the supervisor leads its own session");
    assert_eq!(name(&shim_exe), "caisson");
    assert_eq!(name(&task_exe), "caisson");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let id = v["id"].as_str().unwrap();
    assert!(cgroup.contains(id), "{cgroup}");
    c.ok(&["stop", "-t", "5", "forked"]);
    let v = inspect(&c, "forked");
    assert_eq!(v["state"]["exit_code"], 143, "{v}");
    assert_eq!(v["state"]["reason"], "terminated by SIGTERM");

    // CAISSON_WASM_SUPERVISOR=shim: caisson-shim execs caisson-wasm, same records and output.
    let out = c
        .cmd()
        .env("CAISSON_WASM_SUPERVISOR", "shim")
        .args(["run", "-d", "--name", "shimmed", &guest("loop.wat")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = wait_status(&c, "shimmed", "running");
    let (_, task_exe) = session_and_exe(v["state"]["pid"].as_i64().unwrap());
    let (_, shim_exe) = session_and_exe(v["state"]["shim_pid"].as_i64().unwrap());
    assert_eq!(name(&task_exe), "caisson-wasm");
    assert_eq!(name(&shim_exe), "caisson-shim");
    c.ok(&["kill", "shimmed"]);
    let v = wait_status(&c, "shimmed", "exited");
    assert_eq!(v["state"]["exit_code"], 137);
    let out = c
        .cmd()
        .env("CAISSON_WASM_SUPERVISOR", "shim")
        .args(["run", "--rm", &guest("hello.wat")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello, world\n");
    c.ok(&["rm", "forked", "shimmed"]);
    assert!(containers(&c).is_empty(), "{:?}", containers(&c));
    // Nothing of theirs is left in the cgroup tree (v1 or v2).
    for dir in ["cpuacct/caisson", "memory/caisson", "caisson"] {
        let p = Path::new("/sys/fs/cgroup").join(dir).join(id);
        assert!(!p.exists(), "{} is left", p.display());
    }
}

/// Writes `text` as a `.wat` file in `dir`.
fn wat(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<(String, i32, &str)> = vec![
        (
            {
                let p = d.path().join("not.wasm");
                std::fs::write(&p, "#!/bin/sh\necho hi\n").unwrap();
                p.to_string_lossy().into_owned()
            },
            126,
            "not a WebAssembly module",
        ),
        (
            d.path().join("missing.wasm").to_string_lossy().into_owned(),
            127,
            "No such file",
        ),
        (
            wat(
                d.path(),
                "old.wat",
                r#"(module (import "wasi_unstable" "fd_write" (func (param i32 i32 i32 i32) (result i32))) (func (export "_start")))"#,
            ),
            126,
            "wasi_unstable",
        ),
        (
            wat(d.path(), "noexport.wat", "(module (memory 1))"),
            126,
            "no `_start`",
        ),
        (
            wat(
                d.path(),
                "reactor.wat",
                r#"(module (func (export "_initialize")))"#,
            ),
            126,
            "reactor",
        ),
        (
            wat(
                d.path(),
                "env.wat",
                r#"(module (import "env" "host_magic" (func)) (func (export "_start")))"#,
            ),
            126,
            "env::host_magic",
        ),
        (
            wat(
                d.path(),
                "p1missing.wat",
                r#"(module (import "wasi_snapshot_preview1" "no_such_call" (func)) (func (export "_start")))"#,
            ),
            126,
            "wasi_snapshot_preview1::no_such_call",
        ),
    ];
    for (path, want, msg) in cases {
        let (code, _, err) = c.run(&["run", &path]);
        assert_eq!(code, want, "{path}: {err}");
        assert!(err.contains(msg), "{path}: {err:?} lacks {msg:?}");
    }
    assert!(containers(&c).is_empty(), "{:?}", containers(&c));
    assert!(
        !c.root.path().join("rootfs").exists()
            || std::fs::read_dir(c.root.path().join("rootfs"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// Pushes a hand-made OCI layout to the registry with skopeo.
fn push(reg: &Registry, layout: &Path, tag: &str, repo_tag: &str) {
    reg.push(
        &format!("oci:{}:{tag}", layout.display()),
        repo_tag,
        "oci",
        None,
    )
    .unwrap();
}

/// A one-layer artifact: `config_type`/`config` and the module as the layer.
fn artifact(
    w: &LayoutWriter,
    config_type: &str,
    config: &[u8],
    layer_type: &str,
    module: &[u8],
    tag: &str,
) {
    let (cd, cs) = w.blob(config).unwrap();
    let (ld, ls) = w.blob(module).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": config_type, "digest": cd, "size": cs},
        "layers": [{"mediaType": layer_type, "digest": ld, "size": ls}],
    });
    let (md, ms) = w.blob(&serde_json::to_vec(&manifest).unwrap()).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(
        w.dir.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

fn hello_wasm() -> Vec<u8> {
    wat::parse_file(guest("hello.wat")).unwrap()
}

#[test]
fn wasm_images_from_a_registry() {
    if !require_root() || !require_tool("docker-registry") || !require_tool("skopeo") {
        return;
    }
    let reg = Registry::start().unwrap();
    let module = hello_wasm();
    let d = tempfile::tempdir().unwrap();

    // containerd/runwasi: a Wasm layer in an ordinary OCI manifest.
    let w = LayoutWriter::new(&d.path().join("runwasi")).unwrap();
    let config = serde_json::json!({"architecture": "wasm", "os": "wasi",
        "rootfs": {"type": "layers", "diff_ids": []}});
    artifact(
        &w,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
        "application/vnd.wasm.content.layer.v1+wasm",
        &module,
        "v1",
    );
    push(&reg, &w.dir, "v1", "wasm/runwasi:v1");

    // CNCF Wasm OCI artifact: its own config type, `application/wasm` layer.
    let w = LayoutWriter::new(&d.path().join("cncf")).unwrap();
    let config = serde_json::json!({"architecture": "wasm", "os": "wasip1",
        "layerDigests": [caisson_tests::sha256(&module)]});
    artifact(
        &w,
        "application/vnd.wasm.config.v0+json",
        &serde_json::to_vec(&config).unwrap(),
        "application/wasm",
        &module,
        "v1",
    );
    push(&reg, &w.dir, "v1", "wasm/cncf:v1");

    // podman/crun: a `wasi/wasm` image of tar layers whose entrypoint names the module.
    let w = LayoutWriter::new(&d.path().join("platform")).unwrap();
    let desc = w
        .wasi_image("/app/hello.wasm", &module, &["FROM_IMAGE=1"])
        .unwrap();
    // Behind an index that offers only wasi/wasm: caisson picks it without --platform.
    w.index(vec![desc], "v1", true).unwrap();
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", w.dir.display()))
        .arg(format!("docker://{}/wasm/platform:v1", reg.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let c = Caisson::new();
    for repo in ["runwasi", "cncf", "platform"] {
        let image = format!("{}/wasm/{repo}:v1", reg.addr);
        // `run` pulls a missing image, as podman does; the second run uses the store.
        for _ in 0..2 {
            let (code, out, err) = c.run(&["run", "--rm", &image]);
            assert_eq!((code, out.as_str()), (0, "hello, world\n"), "{repo}: {err}");
        }
    }
    // `pull` stores them too, and `rmi` removes them with their layers.
    c.ok(&["rmi", &format!("{}/wasm/cncf:v1", reg.addr)]);
    c.ok(&["pull", &format!("{}/wasm/cncf:v1", reg.addr)]);
    let images = c.images_json();
    assert_eq!(images.len(), 3, "{images:?}");
    for repo in ["runwasi", "cncf", "platform"] {
        c.ok(&["rmi", &format!("{}/wasm/{repo}:v1", reg.addr)]);
    }
    assert_eq!(c.layer_count(), 0);
}

/// The wasi:http guest (a wasm32-wasip2 component), built once; `None` (skip) if the target is
/// missing, a failure under CI.
fn http_guest() -> Option<String> {
    static G: OnceLock<Option<String>> = OnceLock::new();
    G.get_or_init(|| {
        caisson_tests::build_guest("http-guest", "wasm32-wasip2", "caisson_http_guest.wasm")
            .map(|p| p.to_string_lossy().into_owned())
    })
    .clone()
}

/// One HTTP/1.1 request over loopback; returns (status, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Chunked bodies: keep the data lines only.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n.min(after.len())]);
            rest = after.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        body.to_string()
    };
    Ok((status, body))
}

#[test]
fn wasi_http_service_answers_on_its_port() {
    if !require_root() {
        return;
    }
    let Some(g) = http_guest() else { return };
    let c = Caisson::new();
    // The first start compiles the component (seconds in a debug build).
    let port = start_service(&c, &g, "web", &["-e", "GREETING=hi"]);
    // A fresh instance per request: every request is answered, in any order.
    for i in 0..20 {
        let (status, body) = http_get(port, &format!("/req/{i}?q=1")).unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, format!("hello from wasi:http GET /req/{i}?q=1\n"));
    }
    assert_eq!(http_get(port, "/env/GREETING").unwrap(), (200, "hi".into()));
    // A trapping request fails alone; the service keeps serving.
    let (status, _) = http_get(port, "/trap").unwrap();
    assert_eq!(status, 500);
    assert_eq!(http_get(port, "/").unwrap().0, 200);
    let logs = c.cmd().args(["logs", "web"]).output().unwrap();
    let err = String::from_utf8_lossy(&logs.stderr);
    assert!(err.contains("trap requested"), "{err}");
    assert!(c.ok(&["ps"]).contains("web"));
    c.ok(&["stop", "-t", "1", "web"]);
    assert!(http_get(port, "/").is_err());
    c.ok(&["rm", "web"]);

    // A command is not a service, and a service is not a command.
    let (code, _, err) = c.run(&["run", "--rm", &g]);
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("wasi:http components are served"), "{err}");
}

/// A WASI p1 command that writes `line\n` to stdout forever.
const WRITER_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "line\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 5))
    (loop $l
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $l))))"#;

#[test]
fn sigterm_stops_a_command_between_instructions() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    let d = tempfile::tempdir().unwrap();
    let writer = wat(d.path(), "writer.wat", WRITER_WAT);
    c.ok(&["run", "-d", "--name", "writer", &writer]);
    wait_status(&c, "writer", "running");
    // Let it write for a while, then stop it with plenty of grace: SIGTERM alone must end it.
    std::thread::sleep(Duration::from_millis(300));
    c.ok(&["stop", "-t", "30", "writer"]);
    let v = inspect(&c, "writer");
    assert_eq!(v["state"]["exit_code"], 143, "{v}");
    assert_eq!(v["state"]["reason"], "terminated by SIGTERM", "{v}");
    assert_eq!(v["state"]["signal"], 15);
    // The guest was stopped between writes: the log is whole lines only.
    let log = c.ok(&["logs", "writer"]);
    assert!(log.len() > 5, "nothing written");
    assert!(log.ends_with("line\n"));
    assert!(log.lines().all(|l| l == "line"), "a torn write in the log");
    c.ok(&["rm", "writer"]);

    // Blocked in a host call (sleeping), it never reaches an epoch check: the host ends the
    // task itself shortly after SIGTERM, with the same report, long before the SIGKILL.
    let Some(g) = rust_guest() else { return };
    c.ok(&["run", "-d", "--name", "sleeper", &g, "sleep", "600000"]);
    wait_status(&c, "sleeper", "running");
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    c.ok(&["stop", "-t", "60", "sleeper"]);
    let v = inspect(&c, "sleeper");
    assert_eq!(v["state"]["exit_code"], 143, "{v}");
    assert_eq!(v["state"]["reason"], "terminated by SIGTERM", "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(50),
        "it waited for SIGKILL"
    );
    c.ok(&["rm", "sleeper"]);
    assert!(containers(&c).is_empty());
}

/// Starts the wasi:http guest as `name` with `extra` flags on a free port and waits until it
/// answers; returns the port.
fn start_service(c: &Caisson, g: &str, name: &str, extra: &[&str]) -> u16 {
    let port = caisson_tests::free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let mut args = vec!["run", "-d", "--name", name, "-p", &publish];
    args.extend_from_slice(extra);
    args.push(g);
    c.ok(&args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(port, "/").is_err() {
        assert!(Instant::now() < deadline, "service never answered");
        let st = inspect(c, name);
        if st["state"]["status"] != "running" {
            // Say why (a flake once ended the host before its first answer).
            let (_, out, err) = c.run(&["logs", name]);
            panic!("{name} ended before answering: {st}\nlogs: {out}{err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    port
}

/// A keep-alive HTTP/1.1 client connection.
struct KeepAlive(std::io::BufReader<std::net::TcpStream>);

impl KeepAlive {
    fn connect(port: u16) -> Self {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self(std::io::BufReader::new(s))
    }

    /// One request on this connection; returns (status, body).
    fn get(&mut self, path: &str) -> (u16, String) {
        use std::io::{BufRead, Read, Write};
        write!(
            self.0.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        .unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            self.0.read_line(&mut line).unwrap();
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(n) = l.strip_prefix("content-length:") {
                length = Some(n.trim().parse::<usize>().unwrap());
            }
            chunked |= l == "transfer-encoding: chunked";
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.0.read_line(&mut line).unwrap();
                let n = usize::from_str_radix(line.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                self.0.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            let mut b = vec![0; length.expect("no length, not chunked")];
            self.0.read_exact(&mut b).unwrap();
            body = b;
        }
        (status, String::from_utf8(body).unwrap())
    }
}

#[test]
fn wasi_http_service_starts_a_worker_thread_only_for_overlapping_connections() {
    if !require_root() {
        return;
    }
    let Some(g) = http_guest() else { return };
    let c = Caisson::new();
    let port = caisson_tests::free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let out = c
        .cmd()
        .env("CAISSON_WASM_HTTP_THREADS", "2")
        .args(["run", "-d", "--name", "threads", "-p", &publish, &g])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(port, "/").is_err() {
        assert!(Instant::now() < deadline, "service never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = inspect(&c, "threads")["state"]["pid"].as_i64().unwrap();
    let workers = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|n| n.trim() == "wasm-http")
            })
            .count()
    };
    let hello = |path: &str| (200, format!("hello from wasi:http GET {path}\n"));
    // One client at a time: the service keeps its one thread.
    for i in 0..5 {
        let path = format!("/one/{i}");
        assert_eq!(http_get(port, &path).unwrap(), hello(&path));
    }
    assert_eq!(workers(), 0);
    // A second connection while the first is open goes to a worker thread; both go on serving.
    let mut a = KeepAlive::connect(port);
    assert_eq!(a.get("/a"), hello("/a"));
    let mut b = KeepAlive::connect(port);
    assert_eq!(b.get("/b"), hello("/b"));
    assert_eq!(workers(), 1);
    for i in 0..3 {
        assert_eq!(a.get(&format!("/a/{i}")), hello(&format!("/a/{i}")));
        assert_eq!(b.get(&format!("/b/{i}")), hello(&format!("/b/{i}")));
    }
    // No more threads than asked for.
    let mut third = KeepAlive::connect(port);
    assert_eq!(third.get("/c"), hello("/c"));
    assert_eq!(workers(), 1);
    // Its connections closed, the worker ends after an idle while (seconds); the service goes
    // on with one thread and starts a worker again when connections overlap again.
    drop((a, b, third));
    let deadline = Instant::now() + Duration::from_secs(60);
    while workers() > 0 {
        assert!(Instant::now() < deadline, "the idle worker never ended");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http_get(port, "/again").unwrap(), hello("/again"));
    let mut a = KeepAlive::connect(port);
    let mut b = KeepAlive::connect(port);
    assert_eq!(a.get("/a"), hello("/a"));
    assert_eq!(b.get("/b"), hello("/b"));
    assert_eq!(workers(), 1);
    // A graceful stop closes the idle keep-alive connections of every thread.
    c.ok(&["stop", "-t", "20", "threads"]);
    let v = inspect(&c, "threads");
    assert_eq!(v["state"]["exit_code"], 0, "{v}");
    c.ok(&["rm", "threads"]);
}

#[test]
fn wasi_http_service_stops_gracefully_on_sigterm() {
    if !require_root() {
        return;
    }
    let Some(g) = http_guest() else { return };
    let c = Caisson::new();
    let port = start_service(&c, &g, "graceful", &[]);
    // A request in flight when SIGTERM arrives is answered in full.
    let slow = std::thread::spawn(move || http_get(port, "/sleep/2000"));
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    c.ok(&["stop", "-t", "60", "graceful"]);
    let (status, body) = slow
        .join()
        .unwrap()
        .expect("the request in flight was cut off");
    assert_eq!(status, 200);
    assert_eq!(body, "hello from wasi:http GET /sleep/2000\n");
    let v = inspect(&c, "graceful");
    assert_eq!(v["state"]["exit_code"], 0, "{v}");
    assert!(v["state"]["signal"].is_null(), "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(50),
        "it waited for SIGKILL"
    );
    assert!(http_get(port, "/").is_err(), "still accepting");
    let logs = c.cmd().args(["logs", "graceful"]).output().unwrap();
    let err = String::from_utf8_lossy(&logs.stderr);
    assert!(err.contains("SIGTERM"), "{err}");
    c.ok(&["rm", "graceful"]);
    assert!(containers(&c).is_empty());
}

#[test]
fn wasi_http_request_deadline_and_memory_limit_per_request() {
    if !require_root() {
        return;
    }
    let Some(g) = http_guest() else { return };
    let c = Caisson::new();
    let port = start_service(&c, &g, "limited", &["--timeout", "3", "--memory", "24m"]);
    // A guest computing forever is cut off at its deadline with a 504; meanwhile the service
    // answers other requests (the spinning guest yields at every epoch tick).
    let spin = std::thread::spawn(move || http_get(port, "/loop"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http_get(port, "/").unwrap().0, 200);
    assert!(!spin.is_finished(), "the spinning request ended too early");
    let (status, body) = spin.join().unwrap().unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timed out after 3000 ms"), "{body}");
    // Blocked in a host call past the deadline: the same.
    let (status, _) = http_get(port, "/sleep/20000").unwrap();
    assert_eq!(status, 504);
    // --memory bounds each request's instance: 8 MiB fits, 64 MiB does not; the service lives.
    assert_eq!(http_get(port, "/alloc/8").unwrap().0, 200);
    let (status, body) = http_get(port, "/alloc/64").unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("memory limit"), "{body}");
    assert_eq!(http_get(port, "/alloc/8").unwrap().0, 200);
    assert_eq!(
        http_get(port, "/x").unwrap(),
        (200, "hello from wasi:http GET /x\n".into())
    );
    assert_eq!(inspect(&c, "limited")["state"]["status"], "running");
    let logs = c.cmd().args(["logs", "limited"]).output().unwrap();
    let err = String::from_utf8_lossy(&logs.stderr);
    assert!(err.contains("timed out after 3000 ms"), "{err}");
    assert!(err.contains("memory limit"), "{err}");
    c.ok(&["rm", "-f", "limited"]);
    assert!(containers(&c).is_empty());
}
