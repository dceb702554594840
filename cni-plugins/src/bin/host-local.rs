//! `host-local` IPAM plugin (see `caisson_cni_plugins::hostlocal`).
use caisson_cni_plugins::skel::{Args, CniError, Plugin};
use caisson_cni_plugins::{hostlocal, run};
use serde_json::Value;

struct HostLocal;

impl Plugin for HostLocal {
    fn add(&self, args: &Args) -> Result<Value, CniError> {
        hostlocal::add(args)
    }
    fn check(&self, args: &Args) -> Result<(), CniError> {
        hostlocal::check(args)
    }
    fn del(&self, args: &Args) -> Result<(), CniError> {
        hostlocal::del(args)
    }
    fn gc(&self, args: &Args) -> Result<(), CniError> {
        hostlocal::gc(args)
    }
}

fn main() {
    run(&HostLocal)
}
