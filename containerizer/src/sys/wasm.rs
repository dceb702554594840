//! Loading precompiled Wasm artifacts by mmap: wasmtime marks this `unsafe` because a forged
//! artifact is native code. The wasm module's compile cache is the only caller.
use std::path::Path;

/// Maps a precompiled core module from `path` (written by `Module::serialize` of an engine with
/// the same compatibility hash).
///
/// The caller promises that `path` lies in a cache directory that only the agent writes, and that
/// cache files are replaced by rename, never rewritten in place (the mapping must not change).
pub fn deserialize_module_file(
    engine: &wasmtime::Engine,
    path: &Path,
) -> wasmtime::Result<wasmtime::Module> {
    // SAFETY: the file was produced by `Module::serialize` in our private cache directory and is
    // never modified in place (atomic rename); wasmtime still checks the header and the engine
    // compatibility before use.
    unsafe { wasmtime::Module::deserialize_file(engine, path) }
}

/// Same as [`deserialize_module_file`] for a component.
pub fn deserialize_component_file(
    engine: &wasmtime::Engine,
    path: &Path,
) -> wasmtime::Result<wasmtime::component::Component> {
    // SAFETY: as in `deserialize_module_file`: our own serialized artifact, replaced only by rename.
    unsafe { wasmtime::component::Component::deserialize_file(engine, path) }
}

/// Gives the heap's free pages back to the kernel (glibc `malloc_trim`): a long-lived Wasm
/// service host calls it when it goes idle, so the garbage of loading the component or of a
/// burst of requests does not stay resident in every idle service. Nothing in a musl build (the
/// installed Wasm hosts, `caisson-wasm`, are glibc programs: scripts/build-dist.sh).
pub fn release_free_heap() {
    // SAFETY: malloc_trim only inspects and trims the allocator's own free lists; it is
    // thread-safe (it takes each arena's lock) and touches no memory the caller owns.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time (user + system) the calling thread has used, in nanoseconds: what a task of the
/// shared Wasm host is charged, since its tasks share one process and one cgroup.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_THREAD_CPUTIME_ID always exists
    // on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
