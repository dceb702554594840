//! caisson's containerizer: the library that does the work (no gRPC, no global state).
pub mod image;
pub mod sys;
pub mod wasm;
