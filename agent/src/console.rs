//! The foreground `run -i`/`-t`: our stdin to the task, its terminal to our stdout, our
//! terminal in raw mode while attached (as podman does), window size changes passed on.
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use containerizer::launch::console::Console;
use containerizer::sys::term::{self, WinSize};
use nix::sys::termios::{self, SetArg, Termios};

/// Our terminal's size, if stdin is one.
pub fn window_size() -> Option<WinSize> {
    term::window_size(std::io::stdin().as_fd())
}

/// With `tty`, the size (rows, columns) to give the task's terminal: our terminal's, if any.
pub fn tty_size(tty: bool) -> Option<(u16, u16)> {
    tty.then(window_size).flatten().map(|s| (s.rows, s.cols))
}

/// Puts our terminal into raw mode until dropped (keys, ^C included, go to the task).
struct RawMode(Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

/// An attached task's streams; `finish` once the task has exited.
pub struct Attached {
    output: Option<JoinHandle<()>>,
    writer: Arc<Mutex<Console>>,
    _raw: Option<RawMode>,
}

impl Attached {
    /// Starts the pumps: with `tty` the task's terminal output to our stdout; with
    /// `interactive` our stdin to the task (raw mode when both and stdin is a terminal).
    pub fn start(console: Console, tty: bool, interactive: bool) -> std::io::Result<Attached> {
        let writer = Arc::new(Mutex::new(console.try_clone()?));
        let output = if tty {
            let mut reader = console;
            Some(std::thread::spawn(move || {
                let _ = reader.copy_output(&mut std::io::stdout().lock());
            }))
        } else {
            None
        };
        let raw = (tty && interactive && window_size().is_some())
            .then(RawMode::enter)
            .flatten();
        if interactive {
            let writer = writer.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut stdin = std::io::stdin().lock();
                loop {
                    let n = match stdin.read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => 0,
                    };
                    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                    let sent = if n == 0 {
                        w.close_stdin()
                    } else {
                        w.send_stdin(&buf[..n])
                    };
                    if n == 0 || sent.is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Attached {
            output,
            writer,
            _raw: raw,
        })
    }

    /// What passes our terminal's new size on (call it on SIGWINCH).
    pub fn resizer(&self) -> impl Fn() + Send + 'static {
        let writer = self.writer.clone();
        move || {
            if let Some(size) = window_size() {
                let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                let _ = w.resize(size);
            }
        }
    }

    /// Waits for the last of the task's terminal output, then restores our terminal.
    pub fn finish(self) {
        if let Some(t) = self.output {
            let _ = t.join();
        }
        let _ = std::io::stdout().flush();
    }
}

/// `exec -t`: the process's terminal master relayed directly (no supervisor in between): its
/// output to our stdout, with `interactive` our stdin to it (our terminal raw meanwhile).
pub struct PtyAttached {
    output: JoinHandle<()>,
    master: Arc<std::fs::File>,
    _raw: Option<RawMode>,
}

impl PtyAttached {
    pub fn start(master: std::os::fd::OwnedFd, interactive: bool) -> std::io::Result<Self> {
        let master = Arc::new(std::fs::File::from(master));
        let output = {
            let master = master.clone();
            std::thread::spawn(move || {
                let mut out = std::io::stdout().lock();
                // EIO once every holder of the terminal is gone.
                let _ = std::io::copy(&mut &*master, &mut out);
                let _ = out.flush();
            })
        };
        let raw = (interactive && window_size().is_some())
            .then(RawMode::enter)
            .flatten();
        if interactive {
            let master = master.clone();
            // At our EOF the terminal stays: the process ends it (a shell at its own ^D).
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut &*master);
            });
        }
        Ok(PtyAttached {
            output,
            master,
            _raw: raw,
        })
    }

    /// What passes our terminal's new size on (call it on SIGWINCH).
    pub fn resizer(&self) -> impl Fn() + Send + 'static {
        let master = self.master.clone();
        move || {
            if let Some(size) = window_size() {
                let _ = term::set_window_size(master.as_fd(), size);
            }
        }
    }

    /// Waits for the last of the terminal's output, then restores our terminal.
    pub fn finish(self) {
        let _ = self.output.join();
    }
}
