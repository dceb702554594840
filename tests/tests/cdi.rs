//! CDI devices in real containers: spec files (JSON and YAML) written into a private spec
//! directory (`--cdi-spec-dir`), device nodes made with mknod in a temp dir as their
//! `hostPath` (char 42:N, the "demo" major no driver registers: an allowed node opens with
//! ENXIO, a denied one with EPERM), and NVIDIA GPUs through the fake NVML of the GPU tests.
use caisson_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const FAKE_NVML: &str = env!("FAKE_NVML_LIB");
const ENXIO: &str = "No such device or address";
const EPERM: &str = "Operation not permitted";

struct Host {
    c: Caisson,
    image: String,
    tmp: tempfile::TempDir,
    specs: PathBuf,
}

fn mknod(path: &Path, major: u32, minor: u32) {
    let st = Command::new("mknod")
        .arg(path)
        .args(["c", &major.to_string(), &minor.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "mknod {}", path.display());
}

impl Host {
    fn new() -> Option<Host> {
        if !require_root() || !require_tool("umoci") {
            return None;
        }
        let c = Caisson::new();
        let tmp = tempfile::Builder::new()
            .prefix("caisson-cdi")
            .tempdir()
            .unwrap();
        let layout = busybox_layout(tmp.path(), "cdi").unwrap();
        c.ok(&["load", "-i", &format!("{}:cdi", layout.display())]);
        let specs = tmp.path().join("specs");
        std::fs::create_dir(&specs).unwrap();
        Some(Host {
            c,
            image: "localhost/oci:cdi".into(),
            tmp,
            specs,
        })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn spec(&self, name: &str, body: &str) {
        std::fs::write(self.specs.join(name), body).unwrap();
    }

    fn cmd(&self) -> Command {
        let mut c = self.c.cmd();
        c.arg("--cdi-spec-dir")
            .arg(&self.specs)
            .env("CAISSON_NVML_LIB", FAKE_NVML)
            .env("FAKE_NVML_GPUS", "3")
            .env_remove("CAISSON_GPUS")
            .env_remove("CAISSON_CDI_SPEC_DIRS");
        c
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let o = self.cmd().args(args).output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "caisson {args:?}: {out}{err}");
        out
    }

    /// Runs and expects a launch error (125) whose message contains `want`; nothing is left.
    fn refused(&self, args: &[&str], want: &str) {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 125, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in: {err}");
        self.nothing_left();
    }

    fn nothing_left(&self) {
        assert_eq!(self.ok(&["ps", "-aq"]), "", "no container left");
        let rootfs = self.c.root.path().join("rootfs");
        let left: Vec<_> = std::fs::read_dir(&rootfs)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "root filesystems left: {left:?}");
        assert_eq!(
            self.allocations(),
            Vec::<Value>::new(),
            "GPU allocations left"
        );
    }

    /// The allocator's record as it is on disk (reading it through `caisson gpus` would
    /// reclaim the allocations of ended tasks on the way).
    fn allocations(&self) -> Vec<Value> {
        let p = self.c.root.path().join("gpus/allocations.json");
        match std::fs::read(&p) {
            Ok(d) => serde_json::from_slice::<Value>(&d).unwrap()["allocations"]
                .as_array()
                .unwrap()
                .clone(),
            Err(_) => vec![],
        }
    }

    fn holders(&self) -> Vec<Option<String>> {
        let v: Vec<Value> = serde_json::from_str(&self.ok(&["gpus", "--json"])).unwrap();
        v.iter()
            .map(|g| g["task"].as_str().map(String::from))
            .collect()
    }
}

/// The YAML spec of `example.com/dev`: two devices (nodes 42:1 and 42:2), a read-only bind
/// mount and env for the spec, env and node ownership for device `a`.
fn dev_yaml(h: &Host) -> String {
    let nodes = h.path("nodes");
    std::fs::create_dir_all(&nodes).unwrap();
    mknod(&nodes.join("a"), 42, 1);
    mknod(&nodes.join("b"), 42, 2);
    let share = h.path("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("hello"), "hello from the host\n").unwrap();
    format!(
        r#"cdiVersion: 0.6.0
kind: example.com/dev
annotations:
  origin: caisson-tests
containerEdits:
  env:
  - CDI_SPEC=yes
  mounts:
  - hostPath: {share}
    containerPath: /opt/cdi
    options: [ro, nosuid, nodev, bind]
devices:
- name: a
  containerEdits:
    env:
    - CDI_DEV=a
    deviceNodes:
    - path: /dev/cdi-a
      hostPath: {nodes}/a
      permissions: rw
      fileMode: 0640
      gid: 44
- name: b
  containerEdits:
    deviceNodes:
    - path: /dev/cdi-b
      hostPath: {nodes}/b
"#,
        share = share.display(),
        nodes = nodes.display()
    )
}

const PROBE: &str =
    "echo \"E=$CDI_SPEC,$CDI_DEV\"; ls /dev | busybox grep cdi | busybox tr '\\n' ' '; echo; \
    cat /dev/cdi-a 2>&1; busybox mknod /dev/other c 42 2 && cat /dev/other 2>&1; \
    cat /opt/cdi/hello; busybox touch /opt/cdi/x 2>&1; busybox stat -c %a:%g /dev/cdi-a";

fn check_probe(out: &str) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "E=yes,a", "{out}");
    assert_eq!(lines[1], "cdi-a ", "only the asked-for node: {out}");
    assert!(
        lines[2].contains("/dev/cdi-a") && lines[2].contains(ENXIO),
        "allowed: {out}"
    );
    assert!(
        lines[3].contains("/dev/other") && lines[3].contains(EPERM),
        "denied by the device cgroup: {out}"
    );
    assert_eq!(lines[4], "hello from the host", "{out}");
    assert!(lines[5].contains("Read-only file system"), "{out}");
    assert_eq!(lines[6], "640:44", "fileMode and gid: {out}");
}

#[test]
fn root_cdi_yaml_device_node_env_mount_and_cgroup() {
    let Some(h) = Host::new() else { return };
    h.spec("dev.yaml", &dev_yaml(&h));
    let (code, out, err) = h.run(&[
        "run",
        "--rm",
        "--device",
        "example.com/dev=a",
        &h.image,
        "sh",
        "-c",
        PROBE,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    check_probe(&out);

    // The same spec as JSON: the same container.
    std::fs::remove_file(h.specs.join("dev.yaml")).unwrap();
    let nodes = h.path("nodes");
    let share = h.path("share");
    h.spec(
        "dev.json",
        &serde_json::json!({
            "cdiVersion": "0.5.0",
            "kind": "example.com/dev",
            "containerEdits": {
                "env": ["CDI_SPEC=yes"],
                "mounts": [{"hostPath": share, "containerPath": "/opt/cdi",
                            "options": ["ro", "nosuid", "nodev", "rbind"]}],
            },
            "devices": [
                {"name": "a", "containerEdits": {
                    "env": ["CDI_DEV=a"],
                    "deviceNodes": [{"path": "/dev/cdi-a", "hostPath": nodes.join("a"),
                                     "permissions": "rw", "fileMode": 0o640, "gid": 44}]}},
                {"name": "b", "containerEdits": {
                    "deviceNodes": [{"path": "/dev/cdi-b", "hostPath": nodes.join("b")}]}},
            ]
        })
        .to_string(),
    );
    let (code, out, err) = h.run(&[
        "run",
        "--rm",
        "--device",
        "example.com/dev=a",
        &h.image,
        "sh",
        "-c",
        PROBE,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    check_probe(&out);

    // `=all` gives both; `devices` lists them.
    let (code, out, err) = h.run(&[
        "run",
        "--rm",
        "--device",
        "example.com/dev=all",
        &h.image,
        "sh",
        "-c",
        "ls /dev | busybox grep cdi | busybox tr '\\n' ' '; echo; cat /dev/cdi-b 2>&1; true",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("cdi-a cdi-b \n") && out.contains(ENXIO),
        "{out}"
    );
    let v: Value = serde_json::from_str(&h.ok(&["devices", "--json"])).unwrap();
    let names: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["example.com/dev=a", "example.com/dev=b"]);
    let table = h.ok(&["devices"]);
    assert!(
        table.starts_with("DEVICE") && table.contains("dev.json"),
        "{table}"
    );

    // A plain host device, podman style, at another path with read-only access.
    let (code, out, err) = h.run(&[
        "run",
        "--rm",
        "--device",
        &format!("{}:/dev/plain:r", nodes.join("b").display()),
        &h.image,
        "sh",
        "-c",
        "cat /dev/plain 2>&1; (echo x > /dev/plain) 2>&1; true",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains(ENXIO), "read allowed: {out}");
    assert!(lines[1].contains(EPERM), "write denied: {out}");
    h.nothing_left();
}

/// Every hook point, with the OCI state on stdin, and the additional groups.
#[test]
fn root_cdi_hooks_and_additional_gids() {
    let Some(h) = Host::new() else { return };
    let log = h.path("hooks.log");
    let hook = |point: &str| {
        serde_json::json!({
            "hookName": point,
            "path": "/bin/sh",
            "args": ["sh", "-c",
                // The state on stdin; the bundle's config.json names the root filesystem.
                "read -r s; b=${s#*\\\"bundle\\\":\\\"}; b=${b%%\\\"*}; \
                 grep -q '\"root\"' \"$b/config.json\" && echo \"$0 $s\" >> \"$LOG\"",
                point],
            "env": [format!("LOG={}", log.display())],
        })
    };
    h.spec(
        "hooks.json",
        &serde_json::json!({
            "cdiVersion": "0.7.0",
            "kind": "example.com/hooks",
            "devices": [{"name": "h", "containerEdits": {
                "hooks": [hook("createRuntime"), hook("createContainer"), hook("poststart"),
                          hook("poststop"),
                          {"hookName": "startContainer", "path": "/bin/sh",
                           "args": ["sh", "-c", "echo started-inside > /started"]}],
                "additionalGids": [4242, 0],
            }}],
        })
        .to_string(),
    );
    let (code, out, err) = h.run(&[
        "run",
        "--rm",
        "--device",
        "example.com/hooks=h",
        &h.image,
        "sh",
        "-c",
        "cat /started; id -G",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "started-inside", "{out}");
    assert!(
        lines[1].split(' ').any(|g| g == "4242"),
        "additional gid: {out}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let points: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        points,
        ["createRuntime", "createContainer", "poststart", "poststop"],
        "{text}"
    );
    for (line, status) in text
        .lines()
        .zip(["creating", "created", "running", "stopped"])
    {
        let state: Value = serde_json::from_str(line.split_once(' ').unwrap().1).unwrap();
        assert_eq!(state["status"], status, "{line}");
        assert!(state["id"].as_str().unwrap().len() >= 12, "{line}");
    }
    h.nothing_left();
}

#[test]
fn root_cdi_bad_input_is_refused_and_leaves_nothing() {
    let Some(h) = Host::new() else { return };
    h.spec("dev.yaml", &dev_yaml(&h));
    let run = |dev: &str| -> Vec<String> {
        ["run", "--rm", "--device", dev, &h.image, "true"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let refused = |dev: &str, want: &str| {
        let args = run(dev);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        h.refused(&args, want);
    };
    refused(
        "example.com/dev=nope",
        "unknown CDI device example.com/dev=nope (kind example.com/dev has: a, b)",
    );
    refused(
        "example.com/other=a",
        "no CDI spec defines kind example.com/other",
    );
    refused("example.com/dev", "invalid CDI device name");

    // Malformed specs: the file and the field are named.
    h.spec(
        "bad.json",
        r#"{"cdiVersion":"0.6.0","kind":"example.com/bad","devices":[{"name":"-x"}]}"#,
    );
    refused(
        "example.com/bad=x",
        &format!(
            "invalid CDI spec {}: devices[0].name: invalid device name \"-x\"",
            h.specs.join("bad.json").display()
        ),
    );
    h.spec("bad.json", "cdiVersion: 0.6.0\ndevices:\n- name: x\n");
    std::fs::rename(h.specs.join("bad.json"), h.specs.join("bad.yaml")).unwrap();
    refused("example.com/bad=x", "missing field `kind`");
    std::fs::remove_file(h.specs.join("bad.yaml")).unwrap();
    h.spec(
        "old.json",
        r#"{"cdiVersion":"0.2.0","kind":"example.com/old","devices":[{"name":"x"}]}"#,
    );
    refused(
        "example.com/old=x",
        "cdiVersion: unsupported version \"0.2.0\"",
    );
    std::fs::remove_file(h.specs.join("old.json")).unwrap();

    // One device name in two files of one directory.
    let dup = r#"{"cdiVersion":"0.6.0","kind":"example.com/dup","devices":[{"name":"d"}]}"#;
    h.spec("dup1.json", dup);
    h.spec("dup2.json", dup);
    refused(
        "example.com/dup=d",
        "CDI device example.com/dup=d is defined by more than one spec file",
    );
    let listed = h.ok(&["devices"]);
    assert!(listed.contains("conflicts with"), "{listed}");

    // Missing resources at run time: a hook binary, a mount source, a device node.
    h.spec(
        "hook.json",
        r#"{"cdiVersion":"0.6.0","kind":"example.com/hook","devices":[{"name":"h",
            "containerEdits":{"hooks":[{"hookName":"createContainer","path":"/nonexistent/hook"}]}}]}"#,
    );
    refused(
        "example.com/hook=h",
        "createContainer hook /nonexistent/hook: No such file or directory",
    );
    h.spec(
        "hook.json",
        r#"{"cdiVersion":"0.6.0","kind":"example.com/hook","devices":[{"name":"h",
            "containerEdits":{"hooks":[{"hookName":"startContainer","path":"/not/in/task"}]}}]}"#,
    );
    refused(
        "example.com/hook=h",
        "startContainer hook /not/in/task: cannot run it",
    );
    h.spec(
        "hook.json",
        r#"{"cdiVersion":"0.6.0","kind":"example.com/hook","devices":[{"name":"h",
            "containerEdits":{"hooks":[{"hookName":"createRuntime","path":"/bin/false"}]}}]}"#,
    );
    refused("example.com/hook=h", "createRuntime hook /bin/false failed");
    h.spec(
        "mnt.json",
        r#"{"cdiVersion":"0.6.0","kind":"example.com/mnt","devices":[{"name":"m",
            "containerEdits":{"mounts":[{"hostPath":"/nonexistent/src","containerPath":"/m"}],
                              "deviceNodes":[{"path":"/dev/x","hostPath":"/nonexistent/node"}]}}]}"#,
    );
    refused(
        "example.com/mnt=m",
        "device node /dev/x: host device /nonexistent/node",
    );
    refused("/nonexistent/dev", "invalid --device \"/nonexistent/dev\"");

    // Wasm tasks have no devices.
    let wat = h.path("t.wat");
    std::fs::write(&wat, "(module (func (export \"_start\")))").unwrap();
    h.refused(
        &[
            "run",
            "--rm",
            "--device",
            "example.com/dev=a",
            wat.to_str().unwrap(),
        ],
        "--device does not apply to Wasm tasks",
    );
}

/// GPUs named by CDI devices count in the GPU allocator, and a detached GPU task that ends by
/// itself gives its GPU back at its exit (the supervisor's exit command).
#[test]
fn root_cdi_gpus_share_the_allocator_and_release_at_exit() {
    let Some(h) = Host::new() else { return };
    let nodes = h.path("nv");
    std::fs::create_dir_all(&nodes).unwrap();
    for i in 0..3 {
        mknod(&nodes.join(format!("nvidia{i}")), 195, i);
    }
    mknod(&nodes.join("nvidiactl"), 195, 255);
    // As `nvidia-ctk cdi generate` writes it: by index and by UUID, plus `all`.
    let mut devices = vec![];
    for i in 0..3 {
        let edits = serde_json::json!({"deviceNodes": [
            {"path": format!("/dev/nvidia{i}"), "hostPath": nodes.join(format!("nvidia{i}"))}]});
        devices.push(serde_json::json!({"name": i.to_string(), "containerEdits": edits}));
        devices.push(serde_json::json!({
            "name": format!("GPU-fa4e0000-0000-0000-0000-{i:012}"), "containerEdits": edits}));
    }
    h.spec(
        "nvidia.yaml",
        &serde_json::json!({
            "cdiVersion": "0.5.0",
            "kind": "nvidia.com/gpu",
            "containerEdits": {"deviceNodes": [
                {"path": "/dev/nvidiactl", "hostPath": nodes.join("nvidiactl")}]},
            "devices": devices,
        })
        .to_string(),
    );
    let a = h.ok(&[
        "run",
        "-d",
        "--device",
        "nvidia.com/gpu=0",
        &h.image,
        "sleep",
        "60",
    ]);
    let a = a.trim().to_string();
    assert_eq!(h.holders()[0].as_deref(), Some(a.as_str()));
    // --gpus skips the GPU the CDI device holds.
    let b = h.ok(&["run", "-d", "--gpus", "1", &h.image, "sleep", "60"]);
    let b = b.trim().to_string();
    assert_eq!(h.holders(), [Some(a.clone()), Some(b.clone()), None]);
    // ... and a CDI device (by UUID) cannot take a held GPU.
    let (code, _, err) = h.run(&[
        "run",
        "--rm",
        "--device",
        "nvidia.com/gpu=GPU-fa4e0000-0000-0000-0000-000000000001",
        &h.image,
        "true",
    ]);
    assert_eq!(code, 125);
    assert!(
        err.contains("GPU 1 (GPU-fa4e0000-0000-0000-0000-000000000001) is held by task"),
        "{err}"
    );
    let (code, _, err) = h.run(&["run", "--rm", "--gpus", "2", &h.image, "true"]);
    assert_eq!(code, 125);
    assert!(
        err.contains("cannot allocate 2 GPU(s): 1 of 3 free"),
        "{err}"
    );
    h.ok(&["rm", "-f", &a, &b]);
    assert_eq!(h.holders(), [None, None, None]);

    // Released at exit: the record on disk loses the allocation without anyone reading it.
    let id = h.ok(&[
        "run",
        "-d",
        "--gpus",
        "1",
        "--device",
        "nvidia.com/gpu=2",
        &h.image,
        "sh",
        "-c",
        "sleep 2; exit 3",
    ]);
    let id = id.trim().to_string();
    let held = h.allocations();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["gpus"].as_array().unwrap().len(), 2, "{held:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.allocations().iter().any(|a| a["task"] == id.as_str()) {
        assert!(Instant::now() < deadline, "{:?}", h.allocations());
        std::thread::sleep(Duration::from_millis(20));
    }
    h.ok(&["rm", &id]);
    h.nothing_left();
}

/// The cgroup v2 path (task born in its cgroup, BPF device program, the init waiting for the
/// createRuntime hooks before its own): on a hybrid host, in a private mount namespace where
/// the cgroup2 mount is bound over /sys/fs/cgroup, as the GPU tests do.
#[test]
fn root_cdi_on_the_v2_path_with_a_create_runtime_hook() {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let Some(h) = Host::new() else { return };
    if !unified.join("cgroup.procs").exists() {
        // A pure v2 host runs this path in the other tests already.
        assert!(
            containerizer::cgroups::is_v2() || std::env::var_os("CI").is_none(),
            "no cgroup2 mount to test the v2 path on"
        );
        return;
    }
    h.spec("dev.yaml", &dev_yaml(&h));
    let log = h.path("v2hooks.log");
    h.spec(
        "hooks.json",
        &serde_json::json!({
            "cdiVersion": "0.6.0",
            "kind": "example.com/hooks",
            "devices": [{"name": "h", "containerEdits": {"hooks": [
                {"hookName": "createRuntime", "path": "/bin/sh",
                 "args": ["sh", "-c", "echo createRuntime >> \"$LOG\""],
                 "env": [format!("LOG={}", log.display())]},
                {"hookName": "createContainer", "path": "/bin/sh",
                 "args": ["sh", "-c", "echo createContainer >> \"$LOG\""],
                 "env": [format!("LOG={}", log.display())]},
            ]}}],
        })
        .to_string(),
    );
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
    .arg("--cdi-spec-dir")
    .arg(&h.specs)
    .args([
        "run",
        "--rm",
        "--device",
        "example.com/dev=a",
        "--device",
        "example.com/hooks=h",
        &h.image,
        "sh",
        "-c",
        PROBE,
    ]);
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    check_probe(&out);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "createRuntime\ncreateContainer\n"
    );
    h.nothing_left();
}
