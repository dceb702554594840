//! `loopback`: brings `lo` up inside the task's namespace.
use crate::nl;
use crate::skel::{code, Args, CniError, Plugin};
use crate::types::{CniResult, Interface, IpConfig};
use rtnetlink::LinkUnspec;
use serde_json::{json, Value};

pub struct Loopback;

impl Plugin for Loopback {
    fn add(&self, args: &Args) -> Result<Value, CniError> {
        let ns = nl::open_netns(&args.netns)?;
        nl::runtime().block_on(async {
            let h = nl::connect_in(&ns)?;
            nl::set_up(&h, "lo").await
        })?;
        // Chained after another plugin: pass its result on unchanged (as the reference does).
        if let Some(prev) = &args.conf.prev_result {
            return Ok(prev.clone());
        }
        let r = CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                mac: "00:00:00:00:00:00".into(),
                sandbox: args.netns.clone(),
            }],
            ips: ["127.0.0.1/8", "::1/128"]
                .iter()
                .map(|a| IpConfig {
                    interface: Some(0),
                    address: a.parse().expect("literal"),
                    gateway: None,
                })
                .collect(),
            routes: vec![],
            dns: json!({}),
        };
        Ok(r.to_json(&args.conf.cni_version))
    }

    fn check(&self, args: &Args) -> Result<(), CniError> {
        let ns = nl::open_netns(&args.netns)?;
        let up = nl::runtime().block_on(async {
            let h = nl::connect_in(&ns)?;
            let l = nl::link(&h, "lo").await?;
            Ok::<_, CniError>(l.is_some_and(|l| {
                l.header
                    .flags
                    .contains(netlink_packet_route::link::LinkFlags::Up)
            }))
        })?;
        if up {
            Ok(())
        } else {
            Err(CniError::new(
                code::UNKNOWN_CONTAINER,
                "loopback interface is down",
            ))
        }
    }

    fn del(&self, args: &Args) -> Result<(), CniError> {
        // DEL must succeed when the namespace is already gone.
        let Ok(ns) = std::fs::File::open(&args.netns) else {
            return Ok(());
        };
        nl::runtime().block_on(async {
            let h = nl::connect_in(&ns)?;
            if let Some(l) = nl::link(&h, "lo").await? {
                let m = LinkUnspec::new_with_index(l.header.index).down().build();
                h.link()
                    .set(m)
                    .execute()
                    .await
                    .map_err(|e| nl::err("setting lo down", e))?;
            }
            Ok(())
        })
    }
}
