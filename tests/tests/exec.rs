//! `caisson exec`: a command in a running task, as podman's exec: its namespaces (pid, mount,
//! uts, ipc, net, user, cgroup), cgroups and security context, its environment, user and
//! working directory unless overridden; exit codes, stdin only with -i, signals passed on.
//! Real containers, as root.
use std::io::Write;
use std::process::Stdio;

use caisson_tests::*;

const IMAGE: &str = "localhost/oci:latest";

/// A detached task that wrote /ready, sleeping.
fn sleeper(c: &Caisson, opts: &[&str]) -> String {
    let mut args = vec!["run", "-d", "-e", "FOO=bar", "-w", "/bin"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[IMAGE, "sh", "-c", "echo data > /ready; exec sleep 300"]);
    let id = c.ok(&args).trim().to_string();
    eventually("the task to be ready", || {
        c.run(&["exec", &id, "cat", "/ready"]).0 == 0
    });
    id
}

/// Namespaces of the exec'd process that differ from the task's init's (`/proc/1` inside).
const SAME_NS: &str = "for n in mnt net uts ipc pid user cgroup; do \
    [ \"$(readlink /proc/self/ns/$n)\" = \"$(readlink /proc/1/ns/$n)\" ] || echo differs $n; done";

#[test]
fn root_exec_runs_in_the_task_with_its_context() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let id = sleeper(&c, &["--name", "target", "--hostname", "box"]);
    // By name; its namespaces, filesystem, hostname, environment, cwd, user, security.
    let script = format!(
        "echo pid=$$; cat /ready; hostname; echo FOO=$FOO; pwd; id -u; {SAME_NS}; \
         grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
         grep -E '^CapBnd:' /proc/1/status; cat /proc/self/cgroup"
    );
    let out = c.ok(&["exec", "target", "sh", "-c", &script]);
    let lines: Vec<&str> = out.lines().collect();
    let pid: u32 = lines[0].strip_prefix("pid=").unwrap().parse().unwrap();
    assert!(pid > 1, "in the task's pid namespace, not its init: {out}");
    assert_eq!(
        &lines[1..6],
        ["data", "box", "FOO=bar", "/bin", "0"],
        "{out}"
    );
    assert!(!out.contains("differs"), "{out}");
    let bnd: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("CapBnd:"))
        .copied()
        .collect();
    assert_eq!(bnd.len(), 2, "{out}");
    assert_eq!(bnd[0], bnd[1], "the init's bounding set: {out}");
    assert!(
        out.contains("NoNewPrivs:\t1") && out.contains("Seccomp:\t2"),
        "{out}"
    );
    // Its cgroups are the task's (v1: each controller's line names it; v2: the one line).
    let cg: Vec<&str> = lines.iter().filter(|l| l.contains(":/")).copied().collect();
    assert!(cg.iter().any(|l| l.contains(&id)), "{out}");

    // Overrides, exit codes.
    let (code, out, err) = c.run(&[
        "exec",
        "-e",
        "FOO=baz",
        "-u",
        "1000:1000",
        "-w",
        "/etc",
        &id,
        "sh",
        "-c",
        "echo $FOO; id -u; id -g; pwd; exit 3",
    ]);
    assert_eq!(
        (code, out.as_str()),
        (3, "baz\n1000\n1000\n/etc\n"),
        "{err}"
    );
    let (code, _, err) = c.run(&["exec", &id, "nosuch"]);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("nosuch"), "{err}");
    let (code, _, err) = c.run(&["exec", &id, "/etc/motd"]);
    assert_eq!(code, 126, "{err}");

    // stdin: ours with -i, /dev/null without.
    for (flag, want) in [(Some("-i"), "hello\n"), (None, "")] {
        let mut cmd = c.cmd();
        cmd.arg("exec");
        cmd.args(flag);
        let mut child = cmd
            .args([&id, "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"hello\n");
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{flag:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{flag:?}");
    }

    // A signal to exec is passed on to the process: SIGTERM ends `sleep` (143).
    let mut child = c.cmd().args(["exec", &id, "sleep", "60"]).spawn().unwrap();
    eventually("the exec'd sleep", || {
        c.run(&["exec", &id, "sh", "-c", "ps | grep -c 'sleep 60$'"])
            .1
            .trim()
            == "1"
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(143));
    // Nothing of the execs is left in the task; the task runs on.
    let out = c.ok(&["exec", &id, "sh", "-c", "exec ps -o pid,args"]);
    let procs: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(procs.len(), 2, "the init and this ps: {out}");
    assert!(procs[0].contains("sleep 300"), "{out}");

    // -d: back at once, the process goes on in the task.
    c.ok(&[
        "exec",
        "-d",
        &id,
        "sh",
        "-c",
        "touch /detached; exec sleep 30",
    ]);
    // (`exec -d` returns before the process has run: until it has, `ls` fails.)
    eventually("the detached process", || {
        let (code, out, _) = c.run(&["exec", &id, "sh", "-c", "ls /detached && ps -o args"]);
        code == 0 && out.contains("/detached") && out.contains("sleep 30")
    });
    let (code, _, err) = c.run(&["exec", "-d", "-t", &id, "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("neither -i nor -t"), "{err}");

    // Not running, not there: 125 and a message.
    c.ok(&["stop", "-t", "0", &id]);
    let (code, _, err) = c.run(&["exec", &id, "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("is not running"), "{err}");
    let (code, _, err) = c.run(&["exec", "nosuchtask", "true"]);
    assert_eq!(code, 125);
    assert!(err.contains("no container"), "{err}");
    c.ok(&["rm", &id]);
}

#[test]
fn root_exec_joins_the_tasks_user_namespace() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let id = sleeper(&c, &["--userns=auto"]);
    let script = format!(
        "id -u; cat /proc/self/uid_map; cat /proc/1/uid_map; touch /new; ls -ln /new; {SAME_NS}"
    );
    let out = c.ok(&["exec", &id, "sh", "-c", &script]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "{out}");
    assert_eq!(lines[1], lines[2], "the task's maps: {out}");
    assert_ne!(lines[1].split_whitespace().nth(1), Some("0"), "{out}");
    let f: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!((f[2], f[3]), ("0", "0"), "{out}");
    assert!(!out.contains("differs"), "{out}");
    c.ok(&["rm", "-f", &id]);
}

/// Whether the executable of process `pid` is on a read-only mount, and where it is.
fn exe_of(pid: u32) -> (bool, std::path::PathBuf) {
    let exe = format!("/proc/{pid}/exe");
    let ro = nix::sys::statvfs::statvfs(exe.as_str())
        .unwrap()
        .flags()
        .contains(nix::sys::statvfs::FsFlags::ST_RDONLY);
    (ro, std::fs::read_link(&exe).unwrap())
}

#[test]
fn root_supervisors_and_exec_helpers_run_from_a_read_only_mount() {
    // A task's init and an exec'd process are forks of caisson-shim until their exec: a task
    // that gets one to run its own binary (`#!/proc/self/exe`) must not be able to write it
    // through /proc/PID/exe (runc's CVE-2019-5736).
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let id = sleeper(&c, &[]);
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["inspect", &id])).unwrap();
    let shim_pid = v[0]["state"]["shim_pid"].as_u64().unwrap() as u32;
    let (ro, path) = exe_of(shim_pid);
    assert!(ro, "the supervisor runs from {}", path.display());
    assert!(path.starts_with("/run/caisson/bin"), "{}", path.display());
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        std::fs::metadata(&path).unwrap(),
        std::fs::metadata(caisson_bin().with_file_name("caisson-shim")).unwrap(),
    );
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "the same binary");

    // The exec helper (the CLI becomes it) too.
    let mut child = c.cmd().args(["exec", &id, "sleep", "30"]).spawn().unwrap();
    let pid = child.id();
    eventually("the exec helper", || {
        exe_of(pid).1.starts_with("/run/caisson/bin")
    });
    assert!(exe_of(pid).0);
    child.kill().unwrap();
    let _ = child.wait();
    c.ok(&["rm", "-f", &id]);
}
