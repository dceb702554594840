//! caisson's containerizer: the library that does the work (no gRPC, no global state).
pub mod cdi;
pub mod cgroups;
pub mod gpu;
pub mod image;
pub mod launch;
pub mod net;
pub mod sys;
pub mod wasm;
