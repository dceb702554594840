//! `portmap`: forwards host ports to the task (the `portMappings` capability), with iptables
//! NAT rules, IPv4. Chained after a plugin that assigned addresses (it needs `prevResult`).
//!
//! Layout in the `nat` table: `CAISSON-HOSTPORT-DNAT` is jumped to from PREROUTING and OUTPUT
//! for locally addressed packets; each attachment has its own chain `CAISSON-DN-<hash>` holding
//! its DNAT rules, reached by one jump tagged with a comment naming network and container, so
//! DEL removes exactly that. Connections from the host's loopback are masqueraded (and
//! `route_localnet` is enabled on the bridge) so that `127.0.0.1:HOSTPORT` works too. A host
//! port already forwarded to another task is refused.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::process::Command as Proc;

use crate::skel::{code, Args, CniError, Plugin};
use crate::types::CniResult;
use serde::Deserialize;
use serde_json::Value;

const TOP: &str = "CAISSON-HOSTPORT-DNAT";
const MASQ: &str = "CAISSON-HOSTPORT-MASQ";
const LOCK: &str = "/run/caisson-cni-portmap.lock";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Mapping {
    host_port: u16,
    container_port: u16,
    #[serde(default = "tcp")]
    protocol: String,
    #[serde(default, rename = "hostIP")]
    host_ip: Option<String>,
}

fn tcp() -> String {
    "tcp".into()
}

fn mappings(args: &Args) -> Result<Vec<Mapping>, CniError> {
    let Some(v) = args.conf.runtime_config.get("portMappings") else {
        return Ok(vec![]);
    };
    let ms: Vec<Mapping> = serde_json::from_value(v.clone())
        .map_err(|e| CniError::config("invalid runtimeConfig.portMappings").with_details(e))?;
    for m in &ms {
        if !matches!(m.protocol.as_str(), "tcp" | "udp" | "sctp")
            || m.host_port == 0
            || m.container_port == 0
        {
            return Err(CniError::config(format!("invalid port mapping {m:?}")));
        }
        if let Some(ip) = &m.host_ip {
            ip.parse::<IpAddr>()
                .map_err(|_| CniError::config(format!("invalid hostIP {ip:?}")))?;
        }
    }
    Ok(ms)
}

fn chain(args: &Args) -> String {
    let mut h = DefaultHasher::new();
    (
        args.conf.name.as_str(),
        args.container_id.as_str(),
        args.ifname.as_str(),
    )
        .hash(&mut h);
    format!("CAISSON-DN-{:016x}", h.finish())
}

fn comment(args: &Args) -> String {
    format!("caisson-portmap {} {}", args.conf.name, args.container_id)
}

fn ipt(a: &[&str]) -> Result<(bool, String), CniError> {
    let out = Proc::new("iptables")
        .arg("-w")
        .args(a)
        .output()
        .map_err(|e| CniError::io("running iptables", e))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

fn must(a: &[&str]) -> Result<(), CniError> {
    match ipt(a)? {
        (true, _) => Ok(()),
        (false, err) => Err(CniError::io(
            format!("iptables {}", a.join(" ")),
            err.trim(),
        )),
    }
}

/// Creates the shared chains and their entry jumps once.
fn ensure_top() -> Result<(), CniError> {
    for c in [TOP, MASQ] {
        if !ipt(&["-t", "nat", "-S", c])?.0 {
            let _ = ipt(&["-t", "nat", "-N", c]);
        }
    }
    for hook in ["PREROUTING", "OUTPUT"] {
        let rule = [
            "-t",
            "nat",
            "-C",
            hook,
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            TOP,
        ];
        if !ipt(&rule)?.0 {
            let mut add = rule;
            add[2] = "-A";
            must(&add)?;
        }
    }
    let rule = ["-t", "nat", "-C", "POSTROUTING", "-j", MASQ];
    if !ipt(&rule)?.0 {
        must(&["-t", "nat", "-A", "POSTROUTING", "-j", MASQ])?;
    }
    Ok(())
}

fn task_ipv4(prev: &CniResult) -> Option<IpAddr> {
    prev.ips
        .iter()
        .filter(|ip| ip.address.addr().is_ipv4())
        .find(|ip| {
            ip.interface
                .and_then(|i| prev.interfaces.get(i))
                .is_none_or(|i| !i.sandbox.is_empty())
        })
        .map(|ip| ip.address.addr())
}

fn lock() -> Result<nix::fcntl::Flock<std::fs::File>, CniError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .map_err(|e| CniError::io(format!("opening {LOCK}"), e))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| CniError::io("locking portmap", e))
}

fn remove(args: &Args) -> Result<(), CniError> {
    let ch = chain(args);
    // Every jump to our chain (there is one per attachment), then the chain itself.
    let (_, listing) = ipt(&["-t", "nat", "-S"])?;
    for line in listing
        .lines()
        .filter(|l| l.ends_with(&format!("-j {ch}")) && l.starts_with("-A "))
    {
        let mut a: Vec<String> = vec!["-t".into(), "nat".into()];
        a.extend(shell_words(&line.replacen("-A ", "-D ", 1)));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let _ = ipt(&refs)?;
    }
    let _ = ipt(&["-t", "nat", "-F", &ch])?;
    let _ = ipt(&["-t", "nat", "-X", &ch])?;
    Ok(())
}

/// Splits an `iptables -S` line (double quotes group a comment).
fn shell_words(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut q) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        match c {
            '"' => q = !q,
            ' ' if !q => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

pub struct Portmap;

impl Plugin for Portmap {
    fn add(&self, args: &Args) -> Result<Value, CniError> {
        let prev_v = args.conf.prev_result.clone().ok_or_else(|| {
            CniError::config("portmap must be chained after a plugin that returns a result")
        })?;
        let ms = mappings(args)?;
        if ms.is_empty() {
            return Ok(prev_v);
        }
        let prev = CniResult::from_value(&prev_v)
            .map_err(|e| CniError::new(code::DECODE, "decoding prevResult").with_details(e))?;
        let ip = task_ipv4(&prev).ok_or_else(|| {
            CniError::config("portmap: no IPv4 address for the task in prevResult")
        })?;
        let _l = lock()?;
        ensure_top()?;
        let ch = chain(args);
        let (_, listing) = ipt(&["-t", "nat", "-S"])?;
        for m in &ms {
            let taken = listing.lines().any(|l| {
                l.starts_with("-A CAISSON-DN-")
                    && !l.starts_with(&format!("-A {ch} "))
                    && l.contains(&format!("-p {} ", m.protocol))
                    && l.contains(&format!("--dport {} ", m.host_port))
            });
            if taken {
                return Err(CniError::new(
                    code::PORT_CONFLICT,
                    format!(
                        "host port {}/{} is already forwarded to another container",
                        m.host_port, m.protocol
                    ),
                ));
            }
        }
        let _ = ipt(&["-t", "nat", "-N", &ch])?;
        let res = (|| {
            for m in &ms {
                let (hp, to) = (
                    m.host_port.to_string(),
                    format!("{ip}:{}", m.container_port),
                );
                // Mark first (DNAT ends the chain): connections from the host's loopback are
                // masqueraded on the way out, or the task's replies would go to its own lo.
                must(&[
                    "-t",
                    "nat",
                    "-A",
                    &ch,
                    "-p",
                    &m.protocol,
                    "-s",
                    "127.0.0.0/8",
                    "--dport",
                    &hp,
                    "-j",
                    "MARK",
                    "--set-xmark",
                    "0x4000/0x4000",
                ])?;
                let mut rule = vec!["-t", "nat", "-A", &ch, "-p", &m.protocol];
                if let Some(h) = &m.host_ip {
                    rule.extend(["-d", h.as_str()]);
                }
                rule.extend(["--dport", &hp, "-j", "DNAT", "--to-destination", &to]);
                must(&rule)?;
            }
            let cm = comment(args);
            must(&[
                "-t",
                "nat",
                "-A",
                TOP,
                "-m",
                "comment",
                "--comment",
                &cm,
                "-j",
                &ch,
            ])?;
            let masq = [
                "-t",
                "nat",
                "-C",
                MASQ,
                "-m",
                "mark",
                "--mark",
                "0x4000/0x4000",
                "-j",
                "MASQUERADE",
            ];
            if !ipt(&masq)?.0 {
                let mut add = masq;
                add[2] = "-A";
                must(&add)?;
            }
            // Packets from 127.0.0.1 may only be routed to the bridge with route_localnet.
            for i in prev
                .interfaces
                .iter()
                .filter(|i| i.sandbox.is_empty())
                .take(1)
            {
                let _ = std::fs::write(
                    format!("/proc/sys/net/ipv4/conf/{}/route_localnet", i.name),
                    "1",
                );
            }
            Ok(())
        })();
        if let Err(e) = res {
            let _ = remove(args);
            return Err(e);
        }
        Ok(prev_v)
    }

    fn check(&self, args: &Args) -> Result<(), CniError> {
        if mappings(args)?.is_empty() {
            return Ok(());
        }
        if !ipt(&["-t", "nat", "-S", &chain(args)])?.0 {
            return Err(CniError::new(
                code::UNKNOWN_CONTAINER,
                "portmap: the container's forwarding rules are gone",
            ));
        }
        Ok(())
    }

    fn del(&self, args: &Args) -> Result<(), CniError> {
        // Without mappings ADD forwarded nothing (DEL gets the runtimeConfig ADD had), as the
        // reference plugin does: no iptables runs (each costs ~10 ms).
        if mappings(args).is_ok_and(|m| m.is_empty()) {
            return Ok(());
        }
        let _l = lock()?;
        remove(args)
    }
}
