//! Interactive tasks (`run -i`, `-t`, podman's flags). The supervisor owns the task's side: a
//! pipe for its stdin (`-i`), or a pseudo-terminal for all three streams (`-t`), whose output
//! it appends to the stdout log (so `logs` works as for any task) and forwards to the launcher.
//!
//! The launcher that wants the streams (a foreground `run`) hands the supervisor one end of a
//! socket pair at spawn, so no output is missed and nobody else can attach. Frames from the
//! launcher: a kind byte, a big-endian u16 length, the payload: `d` stdin bytes, `e` end of
//! stdin, `w` window size (rows, cols: u16 each). From the supervisor: the raw terminal
//! output (only with `-t`), then end of stream once the task's terminal is closed.
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use crate::sys::term::{self, WinSize};

/// Environment variable carrying the inherited socket's descriptor number to the supervisor.
pub(super) const FD_ENV: &str = "CAISSON_CONSOLE_FD";

const DATA: u8 = b'd';
const EOF: u8 = b'e';
const RESIZE: u8 = b'w';

/// Writes one frame (the payload is split if longer than a frame holds).
fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut chunks = payload.chunks(u16::MAX as usize).peekable();
    if chunks.peek().is_none() {
        return w.write_all(&[kind, 0, 0]);
    }
    for c in chunks {
        let mut frame = Vec::with_capacity(3 + c.len());
        frame.push(kind);
        frame.extend_from_slice(&(c.len() as u16).to_be_bytes());
        frame.extend_from_slice(c);
        w.write_all(&frame)?;
    }
    Ok(())
}

/// Reads one frame; `None` at the end of the stream.
fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 3];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut payload = vec![0u8; u16::from_be_bytes([head[1], head[2]]) as usize];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// The launcher's end: send stdin and window sizes, read the terminal output.
#[derive(Debug)]
pub struct Console {
    stream: UnixStream,
}

impl Console {
    pub(super) fn new(stream: UnixStream) -> Console {
        Console { stream }
    }

    /// A second handle on the same stream (e.g. one thread reads output, another writes).
    pub fn try_clone(&self) -> io::Result<Console> {
        Ok(Console {
            stream: self.stream.try_clone()?,
        })
    }

    pub fn send_stdin(&mut self, bytes: &[u8]) -> io::Result<()> {
        write_frame(&mut self.stream, DATA, bytes)
    }

    /// The task's stdin ends (its pipe is closed; with a terminal, nothing happens: the user's
    /// end-of-file is a byte, ^D, sent as data).
    pub fn close_stdin(&mut self) -> io::Result<()> {
        write_frame(&mut self.stream, EOF, &[])
    }

    pub fn resize(&mut self, size: WinSize) -> io::Result<()> {
        let mut p = size.rows.to_be_bytes().to_vec();
        p.extend_from_slice(&size.cols.to_be_bytes());
        write_frame(&mut self.stream, RESIZE, &p)
    }

    /// Copies the task's terminal output to `out` until the terminal is closed.
    pub fn copy_output(&mut self, out: &mut impl Write) -> io::Result<u64> {
        let mut buf = [0u8; 8192];
        let mut n_total = 0;
        loop {
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Ok(n_total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            out.write_all(&buf[..n])?;
            out.flush()?;
            n_total += n as u64;
        }
    }
}

/// The supervisor's side of an interactive task, made before the clone.
pub(super) enum TaskSide {
    /// `-i` without a terminal: the task reads `read`; we write `write`.
    Pipe { read: OwnedFd, write: OwnedFd },
    /// `-t`: the init makes the terminal in the task's own devpts, so that it has a name
    /// there (`tty`, job control and `/proc/self/fd/0` work as on any terminal), makes it its
    /// stdin, stdout, stderr and controlling terminal, and sends us the master over `theirs`.
    Pty { ours: UnixStream, theirs: OwnedFd },
}

impl TaskSide {
    pub(super) fn new(tty: bool) -> io::Result<Self> {
        if tty {
            let (ours, theirs) = UnixStream::pair()?;
            Ok(TaskSide::Pty {
                ours,
                theirs: theirs.into(),
            })
        } else {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            Ok(TaskSide::Pipe { read, write })
        }
    }

    /// The task's stdin (`-i` without a terminal).
    pub(super) fn stdin_pipe(&self) -> Option<&OwnedFd> {
        match self {
            TaskSide::Pipe { read, .. } => Some(read),
            TaskSide::Pty { .. } => None,
        }
    }

    /// Where the init sends the terminal's master (`-t`).
    pub(super) fn terminal_socket(&self) -> Option<&OwnedFd> {
        match self {
            TaskSide::Pipe { .. } => None,
            TaskSide::Pty { theirs, .. } => Some(theirs),
        }
    }

    /// After the init's exec: drops the task's ends and starts moving bytes: terminal output
    /// into `log` (and to the launcher), the launcher's frames into the task.
    pub(super) fn start(self, log: OwnedFd, launcher: Option<UnixStream>) -> io::Result<Pumps> {
        let (ours, tty) = match self {
            TaskSide::Pipe { write, .. } => (write, false),
            TaskSide::Pty { ours, theirs } => {
                drop(theirs);
                (term::recv_fd(ours.as_fd())?, true)
            }
        };
        let output = if tty {
            let master = File::from(ours.try_clone()?);
            let to = launcher.as_ref().map(|s| s.try_clone()).transpose()?;
            Some(
                std::thread::Builder::new()
                    .name("console-out".into())
                    .spawn(move || pump_output(master, File::from(log), to))?,
            )
        } else {
            None
        };
        // Without a launcher attached the write end stays open (the task's stdin does not end)
        // until the task does.
        let held = match launcher {
            Some(from) => {
                let into = File::from(ours);
                std::thread::Builder::new()
                    .name("console-in".into())
                    .spawn(move || pump_input(from, into, tty))?;
                None
            }
            None => Some(ours),
        };
        Ok(Pumps {
            output,
            _held: held,
        })
    }
}

/// In the task's init, after pivot_root: a terminal from the task's devpts as its stdin,
/// stdout, stderr and controlling terminal; the master goes to the supervisor over `sock`.
pub(super) fn make_task_terminal(sock: &OwnedFd, size: Option<WinSize>) -> io::Result<()> {
    use nix::fcntl::OFlag;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)?;
    if let Some(size) = size {
        term::set_window_size(slave.as_fd(), size)?;
    }
    for fd in 0..3 {
        crate::sys::launch::dup2(slave.as_raw_fd(), fd)?;
    }
    term::set_controlling_terminal(0)?;
    term::send_fd(sock.as_fd(), master.as_fd())
}

/// Running pumps; `finish` once the task has exited.
pub(super) struct Pumps {
    output: Option<JoinHandle<()>>,
    _held: Option<OwnedFd>,
}

impl Pumps {
    /// Waits until the task's terminal output is all logged and sent: the terminal closes when
    /// the last process holding it is gone, which the end of the task's pid namespace ensures.
    pub(super) fn finish(self) {
        if let Some(t) = self.output {
            let _ = t.join();
        }
    }
}

fn pump_output(mut master: File, mut log: File, mut to: Option<UnixStream>) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EIO: every slave descriptor is closed.
            Err(_) => break,
        };
        if let Err(e) = log.write_all(&buf[..n]) {
            tracing::warn!("writing the terminal output to the log: {e}");
        }
        if let Some(s) = &mut to {
            if s.write_all(&buf[..n]).is_err() {
                // The launcher is gone; the log still gets everything.
                to = None;
            }
        }
    }
    if let Some(s) = to {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
}

fn pump_input(mut from: UnixStream, mut into: File, tty: bool) {
    loop {
        match read_frame(&mut from) {
            Ok(Some((DATA, bytes))) => {
                if into.write_all(&bytes).is_err() {
                    break;
                }
            }
            Ok(Some((RESIZE, p))) if tty && p.len() == 4 => {
                let size = WinSize {
                    rows: u16::from_be_bytes([p[0], p[1]]),
                    cols: u16::from_be_bytes([p[2], p[3]]),
                };
                if let Err(e) = term::set_window_size(into.as_fd(), size) {
                    tracing::warn!("resizing the terminal: {e}");
                }
            }
            Ok(Some((EOF, _))) if !tty => break,
            Ok(Some(_)) => {}
            // The launcher is gone or closed its end: a pipe's stdin ends; a terminal stays
            // (the output pump holds its own descriptor on the master).
            Ok(None) | Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split() {
        let mut buf = vec![];
        write_frame(&mut buf, DATA, b"hello").unwrap();
        write_frame(&mut buf, EOF, &[]).unwrap();
        let big = vec![7u8; 70_000];
        write_frame(&mut buf, DATA, &big).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((DATA, b"hello".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((EOF, vec![])));
        let (_, a) = read_frame(&mut r).unwrap().unwrap();
        let (_, b) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((a.len(), b.len()), (65_535, 70_000 - 65_535));
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }
}
