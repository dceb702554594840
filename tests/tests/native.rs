//! End-to-end tests of native Linux containers: they run the real `caisson` binary (build it
//! first: `cargo build -p caisson`) on a busybox root filesystem built in the test.
//!
//! They need root. Under `CI=true` they must run (they panic when not root); otherwise they are
//! skipped with a message.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use caisson_tests::caisson_bin;

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root and CI is set");
    }
    eprintln!("skipping {test}: needs root");
    false
}

/// A state root and a busybox root filesystem, both in a temporary directory.
struct Env {
    tmp: tempfile::TempDir,
    rootfs: PathBuf,
}

fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nwheel:x:10:app\nnogroup:x:65534:\n",
    )
    .unwrap();
    std::fs::write(dir.join("notexec"), "data").unwrap();
}

/// An OCI layout under `dir` with image `dev`: busybox and a character device node
/// (`/hostnull`, 1:3) in its layer.
fn image_with_device_node(dir: &Path) -> PathBuf {
    let layout = dir.join("oci");
    let img = format!("{}:dev", layout.display());
    let bundle = dir.join("bundle-dev");
    let umoci = |args: &[&str]| {
        let st = Command::new("umoci").args(args).status().unwrap();
        assert!(st.success(), "umoci {args:?}");
    };
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &img]);
    umoci(&["unpack", "--image", &img, bundle.to_str().unwrap()]);
    busybox_rootfs(&bundle.join("rootfs"));
    assert!(Command::new("mknod")
        .arg(bundle.join("rootfs/hostnull"))
        .args(["c", "1", "3"])
        .status()
        .unwrap()
        .success());
    umoci(&["repack", "--image", &img, bundle.to_str().unwrap()]);
    layout
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("caisson-native")
            .tempdir()
            .unwrap();
        let rootfs = tmp.path().join("rootfs");
        busybox_rootfs(&rootfs);
        Env { tmp, rootfs }
    }

    fn state_root(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(caisson_bin());
        c.arg("--root").arg(self.state_root()).args(args);
        c
    }

    fn caisson(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// `caisson run --rootfs ROOTFS <opts...> -- <cmd...>`
    fn run(&self, opts: &[&str], cmd: &[&str]) -> Output {
        let rootfs = self.rootfs.to_str().unwrap();
        let mut args = vec!["run"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["--rootfs", rootfs]);
        args.extend_from_slice(cmd);
        self.caisson(&args)
    }

    fn sh(&self, opts: &[&str], script: &str) -> Output {
        self.run(opts, &["sh", "-c", script])
    }

    fn inspect(&self, id: &str) -> Value {
        let out = self.caisson(&["inspect", id]);
        assert!(out.status.success(), "inspect {id}: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0].clone()
    }

    fn wait_status(&self, id: &str, want: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.caisson(&["inspect", id]);
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                if v[0]["state"]["status"] == want {
                    return v[0].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{id} never became {want}: {}",
                text(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn detached(env: &Env, opts: &[&str], script: &str) -> String {
    let mut o = vec!["-d"];
    o.extend_from_slice(opts);
    let out = env.sh(&o, script);
    stdout_ok(&out).trim().to_string()
}

#[test]
fn root_pid1_hostname_env_cwd() {
    if !root_or_skip("root_pid1_hostname_env_cwd") {
        return;
    }
    let env = Env::new();
    let envfile = env.tmp.path().join("envfile");
    std::fs::write(&envfile, "# comment\nFROMFILE=yes\n\n").unwrap();
    let out = env.sh(
        &[
            "--rm",
            "--hostname",
            "box1",
            "-e",
            "FOO=bar baz",
            "--env-file",
            envfile.to_str().unwrap(),
            "-w",
            "/work/dir",
        ],
        "echo pid=$$; hostname; cat /etc/hostname; echo foo=$FOO; echo file=$FROMFILE; pwd; echo home=$HOME; echo path=$PATH",
    );
    let s = stdout_ok(&out);
    assert!(s.contains("pid=1\n"), "{s}");
    assert!(s.contains("box1\nbox1\n"), "{s}");
    assert!(s.contains("foo=bar baz\n"), "{s}");
    assert!(s.contains("file=yes\n"), "{s}");
    assert!(s.contains("/work/dir\n"), "{s}");
    assert!(s.contains("home=/root\n"), "{s}");
    assert!(s.contains("path=/usr/local/sbin:"), "{s}");
    // Only stdin, stdout and stderr are open in the task (plus the fd ls uses to read the dir).
    // Even when the launcher inherited another descriptor (7 here).
    let out = Command::new("sh")
        .arg("-c")
        .arg("exec 7</etc/passwd; exec \"$0\" \"$@\"")
        .arg(caisson_bin())
        .arg("--root")
        .arg(env.state_root())
        .args(["run", "--rm", "--rootfs"])
        .arg(&env.rootfs)
        .args(["ls", "/proc/self/fd"])
        .output()
        .unwrap();
    let s = stdout_ok(&out);
    assert_eq!(s, "0\n1\n2\n3\n");
    // Only the task itself is visible in its pid namespace.
    let s = stdout_ok(&env.run(&["--rm"], &["ps", "-o", "pid,comm"]));
    assert_eq!(s.lines().count(), 2, "{s}");
}

#[test]
fn root_user_and_capabilities() {
    if !root_or_skip("root_user_and_capabilities") {
        return;
    }
    let env = Env::new();
    let s = stdout_ok(&env.sh(
        &["--rm", "-u", "app"],
        "id; grep -E 'Cap(Eff|Bnd)|NoNewPrivs' /proc/self/status",
    ));
    assert!(s.contains("uid=1000(app) gid=1000(app) groups="), "{s}");
    assert!(s.contains("1000(app)") && s.contains("10(wheel)"), "{s}");
    assert!(s.contains("CapEff:\t0000000000000000"), "{s}");
    assert!(s.contains("NoNewPrivs:\t1"), "{s}");
    let s = stdout_ok(&env.sh(&["--rm", "-u", "4242:77"], "id -u; id -g"));
    assert_eq!(s, "4242\n77\n");
    // Root gets docker's default set only: no CAP_SYS_ADMIN (21), so mount fails.
    let s = stdout_ok(&env.sh(
        &["--rm"],
        "grep CapEff /proc/self/status; mount -t tmpfs t /mnt 2>&1 || echo mount-denied",
    ));
    assert!(s.contains("mount-denied"), "{s}");
    let eff = s.lines().next().unwrap().split('\t').nth(1).unwrap();
    let caps = u64::from_str_radix(eff, 16).unwrap();
    assert_eq!(caps & (1 << 21), 0, "CAP_SYS_ADMIN must be dropped: {s}");
    assert_ne!(caps & (1 << 0), 0, "CAP_CHOWN must be kept: {s}");
    // The default seccomp filter: no new user namespaces even without capabilities.
    let s = stdout_ok(&env.sh(
        &["--rm", "-u", "app"],
        "grep '^Seccomp:' /proc/self/status; unshare -U true 2>/dev/null && echo userns || echo no-userns",
    ));
    assert_eq!(s, "Seccomp:\t2\nno-userns\n");
    let s = stdout_ok(&env.sh(
        &["--rm", "-u", "app", "--security-opt", "seccomp=unconfined"],
        "grep '^Seccomp:' /proc/self/status",
    ));
    assert_eq!(s, "Seccomp:\t0\n");
}

/// Calls that docker's default profile refuses but the kernel would allow here, and a few
/// it allows; prints one verdict per line.
const SECCOMP_PROBE: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <unistd.h>
static void report(const char *what, long r) {
    printf("%s=%s\n", what, r < 0 ? strerror(errno) : "ok");
}
int main(void) {
    report("getppid", syscall(SYS_getppid));
    report("uname", syscall(SYS_uname, &(char[4096]){0}));
    report("personality-linux32", personality(0x0008) < 0 ? -1 : (personality(0), 0));
    report("personality-no-randomize", personality(0x0040000));
    report("vsock", syscall(SYS_socket, 40, 1, 0));
    report("unknown-future", syscall(1000));
    return 0;
}
"#;

#[test]
fn root_seccomp_is_an_allow_list() {
    if !root_or_skip("root_seccomp_is_an_allow_list") || !caisson_tests::require_tool("gcc") {
        return;
    }
    let env = Env::new();
    let src = env.tmp.path().join("probe.c");
    std::fs::write(&src, SECCOMP_PROBE).unwrap();
    caisson_tests::run(
        Command::new("gcc")
            .args(["-static", "-O1", "-o"])
            .arg(env.rootfs.join("probe"))
            .arg(&src),
    )
    .unwrap();
    let s = stdout_ok(&env.run(&["--rm"], &["/probe"]));
    assert!(s.contains("getppid=ok\n"), "{s}");
    assert!(s.contains("uname=ok\n"), "{s}");
    assert!(s.contains("personality-linux32=ok\n"), "{s}");
    assert!(
        s.contains("personality-no-randomize=Operation not permitted\n"),
        "{s}"
    );
    assert!(s.contains("vsock=Operation not permitted\n"), "{s}");
    assert!(
        s.contains("unknown-future=Function not implemented\n"),
        "{s}"
    );
    // Unconfined, the same calls reach the kernel.
    let s = stdout_ok(&env.run(
        &["--rm", "--security-opt", "seccomp=unconfined"],
        &["/probe"],
    ));
    assert!(s.contains("personality-no-randomize=ok\n"), "{s}");
    assert!(!s.contains("vsock=Operation not permitted"), "{s}");
}

#[test]
fn root_mounts_and_masked_paths() {
    if !root_or_skip("root_mounts_and_masked_paths") {
        return;
    }
    let env = Env::new();
    let s = stdout_ok(&env.sh(
        &["--rm"],
        "ls /dev; echo ---; \
         cat /proc/kcore 2>/dev/null | wc -c; \
         (echo 1 > /proc/sys/kernel/domainname) 2>/dev/null && echo sys-writable || echo sys-ro; \
         touch /sys/x 2>/dev/null && echo sysfs-writable || echo sysfs-ro; \
         ls /sys/firmware | wc -l; \
         grep -c ' / ' /proc/mounts; \
         grep -q ' /proc proc ' /proc/mounts && echo proc-ok; \
         grep -q '/dev/pts devpts' /proc/mounts && echo pts-ok; \
         grep -q '/dev/shm tmpfs' /proc/mounts && echo shm-ok; \
         grep -q '/dev/mqueue mqueue' /proc/mounts && echo mq-ok; \
         cat /etc/hosts; cat /etc/resolv.conf > /dev/null && echo resolv-ok; \
         echo x > /dev/null && head -c 4 /dev/urandom | wc -c; \
         ip -o link | wc -l; ip -o link | grep -c 'lo:.*UP'",
    ));
    let (devs, rest) = s.split_once("---\n").unwrap();
    let devs: Vec<&str> = devs.lines().collect();
    assert_eq!(
        devs,
        [
            "core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr",
            "stdin", "stdout", "tty", "urandom", "zero"
        ],
        "{s}"
    );
    let lines: Vec<&str> = rest.lines().collect();
    assert_eq!(lines[0], "0", "/proc/kcore is masked: {s}");
    assert_eq!(lines[1], "sys-ro", "{s}");
    assert_eq!(lines[2], "sysfs-ro", "{s}");
    assert_eq!(lines[3], "0", "/sys/firmware is masked: {s}");
    for want in [
        "proc-ok",
        "pts-ok",
        "shm-ok",
        "mq-ok",
        "resolv-ok",
        "localhost",
    ] {
        assert!(s.contains(want), "{want} missing: {s}");
    }
    let tail: Vec<&str> = lines.iter().rev().take(3).copied().collect();
    assert_eq!(tail, ["1", "1", "4"], "urandom, one link (lo), up: {s}");
    // Every masked path this kernel has is masked (each is one mount, no stat first), the
    // read-only ones are read-only.
    let s = stdout_ok(&env.sh(
        &["--rm"],
        "for f in /proc/keys /proc/timer_list; do [ -e $f ] && wc -c < $f; done; \
         ls -A /proc/acpi 2>/dev/null | wc -l; \
         touch /proc/acpi/x 2>/dev/null && echo acpi-writable; \
         grep -E ' /proc/(bus|fs|irq|sys) ' /proc/mounts | grep -c ' ro,'",
    ));
    let (masked, ro) = s.trim_end().rsplit_once('\n').unwrap();
    assert!(
        masked.lines().all(|l| l.trim() == "0"),
        "masked files read empty, /proc/acpi empty and read-only: {s}"
    );
    assert_eq!(ro.trim(), "4", "/proc/bus, fs, irq and sys read-only: {s}");
    // /etc files the root has as symlinks (absolute and relative) are bound where the links
    // lead inside the root, never outside it.
    let etc = env.rootfs.join("etc");
    let run_dir = env.rootfs.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let _ = std::fs::remove_file(etc.join("resolv.conf"));
    let _ = std::fs::remove_file(etc.join("hosts"));
    std::os::unix::fs::symlink("/run/caisson-test-resolv.conf", etc.join("resolv.conf")).unwrap();
    std::os::unix::fs::symlink("../run/caisson-test-hosts", etc.join("hosts")).unwrap();
    let s = stdout_ok(&env.sh(
        &[
            "--rm",
            "--add-host",
            "symlinked.example:10.1.2.3",
            "--dns",
            "10.9.9.9",
        ],
        "cat /run/caisson-test-hosts; cat /run/caisson-test-resolv.conf",
    ));
    std::fs::remove_file(etc.join("resolv.conf")).unwrap();
    std::fs::remove_file(etc.join("hosts")).unwrap();
    assert!(s.contains("10.1.2.3\tsymlinked.example"), "{s}");
    assert!(s.contains("nameserver 10.9.9.9"), "{s}");
    assert!(
        !Path::new("/run/caisson-test-resolv.conf").exists(),
        "the absolute link was followed outside the root"
    );
    assert!(run_dir.join("caisson-test-resolv.conf").exists());
    assert!(run_dir.join("caisson-test-hosts").exists());
    // No host device node can be made (no CAP_MKNOD without a device cgroup) or used.
    let s = stdout_ok(&env.sh(
        &["--rm"],
        "mknod /tmp/sda b 8 0 2>/dev/null; head -c 1 /tmp/sda >/dev/null 2>&1 && echo read-disk || echo denied",
    ));
    assert_eq!(s, "denied\n");
    // Nor one the root filesystem carries: a node in a directory root, and one in an image
    // layer (overlay root), are inert (nodev).
    let node = env.rootfs.join("hostnull");
    let _ = std::fs::remove_file(&node);
    assert!(Command::new("mknod")
        .arg(&node)
        .args(["c", "1", "3"])
        .status()
        .unwrap()
        .success());
    let probe = "cat /hostnull >/dev/null 2>&1 && echo opened || echo denied";
    let s = stdout_ok(&env.sh(&["--rm"], probe));
    assert_eq!(s, "denied\n", "a device node in a directory root");
    let _ = std::fs::remove_file(&node);
    let img = image_with_device_node(env.tmp.path());
    let load = env.caisson(&["load", "-q", "-i", &format!("{}:dev", img.display())]);
    assert!(load.status.success(), "{}", text(&load.stderr));
    let s = stdout_ok(&env.caisson(&["run", "--rm", "localhost/oci:dev", "sh", "-c", probe]));
    assert_eq!(s, "denied\n", "a device node in an image layer");
    // Host network mode sees more than loopback.
    let s = stdout_ok(&env.run(&["--rm", "--network", "host"], &["ip", "-o", "link"]));
    let host_links = std::fs::read_dir("/sys/class/net").unwrap().count();
    assert_eq!(s.lines().count(), host_links, "{s}");
}

#[test]
fn root_volumes_readonly_and_sandbox() {
    if !root_or_skip("root_volumes_readonly_and_sandbox") {
        return;
    }
    let env = Env::new();
    let vol = env.tmp.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("in"), "from-host\n").unwrap();
    let ro = format!("{}:/data:ro", vol.display());
    let rw = format!("{}:/rw", vol.display());
    let out = env.sh(
        &["--name", "vols", "--read-only", "-v", &ro, "-v", &rw],
        "cat /data/in; touch /data/x 2>/dev/null || echo data-ro; touch /newfile 2>/dev/null || echo root-ro; \
         echo out > /rw/out; echo sb > /mnt/sandbox/file; echo done",
    );
    let s = stdout_ok(&out);
    assert_eq!(s, "from-host\ndata-ro\nroot-ro\ndone\n");
    assert_eq!(std::fs::read_to_string(vol.join("out")).unwrap(), "out\n");
    assert!(!env.rootfs.join("newfile").exists());
    let v = env.inspect("vols");
    let dir = PathBuf::from(v["dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("sandbox/file")).unwrap(),
        "sb\n"
    );
    // Bad volume: 125, nothing left behind.
    let out = env.run(&["-v", "/nonexistent/x:/x"], &["true"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    let out = env.run(&["-v", "relative:/x"], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(list_ids(&env).len(), 1);
}

fn list_ids(env: &Env) -> Vec<String> {
    let s = stdout_ok(&env.caisson(&["ps", "-a", "-q", "--no-trunc"]));
    s.lines().map(String::from).collect()
}

#[test]
fn root_exit_codes_and_bad_input() {
    if !root_or_skip("root_exit_codes_and_bad_input") {
        return;
    }
    let env = Env::new();
    let code = |out: Output| out.status.code();
    assert_eq!(code(env.sh(&["--rm"], "exit 7")), Some(7));
    assert_eq!(code(env.run(&["--rm"], &["true"])), Some(0));
    let out = env.run(&["--rm"], &["nosuchcommand"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(code(env.run(&["--rm"], &["/notexec"])), Some(126));
    assert_eq!(code(env.run(&["--rm"], &["/bin"])), Some(126));
    assert_eq!(code(env.run(&["--rm"], &["/no/such/path"])), Some(127));
    let out = env.run(&["--rm", "-u", "nosuchuser"], &["true"]);
    assert_eq!(out.status.code(), Some(126));
    assert!(text(&out.stderr).contains("unable to find user"));
    // Killed by a signal: 128 + signal.
    assert_eq!(
        code(env.sh(&["--rm"], "sleep 10 & kill -9 $!; wait $!; exit $?")),
        Some(137)
    );
    // Limits out of range, bad flags: 125.
    assert_eq!(
        code(env.run(&["--rm", "--cpus", "1000"], &["true"])),
        Some(125)
    );
    assert_eq!(
        code(env.run(&["--rm", "--memory", "1k"], &["true"])),
        Some(125)
    );
    assert_eq!(
        code(env.run(&["--rm", "--cpu-shares", "1"], &["true"])),
        Some(125)
    );
    assert_eq!(
        code(env.run(&["--rm", "--network", "bridge0"], &["true"])),
        Some(125)
    );
    assert_eq!(
        code(env.run(&["--rm", "-w", "relative"], &["true"])),
        Some(125)
    );
    assert_eq!(
        code(env.caisson(&["run", "--rootfs", "/nonexistent/rootfs", "true"])),
        Some(125)
    );
    assert_eq!(
        code(env.caisson(&["run", "--rootfs", env.rootfs.to_str().unwrap()])),
        Some(125)
    );
    // Duplicate name.
    stdout_ok(&env.run(&["--name", "dup"], &["true"]));
    let out = env.run(&["--name", "dup"], &["true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("already in use"));
    assert_eq!(code(env.run(&["--name", "../evil"], &["true"])), Some(125));
    // Nothing left behind by the failures.
    assert_eq!(list_ids(&env).len(), 1);
    let containers = env.state_root().join("containers");
    assert_eq!(std::fs::read_dir(containers).unwrap().count(), 1);
}

#[test]
fn root_signals_and_stop_grace() {
    if !root_or_skip("root_signals_and_stop_grace") {
        return;
    }
    let env = Env::new();
    // A task that handles SIGTERM stops gracefully with its own code.
    let id = detached(
        &env,
        &[],
        "trap 'exit 3' TERM; while :; do sleep 0.05; done",
    );
    env.wait_status(&id, "running", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    stdout_ok(&env.caisson(&["stop", "-t", "10", &id]));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let v = env.inspect(&id);
    assert_eq!(v["state"]["exit_code"], 3, "{v}");
    assert_eq!(v["state"]["signal"], Value::Null);

    // A task that ignores SIGTERM (pid 1 without a handler) is killed after the grace period.
    let id = detached(&env, &[], "sleep 100");
    env.wait_status(&id, "running", Duration::from_secs(5));
    let t = Instant::now();
    stdout_ok(&env.caisson(&["stop", "-t", "1", &id]));
    let el = t.elapsed();
    assert!(
        el >= Duration::from_millis(900) && el < Duration::from_secs(5),
        "{el:?}"
    );
    let v = env.inspect(&id);
    assert_eq!(v["state"]["exit_code"], 137, "{v}");
    assert_eq!(v["state"]["signal"], 9);

    // A foreground run forwards SIGTERM to the task (podman's --sig-proxy) and exits with its code.
    let rootfs = env.rootfs.to_str().unwrap().to_string();
    let mut fg = env
        .cmd(&[
            "run",
            "--name",
            "proxied",
            "--rootfs",
            &rootfs,
            "sh",
            "-c",
            "trap 'exit 4' TERM; while :; do sleep 0.05; done",
        ])
        .spawn()
        .unwrap();
    env.wait_status("proxied", "running", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fg.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(fg.wait().unwrap().code(), Some(4));
    // wait blocks until the end and prints the exit code.
    let id = detached(&env, &[], "sleep 0.3; exit 6");
    assert_eq!(stdout_ok(&env.caisson(&["wait", &id])), "6\n");
    // kill -s delivers the signal to the task's init.
    let id = detached(
        &env,
        &[],
        "trap 'exit 10' USR1; while :; do sleep 0.05; done",
    );
    env.wait_status(&id, "running", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    stdout_ok(&env.caisson(&["kill", "-s", "USR1", &id]));
    let v = env.wait_status(&id, "exited", Duration::from_secs(5));
    assert_eq!(v["state"]["exit_code"], 10);
    // Default kill signal is SIGKILL.
    let id = detached(&env, &[], "sleep 100");
    stdout_ok(&env.caisson(&["kill", &id]));
    let v = env.wait_status(&id, "exited", Duration::from_secs(5));
    assert_eq!(v["state"]["exit_code"], 137);
    // kill of an exited task is an error.
    assert_eq!(env.caisson(&["kill", &id]).status.code(), Some(125));
    // rm refuses a running task without -f, and -f kills the whole cgroup.
    let id = detached(&env, &[], "sleep 100 & sleep 100 & sleep 100");
    env.wait_status(&id, "running", Duration::from_secs(5));
    assert_eq!(env.caisson(&["rm", &id]).status.code(), Some(125));
    stdout_ok(&env.caisson(&["rm", "-f", &id]));
    assert_eq!(env.caisson(&["inspect", &id]).status.code(), Some(125));

    // A task that keeps forking (orphans reparented to its init, one new every 10 ms) cannot
    // outrun a kill: once stopped, none of its processes is left anywhere on the host.
    let marker = "1007.5";
    let id = detached(
        &env,
        &[],
        &format!("while :; do (sleep {marker} &); sleep 0.01; done"),
    );
    env.wait_status(&id, "running", Duration::from_secs(5));
    let sleepers = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(marker))
            .count()
    };
    let t0 = Instant::now();
    while sleepers() < 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the forker did not fork"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stdout_ok(&env.caisson(&["stop", "-t", "0", &id]));
    let v = env.inspect(&id);
    assert_eq!(v["state"]["signal"], 9, "{v}");
    assert_eq!(sleepers(), 0, "processes of the stopped task are left");
    stdout_ok(&env.caisson(&["rm", &id]));
}

#[test]
fn root_memory_limit_oom_reported() {
    if !root_or_skip("root_memory_limit_oom_reported") {
        return;
    }
    let env = Env::new();
    let out = env.sh(
        &["--name", "oom", "--memory", "16m"],
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
    );
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stdout));
    let v = env.inspect("oom");
    assert_eq!(v["state"]["oom_killed"], true, "{v}");
    assert_eq!(v["state"]["reason"], "memory limit", "{v}");
    assert!(
        v["state"]["usage"]["memory_peak_bytes"].as_u64().unwrap() > 8 << 20,
        "{v}"
    );
    let ps = stdout_ok(&env.caisson(&["ps", "-a"]));
    assert!(ps.contains("OOMKilled"), "{ps}");
    // Below the limit: no OOM, usage recorded.
    let out = env.sh(
        &["--name", "fine", "--memory", "64m"],
        "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo ok",
    );
    assert_eq!(stdout_ok(&out), "ok\n");
    let v = env.inspect("fine");
    assert_eq!(v["state"]["oom_killed"], false);
    assert!(v["state"]["usage"]["cpu_ns"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn root_pids_limit_stops_fork_bomb() {
    if !root_or_skip("root_pids_limit_stops_fork_bomb") {
        return;
    }
    let env = Env::new();
    let id = detached(
        &env,
        &["--pids-limit", "32"],
        "f() { f | f & }; f; sleep 100",
    );
    let v = env.wait_status(&id, "running", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    let pids_dir = v["state"]["cgroup_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .find(|p| p.join("pids.max").exists())
        .expect("pids cgroup");
    let max = std::fs::read_to_string(pids_dir.join("pids.max")).unwrap();
    assert_eq!(max.trim(), "32");
    let current: u64 = std::fs::read_to_string(pids_dir.join("pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 32, "{current}");
    // The host can still fork, and the bomb is removed for good.
    assert!(Command::new("true").status().unwrap().success());
    let t = Instant::now();
    stdout_ok(&env.caisson(&["rm", "-f", &id]));
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        !pids_dir.exists(),
        "cgroup {} left behind",
        pids_dir.display()
    );
}

#[test]
fn root_cpu_quota_and_shares_visible() {
    if !root_or_skip("root_cpu_quota_and_shares_visible") {
        return;
    }
    let env = Env::new();
    let id = detached(&env, &["--cpus", "0.5", "--cpu-shares", "512"], "sleep 100");
    let v = env.wait_status(&id, "running", Duration::from_secs(5));
    let dirs: Vec<PathBuf> = v["state"]["cgroup_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    let read = |f: &str| {
        dirs.iter()
            .find_map(|d| std::fs::read_to_string(d.join(f)).ok())
            .map(|s| s.trim().to_string())
    };
    if let Some(max) = read("cpu.max") {
        assert_eq!(max, "50000 100000");
        assert_eq!(read("cpu.weight").unwrap(), "20");
    } else {
        assert_eq!(read("cpu.cfs_quota_us").unwrap(), "50000");
        assert_eq!(read("cpu.cfs_period_us").unwrap(), "100000");
        assert_eq!(read("cpu.shares").unwrap(), "512");
    }
    // Two busy loops for 1.5 s get at most about half a CPU in total (the quota), visible in
    // the recorded usage.
    let out = env.sh(
        &["--name", "busy", "--cpus", "0.5"],
        "busy() { while :; do :; done; }; busy & a=$!; busy & b=$!; sleep 1.5; kill $a $b; echo ok",
    );
    assert_eq!(stdout_ok(&out), "ok\n");
    let v = env.inspect("busy");
    let cpu_ns = v["state"]["usage"]["cpu_ns"].as_u64().unwrap();
    assert!(
        cpu_ns > 50_000_000 && cpu_ns < 1_000_000_000,
        "cpu time {cpu_ns} ns for 1.5 s at 0.5 CPU"
    );
    stdout_ok(&env.caisson(&["rm", "-f", &id]));
}

#[test]
fn root_logs_and_ps() {
    if !root_or_skip("root_logs_and_ps") {
        return;
    }
    let env = Env::new();
    let id = detached(
        &env,
        &["--name", "talker"],
        "echo out1; echo err1 >&2; sleep 0.5; echo out2",
    );
    // Follow until exit.
    let out = env.caisson(&["logs", "-f", "talker"]);
    assert_eq!(text(&out.stdout), "out1\nout2\n");
    assert_eq!(text(&out.stderr), "err1\n");
    let out = env.caisson(&["logs", &id[..8]]);
    assert_eq!(text(&out.stdout), "out1\nout2\n");
    // Foreground run streams everything, in order, to the end.
    let out = env.sh(&["--rm"], "seq 1 100000");
    let s = stdout_ok(&out);
    assert_eq!(s.lines().count(), 100000);
    assert_eq!(s.lines().last(), Some("100000"));
    // Foreground run streams both.
    let out = env.sh(&["--rm"], "echo o; echo e >&2");
    assert_eq!(text(&out.stdout), "o\n");
    assert_eq!(text(&out.stderr), "e\n");
    // ps: running only by default, -a for all, --json.
    let sleeper = detached(&env, &["--name", "sleeper"], "sleep 100");
    env.wait_status(&sleeper, "running", Duration::from_secs(5));
    let ps = stdout_ok(&env.caisson(&["ps"]));
    assert!(ps.contains("sleeper") && !ps.contains("talker"), "{ps}");
    let ps = stdout_ok(&env.caisson(&["ps", "-a"]));
    assert!(
        ps.contains("sleeper") && ps.contains("talker") && ps.contains("Exited (0)"),
        "{ps}"
    );
    let json: Value = serde_json::from_slice(&env.caisson(&["ps", "-a", "--json"]).stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    let v = env.inspect("sleeper");
    assert!(v["state"]["pid"].as_i64().unwrap() > 1);
    let t = &v["state"]["timings"];
    for k in [
        "prepare_us",
        "spawn_us",
        "cgroup_us",
        "namespaces_us",
        "mounts_us",
        "exec_us",
        "total_us",
    ] {
        assert!(t[k].is_u64(), "{k}: {v}");
    }
    assert!(t["total_us"].as_u64().unwrap() > 0);
    stdout_ok(&env.caisson(&["rm", "-f", "sleeper", "talker"]));
    assert!(list_ids(&env).is_empty());
    assert_eq!(env.caisson(&["logs", "nosuch"]).status.code(), Some(125));
}

#[test]
fn root_task_survives_launcher_kill9() {
    if !root_or_skip("root_task_survives_launcher_kill9") {
        return;
    }
    let env = Env::new();
    let rootfs = env.rootfs.to_str().unwrap().to_string();
    let mut launcher = env
        .cmd(&[
            "run",
            "--name",
            "orphan",
            "--rootfs",
            &rootfs,
            "sh",
            "-c",
            "echo started; sleep 2; echo finished; exit 42",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let v = env.wait_status("orphan", "running", Duration::from_secs(10));
    let task_pid = v["state"]["pid"].as_i64().unwrap();
    launcher.kill().unwrap(); // SIGKILL
    launcher.wait().unwrap();
    // Still running after the launcher died.
    std::thread::sleep(Duration::from_millis(300));
    let ps = stdout_ok(&env.caisson(&["ps"]));
    assert!(ps.contains("orphan") && ps.contains("Up"), "{ps}");
    assert!(Path::new(&format!("/proc/{task_pid}")).exists());
    // Its later exit is recorded.
    let v = env.wait_status("orphan", "exited", Duration::from_secs(10));
    assert_eq!(v["state"]["exit_code"], 42, "{v}");
    let ps = stdout_ok(&env.caisson(&["ps", "-a"]));
    assert!(ps.contains("Exited (42)"), "{ps}");
    let logs = env.caisson(&["logs", "orphan"]);
    assert_eq!(text(&logs.stdout), "started\nfinished\n");
    stdout_ok(&env.caisson(&["rm", "orphan"]));
}

#[test]
fn root_no_leaks_after_many_runs() {
    if !root_or_skip("root_no_leaks_after_many_runs") {
        return;
    }
    let env = Env::new();
    let mut ids = vec![];
    for i in 0..60 {
        let cid = env.tmp.path().join(format!("cid{i}"));
        let cidf = cid.to_str().unwrap();
        let out = match i % 3 {
            0 => env.run(
                &[
                    "--rm",
                    "--cidfile",
                    cidf,
                    "--memory",
                    "32m",
                    "--pids-limit",
                    "20",
                ],
                &["true"],
            ),
            1 => env.sh(
                &["--cidfile", cidf, "--cpus", "1"],
                "echo hi > /mnt/sandbox/x; exit 1",
            ),
            _ => env.run(
                &["--rm", "--cidfile", cidf, "-v", "/tmp:/hosttmp:ro"],
                &["false"],
            ),
        };
        assert!(out.status.code().is_some());
        ids.push(std::fs::read_to_string(&cid).unwrap());
    }
    // Failed launches too.
    for _ in 0..5 {
        assert_eq!(env.run(&["--rm"], &["nosuch"]).status.code(), Some(127));
    }
    for id in list_ids(&env) {
        stdout_ok(&env.caisson(&["rm", &id]));
    }
    let containers = env.state_root().join("containers");
    assert_eq!(std::fs::read_dir(&containers).unwrap().count(), 0);
    let names = env.state_root().join("names");
    assert_eq!(std::fs::read_dir(&names).unwrap().count(), 0);
    for id in &ids {
        for ctrl in ["cpu", "cpuacct", "memory", "pids", "freezer", "devices", ""] {
            let p = Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join("caisson")
                .join(id);
            assert!(!p.exists(), "{} left behind", p.display());
        }
    }
    let tmp = env.tmp.path().to_str().unwrap().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&tmp), "mounts left behind: {mounts}");
    // No supervisor or task process left that refers to this test's directories.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let c = text(&cmdline);
            assert!(
                !c.contains(&tmp) || c.contains("native"),
                "process left: {c}"
            );
        }
    }
}

#[test]
fn root_detached_rm_and_lost_supervisor() {
    if !root_or_skip("root_detached_rm_and_lost_supervisor") {
        return;
    }
    let env = Env::new();
    // -d --rm: the supervisor removes the task after it exits.
    let id = detached(&env, &["--rm"], "sleep 0.3");
    let dir = env.state_root().join("containers").join(&id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() {
        assert!(Instant::now() < deadline, "{} not removed", dir.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    // A supervisor killed with SIGKILL: the task is reported lost, and rm -f still kills the
    // task's processes and removes its cgroup.
    let id = detached(&env, &[], "sleep 100");
    let v = env.wait_status(&id, "running", Duration::from_secs(5));
    let shim = v["state"]["shim_pid"].as_i64().unwrap() as i32;
    let task = v["state"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let v = env.wait_status(&id, "lost", Duration::from_secs(5));
    assert_eq!(v["state"]["reason"], "supervisor gone");
    let ps = stdout_ok(&env.caisson(&["ps", "-a"]));
    assert!(ps.contains("Lost"), "{ps}");
    stdout_ok(&env.caisson(&["rm", "-f", &id]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{task}/cgroup")).exists() {
        // The orphaned init may linger as a zombie of the host's init for a moment.
        let stat = std::fs::read_to_string(format!("/proc/{task}/stat")).unwrap_or_default();
        if stat.contains(") Z") {
            break;
        }
        assert!(Instant::now() < deadline, "task {task} survived rm -f");
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in v["state"]["cgroup_paths"].as_array().unwrap() {
        assert!(!Path::new(p.as_str().unwrap()).exists(), "{p} left behind");
    }
}

/// The library API the agent uses for image tasks: an overlay root filesystem prepared by the
/// caller, the process merged from an image config, and cleanup of the caller's paths when the
/// task is removed by the supervisor (`auto_remove`).
#[test]
fn root_api_overlay_rootfs_cleanup() {
    use containerizer::launch::{process_from_image, ProcessOverrides, Runtime, Status, TaskSpec};
    if !root_or_skip("root_api_overlay_rootfs_cleanup") {
        return;
    }
    let env = Env::new();
    let base = env.tmp.path().join("ovl");
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        env.rootfs.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    // Unmount even if an assertion below fails.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(merged.clone());
    let config = oci_spec::image::ConfigBuilder::default()
        .entrypoint(vec!["/bin/sh".to_string(), "-c".to_string()])
        .cmd(vec!["exit 1".to_string()])
        .env(vec!["FROM_IMAGE=1".to_string()])
        .working_dir("/srv".to_string())
        .build()
        .unwrap();
    let process = process_from_image(
        Some(&config),
        &ProcessOverrides {
            cmd: vec!["echo $FROM_IMAGE $(pwd) > /mnt/sandbox/out; touch /written; exit 5".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let shim = caisson_bin().with_file_name("caisson-shim");
    let rt = Runtime::new(env.state_root()).with_shim(shim);
    let mut launched = rt
        .launch(TaskSpec {
            image: "test/overlay".into(),
            rootfs: merged.clone(),
            process,
            cleanup: vec![merged.clone(), upper.clone(), work.clone()],
            rootfs_prepare_us: Some(1234),
            auto_remove: true,
            ..Default::default()
        })
        .unwrap();
    let dir = launched.dir.clone();
    // Launches are idempotent by task id: a second launch with the same id is refused.
    let again = rt.launch(TaskSpec {
        id: launched.id.clone(),
        rootfs: env.rootfs.clone(),
        process: containerizer::launch::Process {
            args: vec!["true".into()],
            cwd: "/".into(),
            ..Default::default()
        },
        ..Default::default()
    });
    assert!(
        matches!(again, Err(containerizer::launch::LaunchError::Exists(_))),
        "{again:?}"
    );
    let st = launched.wait().unwrap();
    assert_eq!(st.status, Status::Exited);
    assert_eq!(st.exit_code, Some(5));
    assert_eq!(st.timings.rootfs_us, Some(1234));
    assert_eq!(
        std::fs::read_to_string(dir.join("sandbox/out")).unwrap(),
        "1 /srv\n"
    );
    // The write went to the upper dir, not to the shared lower rootfs.
    assert!(upper.join("written").exists());
    assert!(!env.rootfs.join("written").exists());
    launched.finish();
    assert!(!dir.exists(), "task dir left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(merged.to_str().unwrap()),
        "overlay left mounted"
    );
    for d in [&upper, &work, &merged] {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

/// The cgroup v2 code path (clone3 into the cgroup, cgroup.kill, removal) on a hybrid host: in a
/// private mount namespace, the host's cgroup2 mount (`/sys/fs/cgroup/unified`, no controllers
/// but the core files) is bound over `/sys/fs/cgroup`, so caisson sees a pure v2 layout. On pure
/// v1 or pure v2 hosts this test has nothing to add and is skipped.
#[test]
fn root_cgroup_v2_layout_via_private_mount_namespace() {
    if !root_or_skip("root_cgroup_v2_layout_via_private_mount_namespace") {
        return;
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.join("cgroup.procs").exists() {
        eprintln!("skipping: not a hybrid cgroup host");
        return;
    }
    let env = Env::new();
    let v2 = |args: &[&str]| -> Output {
        Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                "mount --make-rprivate / && mount --bind /sys/fs/cgroup/unified /sys/fs/cgroup && exec \"$0\" \"$@\"",
            ])
            .arg(caisson_bin())
            .arg("--root")
            .arg(env.state_root())
            .args(args)
            .output()
            .unwrap()
    };
    let rootfs = env.rootfs.to_str().unwrap();
    let out = v2(&[
        "run",
        "--name",
        "a",
        "--rootfs",
        rootfs,
        "sh",
        "-c",
        "grep ^0:: /proc/self/cgroup; grep -qx 1 /sys/fs/cgroup/cgroup.procs && echo has-init; grep -c cgroup2 /proc/mounts",
    ]);
    let s = stdout_ok(&out);
    // Its own cgroup namespace, rooted at its cgroup, mounted at /sys/fs/cgroup.
    assert_eq!(s, "0::/\nhas-init\n1\n");
    let host_cg = env.inspect("a")["state"]["cgroup_paths"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(host_cg.starts_with("/sys/fs/cgroup/caisson/"), "{host_cg}");
    let a = env.inspect("a");
    assert_eq!(a["state"]["timings"]["clone_into_cgroup"], true, "{a}");
    let id_a = a["id"].as_str().unwrap().to_string();
    let out = v2(&[
        "run",
        "-d",
        "--name",
        "b",
        "--rootfs",
        rootfs,
        "sh",
        "-c",
        "sleep 100 & sleep 100",
    ]);
    let id_b = stdout_ok(&out).trim().to_string();
    env.wait_status(&id_b, "running", Duration::from_secs(5));
    let procs =
        std::fs::read_to_string(unified.join("caisson").join(&id_b).join("cgroup.procs")).unwrap();
    assert_eq!(procs.lines().count(), 2, "{procs}");
    stdout_ok(&v2(&["stop", "-t", "0", "b"]));
    let b = env.inspect("b");
    assert_eq!(b["state"]["exit_code"], 137, "{b}");
    stdout_ok(&v2(&["rm", "a", "b"]));
    for id in [id_a, id_b] {
        let p = unified.join("caisson").join(&id);
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

/// `--add-host` and `--dns*` write the task's /etc/hosts and /etc/resolv.conf as podman does;
/// a malformed value is refused before anything is made.
#[test]
fn root_add_host_and_dns_flags() {
    if !root_or_skip("root_add_host_and_dns_flags") {
        return;
    }
    let env = Env::new();
    let out = env.sh(
        &[
            "--rm",
            "--hostname",
            "web",
            "--add-host",
            "db.test:10.1.2.3",
            "--add-host",
            "v6.test:[fd00::7]",
            "--dns",
            "192.0.2.53",
            "--dns-search",
            "example.test",
            "--dns-option",
            "ndots:3",
        ],
        "cat /etc/hosts; echo ---; cat /etc/resolv.conf",
    );
    let s = stdout_ok(&out);
    let (hosts, resolv) = s.split_once("---\n").unwrap();
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");
    assert!(hosts.contains("\tweb"), "{hosts}");
    assert!(hosts.contains("10.1.2.3\tdb.test\n"), "{hosts}");
    assert!(hosts.contains("fd00::7\tv6.test\n"), "{hosts}");
    let ns: Vec<&str> = resolv
        .lines()
        .filter(|l| l.starts_with("nameserver"))
        .collect();
    assert_eq!(ns, ["nameserver 192.0.2.53"], "{resolv}");
    assert!(resolv.contains("search example.test\n"), "{resolv}");
    assert!(resolv.contains("options ndots:3\n"), "{resolv}");
    for bad in [
        ["--add-host", "nocolon"],
        ["--add-host", "db:not-an-ip"],
        ["--add-host", ":10.0.0.1"],
        ["--dns", "resolver.example"],
        ["--dns-search", "two words"],
    ] {
        let out = env.run(&["--rm", bad[0], bad[1]], &["true"]);
        assert_eq!(out.status.code(), Some(125), "{bad:?}");
        assert!(
            text(&out.stderr).contains(bad[0]) || text(&out.stderr).contains("invalid"),
            "{bad:?}: {}",
            text(&out.stderr)
        );
    }
    assert!(list_ids(&env).is_empty());
    let containers = env.state_root().join("containers");
    let left = std::fs::read_dir(containers)
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0);
}

/// The cgroup mounts of this mount namespace: (mount point, fstype, superblock options).
fn cgroup_mounts() -> Vec<(PathBuf, String, Vec<String>)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            let f: Vec<&str> = post.split(' ').collect();
            (f[0] == "cgroup" || f[0] == "cgroup2").then(|| {
                (
                    PathBuf::from(point),
                    f[0].to_string(),
                    f.get(2)
                        .unwrap_or(&"")
                        .split(',')
                        .map(String::from)
                        .collect(),
                )
            })
        })
        .collect()
}

fn favordynmods_mounts() -> Vec<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .filter(|(_, _, o)| o.iter().any(|o| o == "favordynmods"))
        .map(|(p, _, _)| p)
        .collect()
}

/// `caisson run` turns on cgroup favordynmods (cheap v1 migrations) when no hierarchy has it:
/// on a cgroup2 mount (hybrid or pure v2) by reconfiguring it with its other options kept, on
/// a pure v1 host with a named hierarchy it leaves mounted. The flag is cleared first, so only
/// the run can have set it. (Parallel tests run caisson too: they can only set it as well.)
#[test]
fn root_run_sets_cgroup_favordynmods() {
    use containerizer::cgroups::favor::V1_MOUNT;
    use containerizer::sys::mount::FsContext;
    if !root_or_skip("root_run_sets_cgroup_favordynmods") {
        return;
    }
    let env = Env::new();
    let before = cgroup_mounts();
    let v2 = before.iter().find(|(_, t, _)| t == "cgroup2").cloned();
    // Clear the flag: a cgroup2 root takes exactly the options it is given.
    for (point, t, opts) in &before {
        if t == "cgroup2" && opts.iter().any(|o| o == "favordynmods") {
            let ctx = FsContext::pick(point).unwrap();
            for o in opts
                .iter()
                .filter(|o| !["rw", "ro", "favordynmods"].contains(&o.as_str()))
            {
                ctx.set_flag(o).unwrap();
            }
            ctx.reconfigure().unwrap();
        }
    }
    if favordynmods_mounts()
        .iter()
        .any(|p| p == Path::new(V1_MOUNT))
    {
        containerizer::sys::mount::unmount(Path::new(V1_MOUNT), true).unwrap();
    }
    assert_eq!(
        favordynmods_mounts(),
        Vec::<PathBuf>::new(),
        "a hierarchy caisson did not make has favordynmods: cannot test"
    );
    let out = env.run(&["--rm"], &["true"]);
    stdout_ok(&out);
    let after = cgroup_mounts();
    match v2 {
        Some((point, _, opts)) => {
            let (_, _, now) = after.iter().find(|(p, _, _)| *p == point).unwrap();
            assert!(now.iter().any(|o| o == "favordynmods"), "{now:?}");
            // The root's other options are kept.
            for o in opts.iter().filter(|o| *o != "favordynmods") {
                assert!(now.contains(o), "{o} lost: {now:?}");
            }
        }
        None => {
            let (_, _, now) = after
                .iter()
                .find(|(p, _, _)| p == Path::new(V1_MOUNT))
                .expect("the named v1 hierarchy is mounted");
            assert!(now.iter().any(|o| o == "favordynmods"), "{now:?}");
        }
    }
}

/// A long-running launcher's warm supervisor (`Runtime::with_warm_supervisor`, the agent's and
/// the benchmarks' path): the standby supervisor takes the next task, which still gets a
/// network namespace of its own (made ahead, not shared with the host or another task) with
/// loopback up; the task runs under the normal policy (its standby started under SCHED_IDLE);
/// dropping the runtime ends the unused standby.
#[test]
fn root_warm_supervisor_takes_the_next_task_with_its_own_netns() {
    use containerizer::launch::{Process, TaskSpec};
    if !root_or_skip("root_warm_supervisor_takes_the_next_task_with_its_own_netns") {
        return;
    }
    let env = Env::new();
    let rt = warm_runtime(&env);
    let spec = |name: &str| {
        TaskSpec {
        name: name.into(),
        image: "busybox".into(),
        rootfs: env.rootfs.clone(),
        process: Process {
            args: vec![
                "sh".into(),
                "-c".into(),
                "readlink /proc/self/ns/net; cat /sys/class/net/lo/flags; cut -d' ' -f41 /proc/self/stat".into(),
            ],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
        },
        ..Default::default()
    }
    };
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let mut seen = vec![];
    for name in ["w1", "w2"] {
        let standby = standby_ready(&rt);
        let mut task = rt.launch(spec(name)).unwrap();
        let st = task.wait().unwrap();
        task.finish();
        assert_eq!(st.exit_code, Some(0), "{st:?}");
        assert_eq!(
            st.shim_pid,
            Some(standby as i32),
            "the standby took the task"
        );
        let out = std::fs::read_to_string(rt.dir(&st_id(&rt, name)).stdout_log()).unwrap();
        let mut lines = out.lines();
        let ns = lines.next().unwrap().to_string();
        assert_ne!(Path::new(&ns), host_ns, "{out}");
        // IFF_UP | IFF_LOOPBACK
        assert_eq!(lines.next(), Some("0x9"), "{out}");
        // The task runs under the normal policy (SCHED_OTHER, 0).
        assert_eq!(lines.next(), Some("0"), "{out}");
        seen.push(ns);
    }
    // (Two tasks one after the other may share a namespace: recycled, see below.)
    let spare = standby_ready(&rt);
    // Forked by the runtime's fork server (no exec per supervisor), itself our child.
    let server = ppid_of(spare);
    let cmdline = std::fs::read(format!("/proc/{server}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--fork-server"),
        "standby {spare}'s parent {server}: {cmdline:?}"
    );
    assert_eq!(ppid_of(server), std::process::id());
    for name in ["w1", "w2"] {
        rt.remove(&st_id(&rt, name), false).unwrap();
    }
    drop(rt);
    for pid in [spare, server] {
        assert!(
            wait_gone(pid),
            "process {pid} (standby or fork server) left running"
        );
    }
}

/// A long-running launcher recycles a task's network namespace for a later task once nothing
/// is left in it, and only then: a task in a recycled namespace finds loopback's packet
/// counters above zero (a new one starts at zero), so "same namespace inode and counters above
/// zero" tells a recycled namespace from a new one that got a freed inode number. A task that
/// leaves a socket in TIME_WAIT keeps its namespace out of the pool.
#[test]
fn root_netns_is_recycled_only_when_nothing_is_left_in_it() {
    use containerizer::launch::{Process, TaskSpec};
    if !root_or_skip("root_netns_is_recycled_only_when_nothing_is_left_in_it") {
        return;
    }
    let env = Env::new();
    let rt = warm_runtime(&env);
    // Each task prints its namespace and loopback's received packets, then makes traffic on
    // loopback: a refused connection (nothing stays), or one that ends in TIME_WAIT on the
    // side that closed first (the listener, which runs `true` on the connection).
    let report = "readlink /proc/self/ns/net; cat /sys/class/net/lo/statistics/rx_packets";
    let quiet = format!("{report}; nc 127.0.0.1 1 </dev/null 2>/dev/null; true");
    let lingering = format!(
        "{report}; for i in $(seq 20); do \
           nc -l -p 5555 -e true & s=$!; sleep 0.1; nc 127.0.0.1 5555 </dev/null 2>/dev/null; \
           kill $s 2>/dev/null; wait $s 2>/dev/null; \
           if grep -q ' 06 ' /proc/net/tcp; then echo tw; break; fi; \
         done; cat /proc/net/tcp"
    );
    let mut n = 0;
    let mut run = |script: &str| -> (String, u64, String) {
        n += 1;
        let name = format!("r{n}");
        let spec = TaskSpec {
            name: name.clone(),
            image: "busybox".into(),
            rootfs: env.rootfs.clone(),
            process: Process {
                args: vec!["sh".into(), "-c".into(), script.into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
            },
            ..Default::default()
        };
        standby_ready(&rt);
        let mut task = rt.launch(spec).unwrap();
        let st = task.wait().unwrap();
        task.finish();
        let id = st_id(&rt, &name);
        let out = std::fs::read_to_string(rt.dir(&id).stdout_log()).unwrap();
        assert_eq!(st.exit_code, Some(0), "{st:?}: {out}");
        rt.remove(&id, false).unwrap();
        let mut lines = out.lines();
        let ns = lines.next().unwrap_or_default().to_string();
        let rx = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(u64::MAX);
        (ns, rx, out)
    };
    let mut seen = vec![];
    for _ in 0..5 {
        let t = run(&quiet);
        assert!(t.0.starts_with("net:["), "{}", t.2);
        seen.push(t);
    }
    // A new namespace starts with no packet on loopback: one that starts with some was used.
    assert_eq!(
        seen[0].1, 0,
        "the first task's namespace is new: {}",
        seen[0].2
    );
    assert!(
        seen[1..].iter().any(|t| t.1 > 0),
        "no task got a recycled namespace: {seen:?}"
    );
    let tw = run(&lingering);
    assert!(
        tw.2.contains("tw"),
        "the listener's side is in TIME_WAIT: {}",
        tw.2
    );
    // The TIME_WAIT task's namespace, reused, would start a later task with at least the
    // packets of that connection (7: handshake and two FINs with their ACKs) above what it
    // started with. Its inode number alone proves nothing: freed, it can go to a new namespace,
    // which the next quiet tasks (2 packets each, 4 of them) cannot bring that far.
    for _ in 0..4 {
        let t = run(&quiet);
        assert!(
            !(t.0 == tw.0 && t.1 >= tw.1 + 7),
            "a namespace with a TIME_WAIT socket was recycled: {t:?} after {tw:?}"
        );
    }
}

/// A runtime over `env`'s state that keeps a warm supervisor (forked by its fork server).
fn warm_runtime(env: &Env) -> containerizer::launch::Runtime {
    containerizer::launch::Runtime::new(env.state_root())
        .with_shim(caisson_bin().with_file_name("caisson-shim"))
        .with_warm_supervisor()
}

/// The pid of the standby supervisor `rt` keeps ready (started now if none is).
fn standby_ready(rt: &containerizer::launch::Runtime) -> u32 {
    rt.prewarm();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = rt.standby_pid() {
            return pid;
        }
        assert!(Instant::now() < deadline, "no standby supervisor");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The parent pid of `pid` (field 4 of /proc/PID/stat).
fn ppid_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Whether `pid` is gone (or a zombie) within 5 s.
fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while containerizer::launch::state::process_alive(pid as i32, None) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A fork server killed under a long-running launcher: the standby it had forked still takes
/// a task, and launches go on (exec'd supervisors, then from a new server); one that stops
/// answering is killed and replaced.
#[test]
fn root_launches_go_on_after_the_fork_server_is_killed() {
    use containerizer::launch::{Process, TaskSpec};
    if !root_or_skip("root_launches_go_on_after_the_fork_server_is_killed") {
        return;
    }
    let env = Env::new();
    let rt = warm_runtime(&env);
    let spec = |name: &str| TaskSpec {
        name: name.into(),
        image: "busybox".into(),
        rootfs: env.rootfs.clone(),
        process: Process {
            args: vec!["sh".into(), "-c".into(), "exit 7".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
        },
        ..Default::default()
    };
    let first = standby_ready(&rt);
    let server = ppid_of(first);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_gone(server), "fork server {server} still there");
    for name in ["k1", "k2", "k3"] {
        let mut task = rt.launch(spec(name)).unwrap();
        let st = task.wait().unwrap();
        task.finish();
        assert_eq!(st.exit_code, Some(7), "{name}: {st:?}");
    }
    let next = standby_ready(&rt);
    let new_server = ppid_of(next);
    assert_ne!(new_server, server);
    assert_eq!(ppid_of(new_server), std::process::id());
    // A server that stops answering: the next request times out, the launcher kills it and
    // goes on (the task takes the standby that was ready; the refill execs one).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_server as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let mut task = rt.launch(spec("k4")).unwrap();
    let st = task.wait().unwrap();
    task.finish();
    assert_eq!(st.exit_code, Some(7), "k4: {st:?}");
    assert!(
        wait_gone(new_server),
        "stopped fork server {new_server} kept"
    );
    for name in ["k1", "k2", "k3", "k4"] {
        rt.remove(&st_id(&rt, name), false).unwrap();
    }
    let last = standby_ready(&rt);
    drop(rt);
    assert!(wait_gone(next) && wait_gone(last));
}

fn st_id(rt: &containerizer::launch::Runtime, name: &str) -> String {
    rt.resolve(name).unwrap()
}

/// A standby for tasks that join a namespace made for them (CNI) makes none ahead; a task it
/// takes without one still gets its own (made at the clone).
#[test]
fn root_standby_without_netns_ahead_makes_none() {
    use containerizer::launch::{Process, Runtime, TaskSpec};
    if !root_or_skip("root_standby_without_netns_ahead_makes_none") {
        return;
    }
    let env = Env::new();
    let shim = caisson_bin().with_file_name("caisson-shim");
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    // The namespaces a waiting standby holds besides ours (it waits in read(0, ...)).
    let held = |rt: &Runtime| -> Vec<PathBuf> {
        rt.prewarm();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = rt.standby_pid() {
                let sc =
                    std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
                if sc.starts_with("0 0x0 ") {
                    return std::fs::read_dir(format!("/proc/{pid}/fd"))
                        .unwrap()
                        .flatten()
                        .filter_map(|e| std::fs::read_link(e.path()).ok())
                        .filter(|l| l.to_string_lossy().starts_with("net:[") && *l != host_ns)
                        .collect();
                }
            }
            assert!(Instant::now() < deadline, "no standby waiting for its task");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let ahead = Runtime::new(env.state_root())
        .with_shim(&shim)
        .with_warm_supervisor();
    assert_eq!(
        held(&ahead).len(),
        1,
        "a default standby makes its netns ahead"
    );
    drop(ahead);
    let rt = Runtime::new(env.state_root())
        .with_shim(&shim)
        .with_warm_supervisor()
        .without_netns_ahead();
    assert_eq!(held(&rt), Vec::<PathBuf>::new());
    let spec = TaskSpec {
        name: "nn1".into(),
        image: "busybox".into(),
        rootfs: env.rootfs.clone(),
        process: Process {
            args: vec!["readlink".into(), "/proc/self/ns/net".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
        },
        ..Default::default()
    };
    let mut task = rt.launch(spec).unwrap();
    let st = task.wait().unwrap();
    task.finish();
    assert_eq!(st.exit_code, Some(0), "{st:?}");
    let out = std::fs::read_to_string(rt.dir(&st_id(&rt, "nn1")).stdout_log()).unwrap();
    assert_ne!(Path::new(out.trim()), host_ns, "{out}");
    rt.remove(&st_id(&rt, "nn1"), false).unwrap();
}
