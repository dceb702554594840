//! `host-local` IPAM: addresses from configured ranges, reservations as files on disk under a
//! file lock (the reference plugin's layout, so both can share a data dir):
//! `<dataDir>/<network>/<ip>` holds `<container id>\r\n<ifname>`,
//! `last_reserved_ip.<set>` remembers where the round-robin stopped, `lock` is flock(2)ed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::skel::{code, Args, CniError};
use crate::types::{CniResult, IpConfig, Route};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

#[derive(Debug, Clone, Deserialize)]
pub struct RangeConf {
    pub subnet: IpNet,
    #[serde(rename = "rangeStart", default)]
    pub range_start: Option<IpAddr>,
    #[serde(rename = "rangeEnd", default)]
    pub range_end: Option<IpAddr>,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IpamConf {
    #[serde(default)]
    pub subnet: Option<IpNet>,
    #[serde(rename = "rangeStart", default)]
    pub range_start: Option<IpAddr>,
    #[serde(rename = "rangeEnd", default)]
    pub range_end: Option<IpAddr>,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub ranges: Vec<Vec<RangeConf>>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(rename = "dataDir", default)]
    pub data_dir: Option<PathBuf>,
}

/// A usable range: `[start, end]` inclusive, with its subnet and gateway (never handed out).
#[derive(Debug, Clone)]
pub struct Range {
    pub subnet: IpNet,
    pub start: u128,
    pub end: u128,
    pub gateway: IpAddr,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, like: &IpNet) -> IpAddr {
    match like {
        IpNet::V4(_) => IpAddr::V4((v as u32).into()),
        IpNet::V6(_) => IpAddr::V6(v.into()),
    }
}

impl Range {
    /// Applies the reference defaults: start = network + 1, end = broadcast - 1 (IPv4) or the
    /// last address (IPv6), gateway = network + 1.
    pub fn new(c: &RangeConf) -> Result<Self, CniError> {
        let subnet = c.subnet.trunc();
        let net = to_u128(subnet.network());
        let last = to_u128(subnet.broadcast());
        let v4 = matches!(subnet, IpNet::V4(_));
        if (v4 && subnet.prefix_len() > 30) || (!v4 && subnet.prefix_len() > 126) {
            return Err(CniError::config(format!(
                "subnet {subnet} is too small for host-local"
            )));
        }
        let inside = |ip: IpAddr, what: &str| -> Result<u128, CniError> {
            if subnet.contains(&ip) {
                Ok(to_u128(ip))
            } else {
                Err(CniError::config(format!(
                    "{what} {ip} is not in subnet {subnet}"
                )))
            }
        };
        let start = match c.range_start {
            Some(ip) => inside(ip, "rangeStart")?,
            None => net + 1,
        };
        let end = match c.range_end {
            Some(ip) => inside(ip, "rangeEnd")?,
            None if v4 => last - 1,
            None => last,
        };
        if start > end {
            return Err(CniError::config(format!(
                "rangeStart is after rangeEnd in {subnet}"
            )));
        }
        let gateway = match c.gateway {
            Some(g) => g,
            None => from_u128(net + 1, &subnet),
        };
        Ok(Self {
            subnet,
            start,
            end,
            gateway,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.subnet.contains(&ip) && (self.start..=self.end).contains(&to_u128(ip))
    }
}

/// The configured range sets (one address per set).
pub fn range_sets(c: &IpamConf) -> Result<Vec<Vec<Range>>, CniError> {
    let mut sets = Vec::new();
    if let Some(subnet) = c.subnet {
        sets.push(vec![Range::new(&RangeConf {
            subnet,
            range_start: c.range_start,
            range_end: c.range_end,
            gateway: c.gateway,
        })?]);
    }
    for set in &c.ranges {
        if set.is_empty() {
            return Err(CniError::config("empty range set"));
        }
        sets.push(set.iter().map(Range::new).collect::<Result<_, _>>()?);
    }
    if sets.is_empty() {
        return Err(CniError::config("host-local: no IP ranges specified"));
    }
    Ok(sets)
}

/// Replaces a small file's content without truncating it to zero first: the file keeps its
/// block, where O_TRUNC would free it and allocate another on every ADD (on a filesystem
/// mounted with `discard`, each free is a synchronous discard, milliseconds under I/O load).
/// Readers hold the store's lock, so nobody sees the moment between write and set_len.
fn write_in_place(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all_at(content, 0)?;
    f.set_len(content.len() as u64)
}

/// The reservation store of one network, locked for its lifetime.
pub struct Store {
    dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

fn owner(id: &str, ifname: &str) -> String {
    format!("{}\r\n{ifname}", id.trim())
}

impl Store {
    /// Opens (creating) `<data_dir>/<network>` and takes its lock; blocks while another ADD/DEL
    /// of the same network holds it.
    pub fn open(data_dir: &Path, network: &str) -> Result<Self, CniError> {
        if network.is_empty() || network.contains('/') || network.starts_with('.') {
            return Err(CniError::config(format!(
                "invalid network name {network:?}"
            )));
        }
        let dir = data_dir.join(network);
        fs::create_dir_all(&dir)
            .map_err(|e| CniError::io(format!("creating {}", dir.display()), e))?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .map_err(|e| CniError::io("opening the lock file", e))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| CniError::io("locking the IPAM store", e))?;
        Ok(Self { dir, _lock: lock })
    }

    fn path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// Reserves `ip` for the owner; false if it is taken.
    pub fn reserve(
        &self,
        ip: IpAddr,
        id: &str,
        ifname: &str,
        set: usize,
    ) -> Result<bool, CniError> {
        let p = self.path(ip);
        match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(mut f) => {
                f.write_all(owner(id, ifname).as_bytes())
                    .map_err(|e| CniError::io(format!("writing {}", p.display()), e))?;
                let last = self.dir.join(format!("last_reserved_ip.{set}"));
                write_in_place(&last, ip.to_string().as_bytes())
                    .map_err(|e| CniError::io(format!("writing {}", last.display()), e))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(CniError::io(format!("creating {}", p.display()), e)),
        }
    }

    fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("last_reserved_ip.{set}")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The addresses reserved for the owner.
    pub fn owned_by(&self, id: &str, ifname: &str) -> Vec<IpAddr> {
        let want = owner(id, ifname);
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(Result::ok)
            .filter_map(|e| {
                let ip: IpAddr = e.file_name().to_str()?.parse().ok()?;
                let content = fs::read_to_string(e.path()).ok()?;
                // Old reference versions wrote the container id alone.
                (content.trim() == want || content.trim() == id.trim()).then_some(ip)
            })
            .collect()
    }

    /// Releases everything the owner holds.
    pub fn release(&self, id: &str, ifname: &str) -> Result<(), CniError> {
        for ip in self.owned_by(id, ifname) {
            match fs::remove_file(self.path(ip)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(CniError::io(format!("releasing {ip}"), e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the reservations whose owner text `keep` rejects.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Result<(), CniError> {
        let rd = fs::read_dir(&self.dir).map_err(|e| CniError::io("listing the IPAM store", e))?;
        for e in rd.filter_map(Result::ok) {
            let is_ip = e
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<IpAddr>().is_ok());
            let Ok(content) = fs::read_to_string(e.path()) else {
                continue;
            };
            if is_ip && !keep(content.trim()) {
                fs::remove_file(e.path()).map_err(|err| {
                    CniError::io(format!("releasing {}", e.path().display()), err)
                })?;
            }
        }
        Ok(())
    }

    /// Allocates one address from `set` (round-robin after the last reservation), or the
    /// `requested` one.
    pub fn allocate<'s>(
        &self,
        set_idx: usize,
        set: &'s [Range],
        id: &str,
        ifname: &str,
        requested: Option<IpAddr>,
    ) -> Result<(IpAddr, &'s Range), CniError> {
        if let Some(ip) = requested {
            let r = set.iter().find(|r| r.contains(ip)).ok_or_else(|| {
                CniError::config(format!("requested IP {ip} is not in any range"))
            })?;
            if ip == r.gateway || !self.reserve(ip, id, ifname, set_idx)? {
                return Err(CniError::new(
                    code::NO_ADDRESSES,
                    format!("requested IP {ip} is already allocated"),
                ));
            }
            return Ok((ip, r));
        }
        // Where to start: just after the last reservation if it is in this set.
        let (mut ri, mut cur) = (0usize, set[0].start);
        if let Some(last) = self.last_reserved(set_idx) {
            if let Some(i) = set.iter().position(|r| r.contains(last)) {
                ri = i;
                cur = to_u128(last);
                (ri, cur) = next(set, ri, cur);
            }
        }
        let total: u128 = set.iter().map(|r| r.end - r.start + 1).sum();
        let mut tried: u128 = 0;
        while tried < total {
            let r = &set[ri];
            let ip = from_u128(cur, &r.subnet);
            if ip != r.gateway && self.reserve(ip, id, ifname, set_idx)? {
                return Ok((ip, r));
            }
            (ri, cur) = next(set, ri, cur);
            tried += 1;
        }
        let ranges: Vec<String> = set.iter().map(|r| r.subnet.to_string()).collect();
        Err(CniError::new(
            code::NO_ADDRESSES,
            format!(
                "no IP addresses available in range set {}",
                ranges.join(",")
            ),
        ))
    }
}

fn next(set: &[Range], ri: usize, cur: u128) -> (usize, u128) {
    if cur >= set[ri].end {
        let n = (ri + 1) % set.len();
        (n, set[n].start)
    } else {
        (ri, cur + 1)
    }
}

fn parse_conf(args: &Args) -> Result<IpamConf, CniError> {
    let ipam = args
        .conf
        .ipam
        .clone()
        .ok_or_else(|| CniError::config("IPAM config missing 'ipam' key"))?;
    serde_json::from_value(ipam)
        .map_err(|e| CniError::config("invalid host-local IPAM config").with_details(e))
}

fn data_dir(c: &IpamConf) -> PathBuf {
    c.data_dir
        .clone()
        .unwrap_or_else(|| DEFAULT_DATA_DIR.into())
}

/// ADD: one address per range set, plus the configured routes.
pub fn add(args: &Args) -> Result<Value, CniError> {
    let c = parse_conf(args)?;
    let sets = range_sets(&c)?;
    let requested: Vec<IpAddr> = match args.arg("IP") {
        Some(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| CniError::config(format!("invalid IP in CNI_ARGS: {s:?}")))
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let store = Store::open(&data_dir(&c), &args.conf.name)?;
    let mine = store.owned_by(&args.container_id, &args.ifname);
    if let Some(ip) = mine
        .iter()
        .find(|ip| sets.iter().flatten().any(|r| r.contains(**ip)))
    {
        return Err(CniError::config(format!(
            "{ip} has been allocated to {}, duplicate allocation is not allowed",
            args.container_id
        )));
    }
    let mut ips = Vec::new();
    let mut taken = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let req = requested
            .iter()
            .copied()
            .find(|ip| set.iter().any(|r| r.subnet.contains(ip)));
        match store.allocate(i, set, &args.container_id, &args.ifname, req) {
            Ok((ip, r)) => {
                taken.push(ip);
                ips.push(IpConfig {
                    interface: None,
                    address: IpNet::new(ip, r.subnet.prefix_len()).expect("prefix from a subnet"),
                    gateway: Some(r.gateway),
                });
            }
            Err(e) => {
                // All or nothing: give back what this ADD took from earlier sets.
                let _ = store.release(&args.container_id, &args.ifname);
                return Err(e);
            }
        }
    }
    let result = CniResult {
        interfaces: vec![],
        ips,
        routes: c.routes.clone(),
        dns: json!({}),
    };
    Ok(result.to_json(&args.conf.cni_version))
}

/// DEL: releases the owner's addresses (nothing held is fine).
pub fn del(args: &Args) -> Result<(), CniError> {
    let c = parse_conf(args)?;
    let dir = data_dir(&c);
    if !dir.join(&args.conf.name).exists() {
        return Ok(());
    }
    Store::open(&dir, &args.conf.name)?.release(&args.container_id, &args.ifname)
}

/// GC (spec 1.1): releases every reservation whose owner is not a valid attachment.
pub fn gc(args: &Args) -> Result<(), CniError> {
    let c = parse_conf(args)?;
    let dir = data_dir(&c);
    if !dir.join(&args.conf.name).exists() {
        return Ok(());
    }
    let store = Store::open(&dir, &args.conf.name)?;
    let valid: Vec<String> = args
        .valid_attachments()
        .iter()
        .map(|(id, ifname)| owner(id, ifname))
        .collect();
    store.retain(|o| valid.iter().any(|v| v == o))
}

/// CHECK: the owner still holds an address.
pub fn check(args: &Args) -> Result<(), CniError> {
    let c = parse_conf(args)?;
    let store = Store::open(&data_dir(&c), &args.conf.name)?;
    if store.owned_by(&args.container_id, &args.ifname).is_empty() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "host-local: no address reserved for {} {}",
                args.container_id, args.ifname
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Range {
        Range::new(&RangeConf {
            subnet: s.parse().unwrap(),
            range_start: None,
            range_end: None,
            gateway: None,
        })
        .unwrap()
    }

    #[test]
    fn allocates_round_robin_skipping_gateway_and_exhausts() {
        let d = tempfile::tempdir().unwrap();
        let set = vec![range("10.232.9.0/29")]; // .1 gateway, .2-.6 usable
        let st = Store::open(d.path(), "n").unwrap();
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(
                st.allocate(0, &set, &format!("c{i}"), "eth0", None)
                    .unwrap()
                    .0
                    .to_string(),
            );
        }
        assert_eq!(
            got,
            [
                "10.232.9.2",
                "10.232.9.3",
                "10.232.9.4",
                "10.232.9.5",
                "10.232.9.6"
            ]
        );
        let e = st.allocate(0, &set, "c9", "eth0", None).unwrap_err();
        assert_eq!(e.code, code::NO_ADDRESSES);
        st.release("c2", "eth0").unwrap();
        assert_eq!(
            st.allocate(0, &set, "c9", "eth0", None)
                .unwrap()
                .0
                .to_string(),
            "10.232.9.4"
        );
        assert_eq!(
            st.owned_by("c9", "eth0"),
            ["10.232.9.4".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            fs::read_to_string(d.path().join("n/10.232.9.4")).unwrap(),
            "c9\r\neth0"
        );
    }

    #[test]
    fn last_reserved_ip_is_rewritten_in_place_without_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let set = vec![range("10.232.9.0/24")];
        let st = Store::open(d.path(), "n").unwrap();
        let last = d.path().join("n/last_reserved_ip.0");
        st.reserve("10.232.9.100".parse().unwrap(), "a", "eth0", 0)
            .unwrap();
        assert_eq!(fs::read_to_string(&last).unwrap(), "10.232.9.100");
        // A shorter address after a longer one: nothing of the old one is left.
        st.reserve("10.232.9.7".parse().unwrap(), "b", "eth0", 0)
            .unwrap();
        assert_eq!(fs::read_to_string(&last).unwrap(), "10.232.9.7");
        assert_eq!(
            st.allocate(0, &set, "c", "eth0", None)
                .unwrap()
                .0
                .to_string(),
            "10.232.9.8"
        );
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let d = tempfile::tempdir().unwrap();
        let set = vec![range("10.232.10.0/24")];
        let ips: Vec<IpAddr> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|i| {
                    let (dir, set) = (d.path(), &set);
                    s.spawn(move || {
                        let st = Store::open(dir, "n").unwrap();
                        st.allocate(0, set, &format!("c{i}"), "eth0", None)
                            .unwrap()
                            .0
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut u = ips.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 16);
    }
}
