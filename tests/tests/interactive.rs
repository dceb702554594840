//! `caisson run -i` and `-t` (podman's flags): stdin reaches the task, a terminal of the
//! user's size, raw mode while attached and restored after, terminal output in the logs.
use caisson_tests::*;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

const IMAGE: &str = "localhost/oci:latest";

fn setup() -> Option<Caisson> {
    if !require_root() || !require_tool("umoci") {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "latest").unwrap();
    let c = Caisson::new();
    c.ok(&["load", "-q", "-i", &format!("{}:latest", layout.display())]);
    Some(c)
}

fn run_with_stdin(c: &Caisson, args: &[&str], input: &[u8]) -> (i32, String, String) {
    let mut child = c
        .cmd()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A task that ends without reading all of it closes the pipe: not an error here.
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn stdin_reaches_an_interactive_task_and_only_with_i() {
    let Some(c) = setup() else { return };
    let script = r#"read a; read b; echo "got $a $b"; cat; echo end"#;
    let (code, out, err) = run_with_stdin(
        &c,
        &["run", "--rm", "-i", IMAGE, "/bin/sh", "-c", script],
        b"x\ny\nthe rest\n",
    );
    assert_eq!(code, 0, "{out}{err}");
    // `cat` ended: the end of our stdin reached the task.
    assert_eq!(out, "got x y\nthe rest\nend\n", "{err}");
    // Without -i the task's stdin is /dev/null, whatever ours holds.
    let (code, out, err) = run_with_stdin(
        &c,
        &["run", "--rm", IMAGE, "/bin/sh", "-c", "cat; echo end"],
        b"not for the task\n",
    );
    assert_eq!((code, out.as_str()), (0, "end\n"), "{err}");
    // A large input arrives whole (frames are split and reassembled).
    let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (code, out, err) = run_with_stdin(
        &c,
        &["run", "--rm", "-i", IMAGE, "/bin/busybox", "wc", "-c"],
        &big,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "200000");
}

/// Reads what is there on a non-blocking descriptor until `until` is in it or time runs out.
fn read_until(master: &mut std::fs::File, got: &mut Vec<u8>, until: &str, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if String::from_utf8_lossy(got).contains(until) {
            return true;
        }
        match master.read(&mut buf) {
            Ok(0) => return String::from_utf8_lossy(got).contains(until),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => return String::from_utf8_lossy(got).contains(until),
        }
    }
    String::from_utf8_lossy(got).contains(until)
}

/// Runs caisson with `args` on a terminal of `rows` x `cols` (a pty of ours), types `input`
/// and reads until `until`; returns what the terminal showed and the exit code, and checks
/// that our terminal's modes are as before (raw mode was ours only while attached).
fn on_terminal(
    c: &Caisson,
    args: &[&str],
    (rows, cols): (u16, u16),
    input: &[u8],
    until: &str,
) -> (String, Option<i32>) {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).unwrap();
    let before = nix::sys::termios::tcgetattr(pty.slave.as_fd()).unwrap();
    let slave = || Stdio::from(pty.slave.try_clone().unwrap());
    let mut child = c
        .cmd()
        .args(args)
        .stdin(slave())
        .stdout(slave())
        .stderr(slave())
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut got = vec![];
    master.write_all(input).unwrap();
    let ended = read_until(&mut master, &mut got, until, 30);
    let status = wait_timeout(&mut child, Duration::from_secs(30));
    read_until(&mut master, &mut got, "\u{0}never", 1);
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(ended, "no {until:?} from {args:?}: {text:?}");
    let after = nix::sys::termios::tcgetattr(pty.slave.as_fd()).unwrap();
    assert_eq!(after.local_flags, before.local_flags, "{args:?}");
    assert_eq!(after.input_flags, before.input_flags, "{args:?}");
    (text, status)
}

/// What the shells below type: answers computed inside (the typed echo cannot match them).
const TYPED: &[u8] = b"busybox tty; busybox stty size; echo $((6*7))x; exit 3\r";

#[test]
fn a_tty_task_gets_a_terminal_of_our_size_and_ours_is_restored() {
    let Some(c) = setup() else { return };
    let (text, status) = on_terminal(
        &c,
        &["run", "--rm", "-it", IMAGE, "/bin/sh"],
        (33, 101),
        TYPED,
        "42x",
    );
    assert!(text.contains("/dev/pts/0"), "not a terminal: {text:?}");
    assert!(text.contains("33 101"), "not our size: {text:?}");
    assert_eq!(status, Some(3), "{text:?}");
}

#[test]
fn exec_it_gives_the_process_a_terminal_in_the_task() {
    let Some(c) = setup() else { return };
    let id = c.ok(&["run", "-d", IMAGE, "/bin/sh", "-c", "exec sleep 300"]);
    let id = id.trim();
    let (text, status) = on_terminal(&c, &["exec", "-it", id, "/bin/sh"], (40, 120), TYPED, "42x");
    // The task's own devpts (a task without -t has made none: the first).
    assert!(text.contains("/dev/pts/0"), "not a terminal: {text:?}");
    assert!(text.contains("40 120"), "not our size: {text:?}");
    assert_eq!(status, Some(3), "{text:?}");
    // -t alone: output through the terminal, our stdin not read; the code passed on.
    let out = c
        .cmd()
        .args(["exec", "-t", id, "/bin/sh", "-c", "busybox tty; exit 6"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/dev/pts/0\r\n");
    c.ok(&["rm", "-f", id]);
}

fn wait_timeout(child: &mut std::process::Child, t: Duration) -> Option<i32> {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

#[test]
fn a_detached_tty_task_logs_its_terminal_and_keeps_stdin_open() {
    let Some(c) = setup() else { return };
    // -t alone: a terminal, output in the logs (with the terminal's line endings).
    let out = c.ok(&[
        "run",
        "-t",
        IMAGE,
        "/bin/sh",
        "-c",
        "busybox tty; echo hello-tty",
    ]);
    assert!(out.contains("hello-tty"), "{out}");
    let id = c.ok(&[
        "run",
        "-d",
        "-t",
        IMAGE,
        "/bin/sh",
        "-c",
        "echo from-d; busybox tty",
    ]);
    let id = id.trim();
    eventually("the detached tty task's output in its logs", || {
        let logs = c.ok(&["logs", id]);
        logs.contains("from-d") && logs.contains("/dev/pts/0")
    });
    // -dit: the shell reads a terminal nobody writes to, so it keeps running.
    let id = c.ok(&["run", "-d", "-i", "-t", IMAGE, "/bin/sh"]);
    let id = id.trim();
    std::thread::sleep(Duration::from_millis(500));
    let ps: serde_json::Value = serde_json::from_str(&c.ok(&["ps", "--json"])).unwrap();
    assert!(
        ps.as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"].as_str() == Some(id)),
        "{ps}"
    );
    c.ok(&["rm", "-f", id]);
    // Wasm tasks take neither.
    let wat = c.root.path().join("hello.wat");
    std::fs::write(&wat, "(module (func (export \"_start\")))").unwrap();
    let (code, _, err) = c.run(&["run", "--rm", "-i", wat.to_str().unwrap()]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("-i and -t"), "{err}");
}
