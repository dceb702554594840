//! CNI networking of `caisson run`: which networks a task asks for, its network namespace and
//! CNI ADD before the launch, and the release (DEL, netns removal) when it ends.
//!
//! The task's namespace is bind-mounted at `<root>/netns/<id>` and its attachments are cached
//! under `<root>/cni` (containerizer::net), so that the task's supervisor (when the task exits:
//! `TaskSpec::network_release`) or any later process (`caisson rm`, `caisson cleanup ID`, an
//! agent after a restart) can undo them.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use containerizer::net::{self, Attachment, Cni, Netns, NetworkRequest, PortMapping};

/// The network a task asked for with `--network` and `-p`.
#[derive(Debug)]
pub enum Plan {
    /// Its own namespace with loopback only.
    None,
    /// The host's namespace.
    Host,
    /// Its own namespace attached to these CNI networks, in order (`eth0`, `eth1`, ...).
    Cni(Vec<NetworkRequest>),
}

/// podman's name for "the default network".
const BRIDGE_ALIAS: &str = "bridge";

/// `--network` values (repeatable, comma-separated) and `-p` mappings. Without `--network`,
/// port mappings mean the default network (`caisson`), as podman's rootful default does.
pub fn plan(networks: &[String], publish: &[String]) -> anyhow::Result<Plan> {
    let mut names: Vec<String> = vec![];
    for n in networks.iter().flat_map(|n| n.split(',')).map(str::trim) {
        if n.is_empty() {
            bail!(
                "invalid --network {:?}: empty network name",
                networks.join(",")
            );
        }
        let n = if n == BRIDGE_ALIAS {
            net::DEFAULT_NETWORK.to_string()
        } else {
            n.to_string()
        };
        if names.contains(&n) {
            bail!("network {n:?} given twice");
        }
        names.push(n);
    }
    let ports = publish
        .iter()
        .map(|p| p.parse::<PortMapping>())
        .collect::<Result<Vec<_>, _>>()?;
    let special = |n: &str| n == "none" || n == "host";
    if names.len() > 1 && names.iter().any(|n| special(n)) {
        bail!("--network none or host cannot be combined with other networks");
    }
    match names.first().map(String::as_str) {
        None if ports.is_empty() => Ok(Plan::None),
        None => Ok(Plan::Cni(vec![request(net::DEFAULT_NETWORK, ports)])),
        Some(m @ ("none" | "host")) => {
            if !ports.is_empty() {
                bail!("port mappings (-p) need a CNI network; --network {m} has none");
            }
            Ok(if m == "none" { Plan::None } else { Plan::Host })
        }
        Some(_) => {
            // The mappings go to the first network: one host port can be forwarded only once.
            let mut reqs: Vec<NetworkRequest> = vec![];
            let mut ports = Some(ports);
            for n in names {
                reqs.push(request(&n, ports.take().unwrap_or_default()));
            }
            Ok(Plan::Cni(reqs))
        }
    }
}

fn request(name: &str, port_mappings: Vec<PortMapping>) -> NetworkRequest {
    NetworkRequest {
        port_mappings,
        ..NetworkRequest::new(name)
    }
}

/// Where a store's tasks' network namespaces are pinned (tmpfs: they end with the boot).
pub fn netns_dir(root: &Path) -> PathBuf {
    containerizer::net::volatile_dir(root).join("netns")
}

/// Where a task's network namespace is pinned.
pub fn netns_path(root: &Path, id: &str) -> PathBuf {
    netns_dir(root).join(id)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Plugins are child processes: one thread is enough, and no pooled thread ever setns's.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the CNI runtime")
}

/// Where the network gates of a store's launches are (see [`Gated`]).
fn gates_dir(root: &Path) -> PathBuf {
    containerizer::net::volatile_dir(root).join("gates")
}

/// Where the network gate of a task's launch is.
pub fn gate_path(root: &Path, id: &str) -> PathBuf {
    gates_dir(root).join(id)
}

/// What the task's /etc/hosts and resolv.conf become once its networks are attached.
pub type NetworkFiles = Box<dyn FnOnce(&[Attachment]) -> (String, String) + Send>;

/// The task's /etc/hosts and resolv.conf from its attachments (the host's resolv.conf for
/// what the networks do not set), for a task without `--add-host`/`--dns` flags.
pub fn network_files(hostname: String) -> NetworkFiles {
    Box::new(move |atts| {
        use containerizer::net::files;
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        (
            files::hosts_file(&hostname, atts, &[]),
            files::resolv_conf(atts, &host_resolv),
        )
    })
}

/// A task's network made while its launch goes on: the namespace exists (the launch joins it),
/// the CNI ADD runs on a thread of its own, and the supervisor holds the task's exec at the
/// network gate (`containerizer::net::gate`) until the ADD is done; the task's setup (clone,
/// mounts, cgroups) overlaps the ADD instead of waiting for it.
pub struct Gated {
    pub netns: PathBuf,
    pub gate: PathBuf,
    thread: std::thread::JoinHandle<(anyhow::Result<()>, Option<net::gate::Gate>)>,
}

/// [`Gated`] on its way: the namespace is being made.
pub struct Starting {
    ready: std::sync::mpsc::Receiver<anyhow::Result<()>>,
    gated: Gated,
}

/// Starts making the task's network on a thread: checks the networks, creates the namespace
/// and the gate, then runs ADD and sends the task's files (`files`) through the gate.
pub fn start_gated(
    cni: &Cni,
    root: &Path,
    id: &str,
    reqs: &[NetworkRequest],
    files: NetworkFiles,
) -> Starting {
    let (tx, ready) = std::sync::mpsc::channel();
    let netns = netns_path(root, id);
    let gate = gate_path(root, id);
    let (cni, id, reqs) = (cni.clone(), id.to_string(), reqs.to_vec());
    let (ns_path, gate_at) = (netns.clone(), gate.clone());
    let thread = std::thread::spawn(move || {
        let t0 = Instant::now();
        let made = (|| -> anyhow::Result<(Netns, net::gate::Gate)> {
            check_networks(&cni, &reqs)?;
            let ns = Netns::create(&ns_path)?;
            match net::gate::Gate::create(&gate_at) {
                Ok(g) => Ok((ns, g)),
                Err(e) => {
                    let _ = ns.delete();
                    Err(anyhow::Error::new(e).context("creating the network gate"))
                }
            }
        })();
        let (ns, gate) = match made {
            Ok(m) => {
                let _ = tx.send(Ok(()));
                m
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return (Err(anyhow::anyhow!("the network was not made")), None);
            }
        };
        let res = runtime().and_then(|rt| Ok(rt.block_on(cni.setup(&id, ns.path(), &reqs))?));
        let msg = match &res {
            Ok(atts) => {
                let (hosts, resolv_conf) = files(atts);
                net::gate::GateMessage::Ready {
                    hosts,
                    resolv_conf,
                    network_us: t0.elapsed().as_micros() as u64,
                }
            }
            Err(e) => net::gate::GateMessage::Failed {
                message: format!("{e:#}"),
            },
        };
        // Unsent, the gate must close now: the supervisor then reads EOF and fails the launch
        // (held open, it would wait for a message that never comes).
        let sent = gate.send(&msg);
        let gate = sent.is_ok().then_some(gate);
        let res = res.and_then(|_| sent.context("writing the network gate"));
        if res.is_err() {
            let _ = ns.delete();
        }
        (res, gate)
    });
    Starting {
        ready,
        gated: Gated {
            netns,
            gate,
            thread,
        },
    }
}

impl Starting {
    /// Waits for the namespace and the gate (not for the ADD).
    pub fn ready(self) -> anyhow::Result<Gated> {
        match self.ready.recv() {
            Ok(Ok(())) => Ok(self.gated),
            Ok(Err(e)) => {
                let _ = self.gated.thread.join();
                Err(e)
            }
            Err(_) => Err(anyhow::anyhow!("the network setup thread panicked")),
        }
    }
}

impl Gated {
    /// Gives up a network being made, on the way out of a failed launch: waits for the ADD
    /// thread, then releases whatever it attached (DEL from the cache, netns removed).
    pub fn abandon(self, cni: &Cni, root: &Path, id: &str) {
        let _ = self.finish();
        if let Err(e) = detach(cni, root, id) {
            tracing::warn!(task = %id, "releasing the network after a failed launch: {e:#}");
        }
    }

    /// Waits for the ADD (call it once the launch has returned: the gate is removed then).
    pub fn finish(self) -> anyhow::Result<()> {
        match self.thread.join() {
            Ok((res, _gate)) => res,
            Err(_) => Err(anyhow::anyhow!("the network setup thread panicked")),
        }
    }
}

/// The default network is written on first use; an unknown network is reported before anything
/// is made.
fn check_networks(cni: &Cni, reqs: &[NetworkRequest]) -> anyhow::Result<()> {
    if reqs.iter().any(|r| r.name == net::DEFAULT_NETWORK) {
        cni.ensure_default_network()
            .context("creating the default network")?;
    }
    for r in reqs {
        cni.network(&r.name)?;
    }
    Ok(())
}

/// Releases a task's network: DEL on every cached attachment (newest first), then removes its
/// namespace. Idempotent; a task without networks costs a directory lookup.
pub fn detach(cni: &Cni, root: &Path, id: &str) -> anyhow::Result<()> {
    let path = netns_path(root, id);
    let cached = cni.attachments(id).map(|a| !a.is_empty()).unwrap_or(true);
    if !cached {
        net::delete_netns(&path)?;
        return Ok(());
    }
    // DEL, then the namespace (also when a DEL failed: the cache keeps that one for a retry).
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            net::delete_netns(&path)?;
            return Err(e);
        }
    };
    rt.block_on(cni.release(id, &path))
        .with_context(|| format!("releasing the networks of {id}"))
}

/// Releases the networks of launches that died half-way (the launcher killed between the
/// namespace/ADD and the supervisor's start): namespaces and cached attachments with no task
/// record, older than the grace period. Returns the ids released.
pub fn sweep_orphans(cni: &Cni, root: &Path) -> Vec<String> {
    let mut ids: Vec<(String, PathBuf)> = vec![];
    if let Ok(rd) = std::fs::read_dir(netns_dir(root)) {
        ids.extend(
            rd.flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())),
        );
    }
    for id in cni.cached_containers() {
        if !ids.iter().any(|(i, _)| *i == id) {
            let p = cni.options().state_dir.join(&id);
            ids.push((id, p));
        }
    }
    let grace = containerizer::launch::state::orphan_grace();
    let now = std::time::SystemTime::now();
    let old_enough = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_none_or(|age| age >= grace)
    };
    // Gates of launches whose launcher and supervisor both died before using them.
    if let Ok(rd) = std::fs::read_dir(gates_dir(root)) {
        for e in rd.flatten().filter(|e| old_enough(&e.path())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let mut released = vec![];
    for (id, marker) in ids {
        if root.join("containers").join(&id).exists() {
            continue;
        }
        if !old_enough(&marker) {
            continue;
        }
        match detach(cni, root, &id) {
            Ok(()) => released.push(id),
            Err(e) => tracing::warn!("releasing the orphaned network of {id}: {e:#}"),
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn plans() {
        assert!(matches!(plan(&[], &[]).unwrap(), Plan::None));
        assert!(matches!(plan(&s(&["none"]), &[]).unwrap(), Plan::None));
        assert!(matches!(plan(&s(&["host"]), &[]).unwrap(), Plan::Host));
        let Plan::Cni(r) = plan(&[], &s(&["8080:80"])).unwrap() else {
            panic!()
        };
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name, net::DEFAULT_NETWORK);
        assert_eq!(r[0].port_mappings[0].host_port, 8080);
        let Plan::Cni(r) = plan(&s(&["a,b", "bridge"]), &s(&["1:2/udp"])).unwrap() else {
            panic!()
        };
        let names: Vec<_> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", net::DEFAULT_NETWORK]);
        assert_eq!(r[0].port_mappings.len(), 1);
        assert!(r[1].port_mappings.is_empty());
        assert!(plan(&s(&["none"]), &s(&["1:2"])).is_err());
        assert!(plan(&s(&["host,a"]), &[]).is_err());
        assert!(plan(&s(&["a,a"]), &[]).is_err());
        assert!(plan(&s(&["a,"]), &[]).is_err());
        assert!(plan(&[], &s(&["99999:1"])).is_err());
    }
}
