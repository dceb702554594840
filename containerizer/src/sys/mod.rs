//! Raw syscalls: the only module where `unsafe` is allowed. Each block carries a `// SAFETY:` note.
pub mod bpf;
pub mod launch;
pub mod mount;
pub mod netns;
pub mod seccomp;
pub mod term;
pub mod wasm;

/// Restores the default SIGPIPE action, so a CLI whose output goes to a closed pipe (`| head`)
/// exits quietly like any Unix tool instead of failing on a write.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler code; called at start-up before threads exist.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}
