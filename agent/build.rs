//! Link flags of the binaries.
fn main() {
    // The Wasm host runs once per service, and a position-independent executable dirties ~900
    // KiB of relocated pointers (.data.rel.ro) in every process; linked at a fixed address those
    // pages stay clean and shared between all hosts (idle service: 1.5 MiB -> 0.65 MiB private).
    // The price: the host's own code is not address-randomized (libraries, heap, stacks and the
    // guests' compiled code still are).
    // `CAISSON_PIE=1` at build time keeps the binaries position-independent.
    println!("cargo:rerun-if-env-changed=CAISSON_PIE");
    if std::env::var_os("CAISSON_PIE").is_some_and(|v| v == "1") {
        return;
    }
    // A static musl build is made non-PIE by `-C relocation-model=static` (.cargo/config.toml):
    // `-no-pie` on its static-pie start files would leave it unrelocated.
    if std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|e| e == "musl") {
        return;
    }
    println!("cargo:rustc-link-arg-bin=caisson-wasm=-no-pie");
    // The CLI: a position-independent caisson applies ~67k relative relocations and dirties
    // their pages at every start (~2.5 ms of a `caisson run` of ~3-15 ms); at a fixed address
    // it starts in about a third of that. Same price as above (its own code is not
    // address-randomized).
    println!("cargo:rustc-link-arg-bin=caisson=-no-pie");
    // The supervisor starts once per native task: ~12k relocations at every start.
    println!("cargo:rustc-link-arg-bin=caisson-shim=-no-pie");
}
