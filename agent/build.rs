//! Link flags of the binaries.
fn main() {
    // The Wasm host runs once per service, and a position-independent executable dirties ~900
    // KiB of relocated pointers (.data.rel.ro) in every process; linked at a fixed address those
    // pages stay clean and shared between all hosts (idle service: 1.5 MiB -> 0.65 MiB private).
    // The price: the host's own code is not address-randomized (libraries, heap, stacks and the
    // guests' compiled code still are).
    println!("cargo:rustc-link-arg-bin=caisson-wasm=-no-pie");
}
