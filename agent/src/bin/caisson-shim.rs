//! `caisson-shim DIR [SPAWNED_NS]` (or `caisson-shim --standby`, started ahead of its task:
//! `containerizer::launch::standby`, or `caisson-shim --fork-server`, which forks such standbys
//! for a long-running launcher, or `caisson-shim --sandbox DIR`, a warm sandbox:
//! `containerizer::launch::sandbox`, or `caisson-shim --exec DIR SPEC`, a process started in a
//! running task: `containerizer::launch::exec`): the per-task supervisor. Single-threaded on purpose: it
//! forks the task's init, so it must never start a thread (see `containerizer::launch::shim`).
fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: caisson-shim TASK_DIR [SPAWNED_NS]");
        std::process::exit(2);
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if dir == containerizer::launch::standby::FORK_SERVER_ARG {
        std::process::exit(containerizer::launch::standby::fork_server_main());
    }
    if dir == containerizer::launch::standby::STANDBY_ARG {
        std::process::exit(containerizer::launch::standby::main());
    }
    if dir == containerizer::launch::exec::EXEC_ARG {
        let mut rest = std::env::args_os().skip(2);
        let (Some(task), Some(spec)) =
            (rest.next(), rest.next().and_then(|s| s.into_string().ok()))
        else {
            eprintln!("usage: caisson-shim --exec TASK_DIR SPEC_JSON");
            std::process::exit(2);
        };
        let code = containerizer::launch::exec::main(std::path::Path::new(&task), &spec);
        std::process::exit(code);
    }
    if dir == containerizer::launch::sandbox::SANDBOX_ARG {
        let Some(sandbox) = std::env::args_os().nth(2) else {
            eprintln!("usage: caisson-shim --sandbox DIR");
            std::process::exit(2);
        };
        let code = containerizer::launch::sandbox::main(std::path::Path::new(&sandbox));
        std::process::exit(code);
    }
    let spawned_ns = std::env::args().nth(2).and_then(|s| s.parse().ok());
    let code = containerizer::launch::shim::main(std::path::Path::new(&dir), spawned_ns);
    std::process::exit(code);
}
