//! The plugins themselves, each a [`Plugin`] that a thin binary runs ([`crate::run`]) and that a
//! runtime linking this crate may run in-process for a binary of this build
//! ([`crate::identity::is_ours`], [`crate::skel::invoke`]).

pub mod bridge;
pub mod loopback;
pub mod portmap;

use serde_json::Value;

use crate::skel::{Args, CniError, Plugin};

/// `host-local` IPAM (see [`crate::hostlocal`]).
pub struct HostLocal;

impl Plugin for HostLocal {
    fn add(&self, args: &Args) -> Result<Value, CniError> {
        crate::hostlocal::add(args)
    }
    fn check(&self, args: &Args) -> Result<(), CniError> {
        crate::hostlocal::check(args)
    }
    fn del(&self, args: &Args) -> Result<(), CniError> {
        crate::hostlocal::del(args)
    }
    fn gc(&self, args: &Args) -> Result<(), CniError> {
        crate::hostlocal::gc(args)
    }
}

/// Our plugin called `ty` (the config's `type`), if we have one.
pub fn by_type(ty: &str) -> Option<&'static (dyn Plugin + Sync)> {
    match ty {
        "bridge" => Some(&bridge::Bridge),
        "host-local" => Some(&HostLocal),
        "loopback" => Some(&loopback::Loopback),
        "portmap" => Some(&portmap::Portmap),
        _ => None,
    }
}
