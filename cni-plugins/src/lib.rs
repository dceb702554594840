//! caisson's CNI plugins: `loopback`, `host-local`, `bridge`, `portmap` (and the shared parts).
//! Each binary is a thin `main` over [`skel::run`]: parameters from the environment,
//! configuration from stdin, a result or an error document on stdout, exit status 0 or 1, as the
//! CNI spec says, so that any CNI runtime can drive them. A runtime linking this crate may run a
//! binary of this build in-process instead ([`identity`], [`skel::invoke`]).

pub mod hostlocal;
pub mod identity;
pub mod ipam;
pub mod nl;
pub mod plugins;
pub mod skel;
pub mod types;

pub use skel::{run, Args, CniError};
