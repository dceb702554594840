//! CNI networking, runtime side: network configurations, plugin execution (ADD/CHECK/DEL/
//! VERSION, spec 0.4.0 and 1.0.0, chained with `prevResult`), an on-disk attachment cache for
//! teardown after a restart, and network namespaces for tasks.
//!
//! The usual flow for a task:
//! ```no_run
//! # async fn f() -> Result<(), containerizer::net::NetError> {
//! use containerizer::net::{Cni, CniOptions, NetworkRequest, Netns};
//! let cni = Cni::new(CniOptions::default());
//! cni.ensure_default_network()?;
//! let ns = Netns::create("/run/caisson/netns/task1")?;
//! let atts = cni.setup("task1", ns.path(), &[NetworkRequest::new("caisson")]).await?;
//! // ... run the task in `ns` ...
//! cni.teardown("task1").await?; // also works from the cache after a restart
//! ns.delete()?;
//! # let _ = atts; Ok(()) }
//! ```

pub mod cache;
pub mod config;
pub mod exec;
pub mod files;
pub mod gate;
pub mod release;
pub mod result;
pub mod volatile;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub use config::{NetworkConfigList, NetworkCreate};
pub use exec::{find_plugin, Command, FORCE_EXEC_ENV};
pub use release::Release;
pub use result::{CniResult, Dns, Interface, IpConfig, PluginError, Route, VersionInfo};
pub use volatile::{volatile_dir, IPAM_DATA_DIR, RUN_DIR};

use exec::{ExecFailure, Invocation};

/// The name of the network used when a task asks for networking without naming one.
pub const DEFAULT_NETWORK: &str = "caisson";

/// Errors of the networking layer; every plugin error names the network and the plugin.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network {name:?} not found in {}", dir.display())]
    UnknownNetwork { name: String, dir: PathBuf },
    #[error("bad network config {}: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },
    #[error("network {0:?} already exists")]
    NetworkExists(String),
    #[error("network {network:?} is in use by container(s) {containers:?}")]
    NetworkInUse {
        network: String,
        containers: Vec<String>,
    },
    #[error("network {network:?}: plugin {plugin:?} not found in {search}")]
    PluginNotFound {
        network: String,
        plugin: String,
        search: String,
    },
    #[error("network {network:?}: plugin {plugin:?} {command} failed: {error}")]
    Plugin {
        network: String,
        plugin: String,
        command: &'static str,
        error: Box<PluginError>,
    },
    #[error("network {network:?}: plugin {plugin:?} {command} did not finish within {timeout:?} and was killed")]
    Timeout {
        network: String,
        plugin: String,
        command: &'static str,
        timeout: Duration,
    },
    #[error("network {network:?}: plugin {plugin:?} could not be started: {source}")]
    Spawn {
        network: String,
        plugin: String,
        source: std::io::Error,
    },
    #[error("network {network:?}: plugin {plugin:?} {command} returned a bad result: {reason}")]
    BadResult {
        network: String,
        plugin: String,
        command: &'static str,
        reason: String,
    },
    #[error("container {container_id:?} has no attachment to network {network:?} as {ifname}")]
    NotAttached {
        container_id: String,
        network: String,
        ifname: String,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl NetError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NetError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Where things are and how long a plugin may take.
#[derive(Debug, Clone)]
pub struct CniOptions {
    /// Network configurations (`--cni-config-dir`), default `/etc/cni/net.d`.
    pub config_dir: PathBuf,
    /// Plugin search path (`--cni-plugin-dir` / `CNI_PATH`), default `/opt/cni/bin:/usr/lib/cni`.
    pub plugin_dirs: Vec<PathBuf>,
    /// The attachment cache, default `/run/caisson/cni` (see [`volatile_dir`] for a store's).
    pub state_dir: PathBuf,
    /// Upper bound for one plugin invocation; a plugin still running then is killed.
    pub timeout: Duration,
}

impl Default for CniOptions {
    fn default() -> Self {
        Self {
            config_dir: "/etc/cni/net.d".into(),
            plugin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            state_dir: Path::new(RUN_DIR).join("cni"),
            timeout: Duration::from_secs(30),
        }
    }
}

impl CniOptions {
    /// Parses a `CNI_PATH`-style list (`dir:dir`).
    pub fn parse_path_list(s: &str) -> Vec<PathBuf> {
        std::env::split_paths(s)
            .filter(|p| !p.as_os_str().is_empty())
            .collect()
    }
}

/// A host port forwarded to a task port (the `portMappings` capability).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

impl std::str::FromStr for PortMapping {
    type Err = NetError;

    /// `[HOSTIP:]HOSTPORT:CTRPORT[/tcp|udp]` (as `podman run -p`).
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || {
            NetError::InvalidRequest(format!(
                "invalid port mapping {s:?} (expected [HOSTIP:]HOSTPORT:CTRPORT[/tcp|udp])"
            ))
        };
        let (ports, proto) = match s.rsplit_once('/') {
            Some((p, proto)) => (p, proto.to_ascii_lowercase()),
            None => (s, "tcp".to_owned()),
        };
        if proto != "tcp" && proto != "udp" && proto != "sctp" {
            return Err(bad());
        }
        let parts: Vec<&str> = ports.rsplitn(3, ':').collect();
        let (host_ip, host, ctr) = match parts.as_slice() {
            [c, h] => (None, *h, *c),
            [c, h, ip] => (Some(ip.trim_matches(['[', ']']).to_owned()), *h, *c),
            _ => return Err(bad()),
        };
        if let Some(ip) = &host_ip {
            ip.parse::<std::net::IpAddr>().map_err(|_| bad())?;
        }
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        Ok(PortMapping {
            host_port: port(host)?,
            container_port: port(ctr)?,
            protocol: proto,
            host_ip,
        })
    }
}

/// One network a task asks for.
#[derive(Debug, Clone, Default)]
pub struct NetworkRequest {
    pub name: String,
    /// Interface name in the task; default `eth<N>`, counting the requests without a name.
    pub ifname: Option<String>,
    pub port_mappings: Vec<PortMapping>,
    /// `CNI_ARGS` pairs (e.g. `IP=10.88.0.9` for host-local).
    pub args: Vec<(String, String)>,
    /// Other capability arguments (`runtimeConfig`), by capability name.
    pub capability_args: Map<String, Value>,
}

impl NetworkRequest {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// A task's attachment to one network, as ADD left it.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    pub network: String,
    pub ifname: String,
    pub netns: PathBuf,
    /// `None` only for an ADD that never finished (found in the cache after a crash).
    pub result: Option<CniResult>,
}

impl Attachment {
    /// The task's addresses on this network.
    pub fn ips(&self) -> Vec<std::net::IpAddr> {
        self.result
            .as_ref()
            .map(|r| {
                r.task_ips(&self.ifname)
                    .iter()
                    .map(|i| i.address.addr())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A network namespace bind-mounted at a path (see [`crate::sys::netns`]).
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
}

impl Netns {
    /// Creates a fresh network namespace at `path` (its parent directory is created).
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, NetError> {
        let path = path.into();
        let _ = volatile::ensure_tmpfs();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| NetError::io(format!("creating {}", dir.display()), e))?;
        }
        crate::sys::netns::create_netns_at(&path)
            .map_err(|e| NetError::io(format!("creating netns {}", path.display()), e))?;
        Ok(Self { path })
    }

    /// Refers to an existing namespace (e.g. after a restart) without creating it.
    pub fn open(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and removes the namespace file. Idempotent.
    pub fn delete(self) -> Result<(), NetError> {
        delete_netns(&self.path)
    }
}

/// Unmounts and removes a namespace file; a missing one is fine.
pub fn delete_netns(path: &Path) -> Result<(), NetError> {
    crate::sys::netns::delete_netns_at(path)
        .map_err(|e| NetError::io(format!("deleting netns {}", path.display()), e))
}

/// The CNI runtime. Cheap to clone; holds no global state beyond its directories.
#[derive(Debug, Clone)]
pub struct Cni {
    opts: CniOptions,
}

fn validate_id(kind: &str, id: &str) -> Result<(), NetError> {
    if id.is_empty() || id.contains(['/', ':']) || id == "." || id == ".." || id.len() > 255 {
        return Err(NetError::InvalidRequest(format!("invalid {kind} {id:?}")));
    }
    Ok(())
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Cni {
    pub fn new(opts: CniOptions) -> Self {
        Self { opts }
    }

    pub fn options(&self) -> &CniOptions {
        &self.opts
    }

    // ---- configurations -------------------------------------------------------------------

    /// `network ls`: every network in the config dir.
    pub fn networks(&self) -> Result<Vec<NetworkConfigList>, NetError> {
        config::load_all(&self.opts.config_dir)
    }

    /// `network inspect NAME`.
    pub fn network(&self, name: &str) -> Result<NetworkConfigList, NetError> {
        config::load(&self.opts.config_dir, name)
    }

    /// `network create`: a bridge + host-local (+ portmap) network, written as
    /// `<config dir>/<name>.conflist`. Picks a free `10.89.N.0/24` when no subnet is given.
    pub fn create_network(&self, req: &NetworkCreate) -> Result<NetworkConfigList, NetError> {
        config::validate_name(&req.name).map_err(NetError::InvalidRequest)?;
        let existing = self.networks()?;
        if existing.iter().any(|n| n.name == req.name) {
            return Err(NetError::NetworkExists(req.name.clone()));
        }
        let used = config::used_subnets(&existing);
        let subnet = match req.subnet {
            Some(s) => {
                if let Some(u) = used
                    .iter()
                    .find(|u| u.contains(&s.network()) || s.contains(&u.network()))
                {
                    return Err(NetError::InvalidRequest(format!(
                        "subnet {s} overlaps {u}, used by another network"
                    )));
                }
                s
            }
            None => (1..=254u8)
                .map(|n| {
                    ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 89, n, 0), 24).expect("valid")
                })
                .find(|s| {
                    !used
                        .iter()
                        .any(|u| u.contains(&s.network()) || s.contains(&u.network()))
                })
                .ok_or_else(|| NetError::InvalidRequest("no free subnet in 10.89.0.0/16".into()))?,
        };
        let mut net = config::bridge_conflist(req, subnet)?;
        net.source = Some(config::write_new(&self.opts.config_dir, &net)?);
        Ok(net)
    }

    /// `network rm NAME`: deletes its config file. Refuses while containers have cached
    /// attachments to it, unless `force` (their teardown still works from the cache).
    pub fn remove_network(&self, name: &str, force: bool) -> Result<PathBuf, NetError> {
        let net = self.network(name)?;
        if !force {
            let users: Vec<String> = cache::containers(&self.opts.state_dir)
                .into_iter()
                .filter(|c| {
                    cache::list(&self.opts.state_dir, c)
                        .map(|recs| recs.iter().any(|r| r.network == name))
                        .unwrap_or(false)
                })
                .collect();
            if !users.is_empty() {
                return Err(NetError::NetworkInUse {
                    network: name.to_owned(),
                    containers: users,
                });
            }
        }
        let path = net.source.clone().expect("loaded from a file");
        std::fs::remove_file(&path)
            .map_err(|e| NetError::io(format!("removing {}", path.display()), e))?;
        release_bridge(&net);
        Ok(path)
    }

    /// The default network's settings (podman-like: bridge `caisson0`, 10.88.0.0/16, NAT,
    /// port mapping).
    pub fn default_network_request() -> NetworkCreate {
        let mut req = NetworkCreate::new(DEFAULT_NETWORK);
        req.bridge = Some("caisson0".into());
        req.subnet = Some("10.88.0.0/16".parse().expect("valid subnet"));
        req
    }

    /// Returns the default network, writing its config first if there is none.
    pub fn ensure_default_network(&self) -> Result<NetworkConfigList, NetError> {
        self.ensure_network(&Self::default_network_request())
    }

    /// Returns the network `req.name`, creating it as `req` says if it does not exist.
    pub fn ensure_network(&self, req: &NetworkCreate) -> Result<NetworkConfigList, NetError> {
        match self.network(&req.name) {
            Ok(n) => Ok(n),
            Err(NetError::UnknownNetwork { .. }) => match self.create_network(req) {
                // Another process wrote it meanwhile: use theirs.
                Err(NetError::NetworkExists(_)) => self.network(&req.name),
                other => other,
            },
            Err(e) => Err(e),
        }
    }

    // ---- plugin operations ----------------------------------------------------------------

    /// `VERSION` of one plugin binary.
    pub async fn version(&self, plugin: &str) -> Result<VersionInfo, NetError> {
        let out = self
            .exec(
                "",
                plugin,
                &Invocation {
                    command: Command::Version,
                    container_id: "",
                    netns: Path::new(""),
                    ifname: "",
                    args: &[],
                    search: &self.opts.plugin_dirs,
                    timeout: self.opts.timeout,
                    netns_doomed: false,
                },
                br#"{"cniVersion":"1.0.0"}"#,
            )
            .await?;
        serde_json::from_slice(&out).map_err(|e| NetError::BadResult {
            network: String::new(),
            plugin: plugin.to_owned(),
            command: "VERSION",
            reason: e.to_string(),
        })
    }

    /// Attaches the task in `netns` to every network in `nets`, in order (`eth0`, `eth1`, ...
    /// for those without an interface name). All or nothing: on a failure, what was attached is detached again.
    pub async fn setup(
        &self,
        container_id: &str,
        netns: &Path,
        nets: &[NetworkRequest],
    ) -> Result<Vec<Attachment>, NetError> {
        let mut done: Vec<Attachment> = Vec::new();
        let mut auto = 0;
        for req in nets {
            let ifname = req.ifname.clone().unwrap_or_else(|| {
                auto += 1;
                format!("eth{}", auto - 1)
            });
            let res = match self.network(&req.name) {
                Ok(conf) => self.add(&conf, container_id, netns, &ifname, req).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(r) => done.push(Attachment {
                    network: req.name.clone(),
                    ifname,
                    netns: netns.to_path_buf(),
                    result: Some(r),
                }),
                Err(e) => {
                    for a in done.iter().rev() {
                        if let Err(de) = self.del(container_id, &a.network, &a.ifname).await {
                            tracing::warn!(error = %de, "rolling back attachment failed");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// Detaches the container from everything the cache says it is attached to (newest first).
    /// Works after an agent restart; a container with no attachments is fine. Every attachment
    /// is tried; the first error is returned.
    pub async fn teardown(&self, container_id: &str) -> Result<(), NetError> {
        self.teardown_with(container_id, false).await
    }

    /// [`Cni::teardown`], then the task's namespace at `netns` goes too (missing is fine).
    /// Knowing that, our own plugins run in-process leave the task's interfaces to the
    /// namespace's end (the kernel deletes them in the background) instead of deleting them
    /// one by one, each a wait for an RCU grace period. The namespace is deleted even if a DEL
    /// failed (the cache keeps that attachment for a retry); the first error is returned.
    pub async fn release(&self, container_id: &str, netns: &Path) -> Result<(), NetError> {
        let res = self.teardown_with(container_id, true).await;
        delete_netns(netns)?;
        res
    }

    async fn teardown_with(&self, container_id: &str, netns_doomed: bool) -> Result<(), NetError> {
        validate_id("container id", container_id)?;
        let mut first_err = None;
        for rec in cache::list(&self.opts.state_dir, container_id)? {
            if let Err(e) = self
                .del_with(container_id, &rec.network, &rec.ifname, netns_doomed)
                .await
            {
                tracing::warn!(error = %e, network = %rec.network, "DEL failed during teardown");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The container's attachments according to the cache (for `inspect`).
    pub fn attachments(&self, container_id: &str) -> Result<Vec<Attachment>, NetError> {
        validate_id("container id", container_id)?;
        let mut v: Vec<Attachment> = cache::list(&self.opts.state_dir, container_id)?
            .into_iter()
            .map(|r| Attachment {
                result: r.result.and_then(|v| serde_json::from_value(v).ok()),
                network: r.network,
                ifname: r.ifname,
                netns: r.netns,
            })
            .collect();
        v.reverse();
        Ok(v)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(network = %net.name, container_id, ifname))]
    /// ADD on one network. The attempt is cached before the first plugin runs; a failure is
    /// rolled back with DEL (and the cache entry dropped once that worked).
    pub async fn add(
        &self,
        net: &NetworkConfigList,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        req: &NetworkRequest,
    ) -> Result<CniResult, NetError> {
        validate_id("container id", container_id)?;
        validate_id("interface name", ifname)?;
        let _ = volatile::ensure_tmpfs();
        if cache::read(&self.opts.state_dir, container_id, &net.name, ifname)?.is_some() {
            return Err(NetError::InvalidRequest(format!(
                "container {container_id:?} is already attached to network {:?} as {ifname}",
                net.name
            )));
        }
        let mut caps = req.capability_args.clone();
        if !req.port_mappings.is_empty() {
            caps.insert("portMappings".into(), json!(req.port_mappings));
        }
        let mut rec = cache::CacheRecord {
            kind: cache::KIND.into(),
            container_id: container_id.to_owned(),
            network: net.name.clone(),
            ifname: ifname.to_owned(),
            netns: netns.to_path_buf(),
            config: net.to_conflist(),
            cni_args: req.args.clone(),
            capability_args: caps,
            result: None,
            created: now_nanos(),
        };
        cache::write(&self.opts.state_dir, &rec)?;

        let mut prev: Option<Value> = None;
        let mut failure = None;
        for (i, plugin) in net.plugins.iter().enumerate() {
            match self
                .exec_one(net, plugin, Command::Add, &rec, prev.as_ref(), false)
                .await
            {
                Ok(out) => match parse_result(net, plugin, "ADD", &out) {
                    Ok(v) => prev = Some(v),
                    Err(e) => {
                        failure = Some((i, e));
                        break;
                    }
                },
                Err(e) => {
                    failure = Some((i, e));
                    break;
                }
            }
        }
        if let Some((failed_at, err)) = failure {
            self.rollback(net, &rec, failed_at, prev.as_ref()).await;
            return Err(err);
        }
        let raw = prev.unwrap_or_else(|| json!({ "cniVersion": net.cni_version }));
        let result: Result<CniResult, NetError> =
            serde_json::from_value(raw.clone()).map_err(|e| NetError::BadResult {
                network: net.name.clone(),
                plugin: plugin_type(net.plugins.last().expect("non-empty")).to_owned(),
                command: "ADD",
                reason: e.to_string(),
            });
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.rollback(net, &rec, net.plugins.len(), Some(&raw))
                    .await;
                return Err(e);
            }
        };
        rec.result = Some(raw);
        cache::write(&self.opts.state_dir, &rec)?;
        Ok(result)
    }

    /// Undoes a failed ADD: DEL on the plugins that ran, newest first. The plugin that failed
    /// may well fail DEL too; only the others must succeed for the cache entry to go.
    async fn rollback(
        &self,
        net: &NetworkConfigList,
        rec: &cache::CacheRecord,
        failed_at: usize,
        prev: Option<&Value>,
    ) {
        let mut clean = true;
        let last = failed_at.min(net.plugins.len() - 1);
        for i in (0..=last).rev() {
            let plugin = &net.plugins[i];
            if let Err(e) = self
                .exec_one(net, plugin, Command::Del, rec, prev, false)
                .await
            {
                tracing::warn!(error = %e, "DEL while rolling back a failed ADD");
                if i != failed_at {
                    clean = false;
                }
            }
        }
        if clean {
            if let Err(e) = cache::remove(
                &self.opts.state_dir,
                &rec.container_id,
                &rec.network,
                &rec.ifname,
            ) {
                tracing::warn!(error = %e, "removing the cache entry of a failed ADD");
            }
        }
    }

    /// CHECK on one attachment, with what ADD cached.
    pub async fn check(
        &self,
        container_id: &str,
        network: &str,
        ifname: &str,
    ) -> Result<(), NetError> {
        validate_id("container id", container_id)?;
        let rec =
            cache::read(&self.opts.state_dir, container_id, network, ifname)?.ok_or_else(|| {
                NetError::NotAttached {
                    container_id: container_id.to_owned(),
                    network: network.to_owned(),
                    ifname: ifname.to_owned(),
                }
            })?;
        let net = NetworkConfigList::from_conflist(rec.config.to_string().as_bytes(), None)?;
        if !result::version_at_least(&net.cni_version, "0.4.0") {
            return Err(NetError::InvalidRequest(format!(
                "network {network:?}: CHECK needs cniVersion 0.4.0 or later, config has {}",
                net.cni_version
            )));
        }
        if net.disable_check {
            return Ok(());
        }
        let Some(prev) = rec.result.as_ref() else {
            return Err(NetError::InvalidRequest(format!(
                "network {network:?}: ADD for container {container_id:?} never finished"
            )));
        };
        for plugin in &net.plugins {
            self.exec_one(&net, plugin, Command::Check, &rec, Some(prev), false)
                .await?;
        }
        Ok(())
    }

    /// DEL on one attachment, newest plugin first, with the configuration, arguments, netns
    /// path and result ADD cached, whatever the config file says now. The cache entry goes
    /// only when every plugin succeeded, so a failed DEL can be retried. A second DEL, or a DEL
    /// of something never attached, succeeds (without an entry there is nothing we attached).
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn del(
        &self,
        container_id: &str,
        network: &str,
        ifname: &str,
    ) -> Result<(), NetError> {
        self.del_with(container_id, network, ifname, false).await
    }

    /// [`Cni::del`]; `netns_doomed`: the caller deletes the attachment's netns right after.
    async fn del_with(
        &self,
        container_id: &str,
        network: &str,
        ifname: &str,
        netns_doomed: bool,
    ) -> Result<(), NetError> {
        validate_id("container id", container_id)?;
        let state = &self.opts.state_dir;
        let (net, rec) = match cache::read(state, container_id, network, ifname)? {
            Some(rec) => (
                NetworkConfigList::from_conflist(rec.config.to_string().as_bytes(), None)?,
                rec,
            ),
            // Without a cache entry there is nothing we know was attached, and no netns path:
            // nothing to undo.
            None => return Ok(()),
        };
        // Spec: prevResult on DEL from 0.4.0 on.
        let prev = rec
            .result
            .as_ref()
            .filter(|_| result::version_at_least(&net.cni_version, "0.4.0"));
        for plugin in net.plugins.iter().rev() {
            self.exec_one(&net, plugin, Command::Del, &rec, prev, netns_doomed)
                .await?;
        }
        cache::remove(state, container_id, network, ifname)
    }

    /// Spec 1.1 STATUS of every plugin of `network` (whether it can take ADDs now). Networks
    /// below cniVersion 1.1.0 have no STATUS: they are taken to be ready.
    pub async fn status(&self, network: &str) -> Result<(), NetError> {
        let net = self.network(network)?;
        if !result::version_at_least(&net.cni_version, "1.1.0") {
            return Ok(());
        }
        for plugin in &net.plugins {
            let conf = plugin_stdin(&net, plugin, None, &Map::new());
            self.exec(
                &net.name,
                plugin_type(plugin),
                &self.net_invocation(Command::Status),
                &conf,
            )
            .await?;
        }
        Ok(())
    }

    /// Spec 1.1 GC on `network`: plugins release what does not belong to the given attachments
    /// (container id, interface name). By default the valid attachments are those in our cache.
    /// A no-op below cniVersion 1.1.0.
    pub async fn gc(
        &self,
        network: &str,
        valid: Option<&[(String, String)]>,
    ) -> Result<(), NetError> {
        let net = self.network(network)?;
        if !result::version_at_least(&net.cni_version, "1.1.0") {
            return Ok(());
        }
        let cached: Vec<(String, String)>;
        let valid = match valid {
            Some(v) => v,
            None => {
                cached = self
                    .cached_containers()
                    .iter()
                    .flat_map(|c| cache::list(&self.opts.state_dir, c).unwrap_or_default())
                    .filter(|r| r.network == network)
                    .map(|r| (r.container_id, r.ifname))
                    .collect();
                &cached
            }
        };
        let atts: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        for plugin in &net.plugins {
            let mut conf: Map<String, Value> =
                serde_json::from_slice(&plugin_stdin(&net, plugin, None, &Map::new()))
                    .expect("object");
            conf.insert(
                "cni.dev/valid-attachments".into(),
                Value::Array(atts.clone()),
            );
            let conf = serde_json::to_vec(&conf).expect("JSON map serializes");
            self.exec(
                &net.name,
                plugin_type(plugin),
                &self.net_invocation(Command::Gc),
                &conf,
            )
            .await?;
        }
        Ok(())
    }

    /// Containers that have attachments in the cache (for recovery: tear down those the agent
    /// no longer knows).
    pub fn cached_containers(&self) -> Vec<String> {
        let mut v = cache::containers(&self.opts.state_dir);
        v.sort();
        v
    }

    fn net_invocation(&self, command: Command) -> Invocation<'_> {
        Invocation {
            command,
            container_id: "",
            netns: Path::new(""),
            ifname: "",
            args: &[],
            search: &self.opts.plugin_dirs,
            timeout: self.opts.timeout,
            netns_doomed: false,
        }
    }

    /// Runs ADD/CHECK/DEL of one plugin of a chain.
    async fn exec_one(
        &self,
        net: &NetworkConfigList,
        plugin: &Map<String, Value>,
        command: Command,
        rec: &cache::CacheRecord,
        prev: Option<&Value>,
        netns_doomed: bool,
    ) -> Result<Vec<u8>, NetError> {
        let conf = plugin_stdin(net, plugin, prev, &rec.capability_args);
        let inv = Invocation {
            command,
            container_id: &rec.container_id,
            netns: &rec.netns,
            ifname: &rec.ifname,
            args: &rec.cni_args,
            search: &self.opts.plugin_dirs,
            timeout: self.opts.timeout,
            netns_doomed,
        };
        self.exec(&net.name, plugin_type(plugin), &inv, &conf).await
    }

    async fn exec(
        &self,
        network: &str,
        plugin: &str,
        inv: &Invocation<'_>,
        stdin: &[u8],
    ) -> Result<Vec<u8>, NetError> {
        let not_found = || NetError::PluginNotFound {
            network: network.to_owned(),
            plugin: plugin.to_owned(),
            search: std::env::join_paths(&self.opts.plugin_dirs)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let bin = find_plugin(plugin, &self.opts.plugin_dirs).ok_or_else(not_found)?;
        let started = std::time::Instant::now();
        let inproc = exec::in_process_plugin(plugin, &bin);
        let res = match inproc {
            Some(p) => exec::run_in_process(p, &bin, inv, stdin).await,
            None => exec::run_plugin(&bin, inv, stdin).await,
        };
        tracing::debug!(plugin, command = inv.command.as_str(), in_process = inproc.is_some(), elapsed = ?started.elapsed(), ok = res.is_ok(), "cni plugin");
        res.map_err(|f| match f {
            ExecFailure::NotFound => not_found(),
            ExecFailure::Spawn(source) => NetError::Spawn {
                network: network.to_owned(),
                plugin: plugin.to_owned(),
                source,
            },
            ExecFailure::Timeout => NetError::Timeout {
                network: network.to_owned(),
                plugin: plugin.to_owned(),
                command: inv.command.as_str(),
                timeout: inv.timeout,
            },
            ExecFailure::Failed(error) => NetError::Plugin {
                network: network.to_owned(),
                plugin: plugin.to_owned(),
                command: inv.command.as_str(),
                error: Box::new(error),
            },
        })
    }
}

/// What a removed bridge network leaves on the host, as podman's `network rm` does: the
/// masquerade rules our bridge plugin made for it (one per subnet, comment `caisson-cni NAME`)
/// and the bridge itself once no interface is attached to it. Best effort: a leftover here is
/// logged, never an error (the config is gone already).
fn release_bridge(net: &NetworkConfigList) {
    let Some(bridge) = net
        .plugins
        .iter()
        .find(|p| plugin_type(p) == "bridge")
        .map(|p| p.get("bridge").and_then(Value::as_str).unwrap_or("cni0"))
    else {
        return;
    };
    let comment = format!("\"caisson-cni {}\"", net.name);
    for bin in ["iptables", "ip6tables"] {
        let Ok(out) = std::process::Command::new(bin)
            .args(["-w", "-t", "nat", "-S", "POSTROUTING"])
            .output()
        else {
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(rule) = line.strip_prefix("-A POSTROUTING ") else {
                continue;
            };
            if !rule.contains(&format!("--comment {comment} ")) {
                continue;
            }
            let mut args = vec!["-w".to_string(), "-t".into(), "nat".into(), "-D".into()];
            args.push("POSTROUTING".into());
            args.extend(split_rule(rule));
            match std::process::Command::new(bin).args(&args).output() {
                Ok(o) if o.status.success() => {}
                _ => tracing::warn!(network = %net.name, "could not remove rule: {line}"),
            }
        }
    }
    // Our bridge plugin's DEL lets the veth pair die in the background: give the last ones
    // a moment to leave the bridge.
    let ports = || std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"));
    let t0 = std::time::Instant::now();
    while ports().is_ok_and(|mut d| d.next().is_some()) && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if ports().is_ok_and(|mut d| d.next().is_none()) {
        let out = std::process::Command::new("ip")
            .args(["link", "delete", bridge, "type", "bridge"])
            .output();
        if !out.is_ok_and(|o| o.status.success()) {
            tracing::warn!(network = %net.name, "could not delete bridge {bridge}");
        }
    }
}

/// Splits an `iptables -S` rule into arguments (double quotes group a comment).
fn split_rule(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (vec![], String::new(), false);
    for ch in s.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
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

fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The stdin document for one plugin of a chain (libcni's `buildOneConfig` +
/// `injectRuntimeConfig`): the plugin's own object plus the list's name and version, the
/// previous result, and the capability arguments the plugin declares it wants.
fn plugin_stdin(
    net: &NetworkConfigList,
    plugin: &Map<String, Value>,
    prev: Option<&Value>,
    caps: &Map<String, Value>,
) -> Vec<u8> {
    let mut conf = plugin.clone();
    conf.insert("name".into(), json!(net.name));
    conf.insert("cniVersion".into(), json!(net.cni_version));
    if let Some(p) = prev {
        conf.insert("prevResult".into(), p.clone());
    }
    let mut rc = Map::new();
    if let Some(wanted) = plugin.get("capabilities").and_then(Value::as_object) {
        for (cap, on) in wanted {
            if on.as_bool() == Some(true) {
                if let Some(v) = caps.get(cap) {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
    }
    if !rc.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(rc));
    }
    serde_json::to_vec(&conf).expect("JSON map serializes")
}

fn parse_result(
    net: &NetworkConfigList,
    plugin: &Map<String, Value>,
    command: &'static str,
    out: &[u8],
) -> Result<Value, NetError> {
    let bad = |reason: String| NetError::BadResult {
        network: net.name.clone(),
        plugin: plugin_type(plugin).to_owned(),
        command,
        reason,
    };
    let v: Value = serde_json::from_slice(out).map_err(|e| bad(format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    let ver = v.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    if !result::version_at_least(ver, "0.3.0") {
        return Err(bad(format!(
            "unsupported result version {ver:?} (need 0.3.0 or later)"
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
