//! `caisson-shim DIR`: the per-task supervisor. Single-threaded on purpose: it forks the task's
//! init, so it must never start a thread (see `containerizer::launch::shim`).
fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: caisson-shim TASK_DIR");
        std::process::exit(2);
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let code = containerizer::launch::shim::main(std::path::Path::new(&dir));
    std::process::exit(code);
}
