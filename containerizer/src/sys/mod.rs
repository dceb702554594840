//! Raw syscalls: the only module where `unsafe` is allowed. Each block carries a `// SAFETY:` note.
pub mod launch;
pub mod mount;
pub mod seccomp;
