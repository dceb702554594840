//! `bridge`: a veth pair between the task's namespace and a host bridge, addresses from the
//! IPAM plugin, optional gateway address on the bridge, hairpin mode and masquerading.
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::process::Command as Proc;

use crate::skel::{code, Args, CniError, Plugin};
use crate::types::{CniResult, Interface, Route};
use crate::{ipam, nl};
use ipnet::IpNet;
use rtnetlink::LinkUnspec;
use serde::Deserialize;
use serde_json::Value;
use std::os::unix::process::CommandExt;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conf {
    #[serde(default = "default_bridge")]
    bridge: String,
    #[serde(default)]
    is_gateway: bool,
    #[serde(default)]
    is_default_gateway: bool,
    #[serde(default)]
    ip_masq: bool,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    hairpin_mode: bool,
    /// Wait for the kernel to finish deleting the veth pair before DEL returns (slow: an RCU
    /// grace period). By default the deletion finishes in the background.
    #[serde(default)]
    sync_delete: bool,
}

fn default_bridge() -> String {
    "cni0".into()
}

fn conf(args: &Args) -> Result<Conf, CniError> {
    let v: Value = serde_json::from_slice(&args.stdin).map_err(|e| {
        CniError::new(code::DECODE, "decoding network configuration").with_details(e)
    })?;
    let mut c: Conf = serde_json::from_value(v)
        .map_err(|e| CniError::config("invalid bridge config").with_details(e))?;
    if c.bridge.is_empty() || c.bridge.len() > 15 || c.bridge.contains('/') {
        return Err(CniError::config(format!(
            "invalid bridge name {:?}",
            c.bridge
        )));
    }
    c.is_gateway |= c.is_default_gateway;
    Ok(c)
}

/// A random host-side name (`veth` + 8 hex digits), like the reference plugin's.
fn veth_name() -> String {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("veth{:08x}", r as u32)
}

/// The masquerade rule of a network: everything from the subnet leaving the subnet is NATed.
///
/// One rule per network and subnet (docker's choice), not per task: a per-task rule cost two
/// iptables runs in ADD and three in DEL, ~10 ms each, most of a networked launch. The rule
/// lives as long as the bridge: `caisson network rm` removes both.
fn masq_rule(subnet: &IpNet, network: &str) -> Vec<String> {
    let bin = if subnet.addr().is_ipv4() {
        "iptables"
    } else {
        "ip6tables"
    };
    let subnet = subnet.trunc().to_string();
    [
        bin,
        "-w",
        "-t",
        "nat",
        "POSTROUTING",
        "-s",
        &subnet,
        "!",
        "-d",
        &subnet,
        "-m",
        "comment",
        "--comment",
        &format!("caisson-cni {network}"),
        "-j",
        "MASQUERADE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn iptables(rule: &[String], op: &str) -> Result<bool, CniError> {
    let mut a = rule.to_vec();
    a.insert(4, op.to_owned());
    let out = Proc::new(&a[0])
        .args(&a[1..])
        .output()
        .map_err(|e| CniError::io(format!("running {}", a[0]), e))?;
    Ok(out.status.success())
}

/// Where the bridge plugin remembers that a network's masquerade rule is in place: on tmpfs,
/// so a reboot (which also empties the nat table) forgets it.
const MASQ_STATE: &str = "/run/caisson-cni/masq";

/// Makes sure the network's masquerade rule exists. The marker records the bridge's ifindex:
/// while the same bridge lives, the rule made with it is assumed to live too and no iptables
/// process runs; a recreated bridge (network removed and made again) checks again.
fn ensure_masq(subnet: &IpNet, network: &str, bridge_index: u32) -> Result<(), CniError> {
    let rule = masq_rule(subnet, network);
    let key: String = format!("{network}_{}", subnet.trunc())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let marker = std::path::Path::new(MASQ_STATE).join(key);
    let want = format!("{bridge_index} {}\n", rule.join(" "));
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == want) {
        return Ok(());
    }
    std::fs::create_dir_all(MASQ_STATE)
        .map_err(|e| CniError::io(format!("creating {MASQ_STATE}"), e))?;
    // Concurrent first ADDs of one network must not add the rule twice.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::path::Path::new(MASQ_STATE).join(".lock"))
        .map_err(|e| CniError::io("opening the masquerade lock", e))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| CniError::io("locking the masquerade state", e))?;
    if !iptables(&rule, "-C")? && !iptables(&rule, "-A")? {
        return Err(CniError::io("adding the masquerade rule", rule.join(" ")));
    }
    let tmp = marker.with_extension("tmp");
    std::fs::write(&tmp, want)
        .and_then(|()| std::fs::rename(&tmp, &marker))
        .map_err(|e| CniError::io(format!("writing {}", marker.display()), e))
}

fn enable_forwarding(v6: bool) {
    let p = if v6 {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    } else {
        "/proc/sys/net/ipv4/ip_forward"
    };
    if std::fs::read_to_string(p)
        .map(|s| s.trim() != "1")
        .unwrap_or(true)
    {
        let _ = std::fs::write(p, "1");
    }
}

pub struct Bridge;

impl Bridge {
    fn setup(
        &self,
        args: &Args,
        c: &Conf,
        r: &mut CniResult,
        host_veth: &mut Option<String>,
    ) -> Result<(), CniError> {
        let ns = nl::open_netns(&args.netns)?;
        nl::runtime().block_on(async {
            let h = nl::connect()?;
            let hc = nl::connect_in(&ns)?;
            let br = nl::ensure_bridge(&h, &c.bridge, c.mtu).await?;
            // No lookup first (a round trip on every ADD): the create fails with EEXIST if
            // either name is taken, and then we look which one it was.
            let host = loop {
                let name = veth_name();
                match nl::create_veth(&h, &name, &args.ifname, &ns, br.header.index, c.mtu).await {
                    Ok(()) => break name,
                    Err(e)
                        if nl::errno(&e) == Some(libc::EEXIST)
                            && nl::link(&hc, &args.ifname).await?.is_some() =>
                    {
                        return Err(CniError::config(format!(
                            "container veth name provided ({}) already exists",
                            args.ifname
                        )));
                    }
                    // Name collision on the host side: draw again.
                    Err(e)
                        if nl::errno(&e) == Some(libc::EEXIST)
                            && nl::link(&h, &name).await?.is_some() =>
                    {
                        continue
                    }
                    Err(e) => {
                        return Err(nl::err(
                            format!("creating veth pair {name}/{}", args.ifname),
                            e,
                        ))
                    }
                }
            };
            *host_veth = Some(host.clone());
            let hl = nl::link(&h, &host)
                .await?
                .ok_or_else(|| CniError::new(code::NETLINK, format!("veth {host} vanished")))?;
            if c.hairpin_mode {
                nl::set_hairpin(&h, hl.header.index).await?;
            }
            let cl = nl::link(&hc, &args.ifname).await?.ok_or_else(|| {
                CniError::new(
                    code::NETLINK,
                    format!("{} missing in the container", args.ifname),
                )
            })?;
            let cidx = cl.header.index;
            nl::set_index_up(&hc, cidx, &args.ifname).await?;
            for ip in &mut r.ips {
                ip.interface = Some(2);
                nl::add_addr(&hc, cidx, ip.address, false).await?;
            }
            if c.is_default_gateway {
                for ip in &r.ips {
                    let dst: IpNet = if ip.address.addr().is_ipv4() {
                        "0.0.0.0/0"
                    } else {
                        "::/0"
                    }
                    .parse()
                    .expect("literal");
                    if !r.routes.iter().any(|rt| rt.dst == dst) {
                        r.routes.push(Route {
                            dst,
                            gw: ip.gateway,
                        });
                    }
                }
            }
            for rt in &r.routes {
                // A route without its own gateway goes via the gateway of its address family.
                let gw = rt.gw.or_else(|| {
                    r.ips
                        .iter()
                        .find(|i| i.address.addr().is_ipv4() == rt.dst.addr().is_ipv4())
                        .and_then(|i| i.gateway)
                });
                nl::add_route(&hc, cidx, rt.dst, gw).await?;
            }
            if c.is_gateway {
                for ip in &r.ips {
                    if let Some(gw) = ip.gateway {
                        let net = IpNet::new(gw, ip.address.prefix_len())
                            .expect("prefix from an address");
                        nl::add_addr(&h, br.header.index, net, true).await?;
                        enable_forwarding(matches!(gw, IpAddr::V6(_)));
                    }
                }
            }
            if c.ip_masq {
                for ip in &r.ips {
                    ensure_masq(&ip.address, &args.conf.name, br.header.index)?;
                }
            }
            // The bridge's MAC can change when its first port joins: read it last.
            let br = nl::link(&h, &c.bridge).await?.unwrap_or(br);
            r.interfaces = vec![
                Interface {
                    name: c.bridge.clone(),
                    mac: nl::mac(&br),
                    sandbox: String::new(),
                },
                Interface {
                    name: host,
                    mac: nl::mac(&hl),
                    sandbox: String::new(),
                },
                Interface {
                    name: args.ifname.clone(),
                    mac: nl::mac(&cl),
                    sandbox: args.netns.clone(),
                },
            ];
            Ok(())
        })
    }
}

impl Plugin for Bridge {
    fn add(&self, args: &Args) -> Result<Value, CniError> {
        let c = conf(args)?;
        let mut r = ipam::add(args)?;
        let mut host_veth = None;
        if let Err(e) = self.setup(args, &c, &mut r, &mut host_veth) {
            // Undo: the pair goes with its host end; the addresses go back to IPAM.
            if let Some(h) = host_veth {
                let _ = nl::runtime().block_on(async { nl::del_link(&nl::connect()?, &h).await });
            }
            // The network's masquerade rule stays: it serves the network's other tasks.
            let _ = ipam::del(args);
            return Err(e);
        }
        Ok(r.to_json(&args.conf.cni_version))
    }

    fn check(&self, args: &Args) -> Result<(), CniError> {
        let c = conf(args)?;
        ipam::check(args)?;
        let prev = args
            .conf
            .prev_result
            .as_ref()
            .map(CniResult::from_value)
            .transpose()
            .map_err(|e| CniError::new(code::DECODE, "decoding prevResult").with_details(e))?
            .ok_or_else(|| CniError::config("CHECK needs a prevResult"))?;
        if c.ip_masq {
            for ip in &prev.ips {
                let rule = masq_rule(&ip.address, &args.conf.name);
                if !iptables(&rule, "-C")? {
                    return Err(CniError::new(
                        code::UNKNOWN_CONTAINER,
                        format!("the masquerade rule is gone: {}", rule.join(" ")),
                    ));
                }
            }
        }
        let ns = nl::open_netns(&args.netns)?;
        nl::runtime().block_on(async {
            let h = nl::connect()?;
            let hc = nl::connect_in(&ns)?;
            let br = nl::link(&h, &c.bridge).await?.ok_or_else(|| {
                CniError::new(
                    code::UNKNOWN_CONTAINER,
                    format!("bridge {} is gone", c.bridge),
                )
            })?;
            let cl = nl::link(&hc, &args.ifname).await?.ok_or_else(|| {
                CniError::new(
                    code::UNKNOWN_CONTAINER,
                    format!("{} is gone from the container", args.ifname),
                )
            })?;
            let have = nl::addrs(&hc, cl.header.index).await?;
            for ip in &prev.ips {
                if !have.contains(&ip.address) {
                    return Err(CniError::new(
                        code::UNKNOWN_CONTAINER,
                        format!("{} lost address {}", args.ifname, ip.address),
                    ));
                }
            }
            // The host end still sits on the bridge.
            for i in prev
                .interfaces
                .iter()
                .filter(|i| i.sandbox.is_empty() && i.name != c.bridge)
            {
                let l = nl::link(&h, &i.name).await?;
                if l.as_ref().and_then(nl::controller) != Some(br.header.index) {
                    return Err(CniError::new(
                        code::UNKNOWN_CONTAINER,
                        format!("{} is not on bridge {}", i.name, c.bridge),
                    ));
                }
            }
            Ok(())
        })
    }

    fn gc(&self, args: &Args) -> Result<(), CniError> {
        // Interfaces die with their namespaces; addresses are what can leak.
        if args.conf.ipam.is_some() {
            ipam::gc(args)?;
        }
        Ok(())
    }

    fn del(&self, args: &Args) -> Result<(), CniError> {
        let c = conf(args)?;
        if args.conf.ipam.is_some() {
            ipam::del(args)?;
        }
        // The masquerade rule is the network's, not the task's: it stays (see masq_rule).
        // No namespace any more: its interfaces, and with them the veth pair, are gone too.
        if args.netns.is_empty() {
            return Ok(());
        }
        let ns = match std::fs::File::open(&args.netns) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CniError::io(format!("opening netns {}", args.netns), e)),
        };
        if args.netns_doomed && !c.sync_delete {
            // The runtime (in-process) deletes the namespace right after us, and the pair goes
            // with it, in the kernel's background netns cleanup: no rename, no helper. Down now,
            // so that the address just released is not answered for while that runs.
            return nl::runtime().block_on(async {
                let hc = nl::connect_in(&ns)?;
                if let Some(l) = nl::link(&hc, &args.ifname).await? {
                    nl::set_index_down(&hc, l.header.index, &args.ifname).await?;
                }
                Ok(())
            });
        }
        if c.sync_delete {
            return nl::runtime().block_on(async {
                let hc = nl::connect_in(&ns)?;
                nl::del_link(&hc, &args.ifname).await.map(|_| ())
            });
        }
        // Unregistering a netdev waits for an RCU grace period (~16 ms on our test VMs), three
        // times what the whole DEL may cost. So: take the interface down (no more traffic),
        // rename it out of the way (the name is free for a new ADD at once), and let a
        // detached copy of this binary do the slow delete. If the namespace goes first, the
        // kernel removes the pair with it.
        let tomb = nl::runtime().block_on(async {
            let hc = nl::connect_in(&ns)?;
            let Some(l) = nl::link(&hc, &args.ifname).await? else {
                return Ok(None);
            };
            let tomb = format!(
                "cdel{:08x}",
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish() as u32
            );
            // Two requests: the kernel renames before it applies flags, and refuses to rename
            // an interface that is up.
            nl::set_index_down(&hc, l.header.index, &args.ifname).await?;
            let rename = LinkUnspec::new_with_index(l.header.index)
                .name(tomb.clone())
                .build();
            hc.link()
                .set(rename)
                .execute()
                .await
                .map_err(|e| nl::err(format!("retiring {}", args.ifname), e))?;
            Ok(Some(tomb))
        })?;
        if let Some(tomb) = tomb {
            // Our own binary (its path when a runtime runs us in-process).
            let spawned = Proc::new(&args.exe)
                .env_clear()
                .env(REAP_NETNS, &args.netns)
                .env(REAP_IF, &tomb)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .process_group(0)
                .spawn();
            if spawned.is_err() {
                // No helper: pay the price here rather than leak the pair.
                nl::runtime()
                    .block_on(async { nl::del_link(&nl::connect_in(&ns)?, &tomb).await })?;
            }
        }
        Ok(())
    }
}

const REAP_NETNS: &str = "CAISSON_CNI_REAP_NETNS";
const REAP_IF: &str = "CAISSON_CNI_REAP_IF";

/// The detached half of DEL: deletes a retired interface.
fn reap(netns: &str, ifname: &str) {
    let Ok(ns) = std::fs::File::open(netns) else {
        return;
    };
    let _ = nl::runtime().block_on(async { nl::del_link(&nl::connect_in(&ns)?, ifname).await });
}

/// The `bridge` binary: a plugin, or (started by its own DEL) the helper that deletes a
/// retired interface.
pub fn main() -> ! {
    if let (Ok(ns), Ok(ifname)) = (std::env::var(REAP_NETNS), std::env::var(REAP_IF)) {
        reap(&ns, &ifname);
        std::process::exit(0);
    }
    crate::run(&Bridge)
}
