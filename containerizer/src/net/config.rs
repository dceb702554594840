//! Network configuration files: `.conf` (one plugin) and `.conflist` (a chain), as libcni reads
//! them, plus the files caisson writes itself (`network create`, the default network).

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::NetError;

/// A network: a named chain of plugin configurations.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkConfigList {
    pub name: String,
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "disableCheck")]
    pub disable_check: bool,
    /// Each plugin's configuration object as written (with at least `type`).
    pub plugins: Vec<Map<String, Value>>,
    /// The file it came from, when it came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
}

impl NetworkConfigList {
    /// Parses a `.conflist` document.
    pub fn from_conflist(bytes: &[u8], source: Option<&Path>) -> Result<Self, NetError> {
        let bad = |reason: String| NetError::BadConfig {
            path: source.map(Path::to_path_buf).unwrap_or_default(),
            reason,
        };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let name = str_field(obj, "name").ok_or_else(|| bad("no \"name\"".into()))?;
        validate_name(&name).map_err(bad)?;
        let cni_version = str_field(obj, "cniVersion").unwrap_or_else(|| "0.1.0".into());
        let disable_check = obj
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no \"plugins\" array".into()))?;
        if plugins.is_empty() {
            return Err(bad("\"plugins\" is empty".into()));
        }
        let mut out = Vec::with_capacity(plugins.len());
        for (i, p) in plugins.iter().enumerate() {
            let p = p
                .as_object()
                .ok_or_else(|| bad(format!("plugins[{i}] is not an object")))?;
            check_plugin(p).map_err(|e| bad(format!("plugins[{i}]: {e}")))?;
            out.push(p.clone());
        }
        Ok(Self {
            name,
            cni_version,
            disable_check,
            plugins: out,
            source: source.map(Path::to_path_buf),
        })
    }

    /// Parses a single-plugin `.conf` document into a one-element chain.
    pub fn from_conf(bytes: &[u8], source: Option<&Path>) -> Result<Self, NetError> {
        let bad = |reason: String| NetError::BadConfig {
            path: source.map(Path::to_path_buf).unwrap_or_default(),
            reason,
        };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let name = str_field(obj, "name").ok_or_else(|| bad("no \"name\"".into()))?;
        validate_name(&name).map_err(bad)?;
        check_plugin(obj).map_err(bad)?;
        Ok(Self {
            name,
            cni_version: str_field(obj, "cniVersion").unwrap_or_else(|| "0.1.0".into()),
            disable_check: false,
            plugins: vec![obj.clone()],
            source: source.map(Path::to_path_buf),
        })
    }

    /// Reads a config file, by extension (`.conflist` is a chain; `.conf`/`.json` one plugin).
    pub fn from_file(path: &Path) -> Result<Self, NetError> {
        let bytes =
            fs::read(path).map_err(|e| NetError::io(format!("reading {}", path.display()), e))?;
        if path.extension().is_some_and(|e| e == "conflist") {
            Self::from_conflist(&bytes, Some(path))
        } else {
            Self::from_conf(&bytes, Some(path))
        }
    }

    /// The document in `.conflist` form (what the cache stores and `network inspect` shows).
    pub fn to_conflist(&self) -> Value {
        json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": self.plugins,
        })
    }

    /// The plugin types of the chain, in order.
    pub fn plugin_types(&self) -> Vec<&str> {
        self.plugins
            .iter()
            .map(|p| p.get("type").and_then(Value::as_str).unwrap_or(""))
            .collect()
    }
}

fn str_field(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn check_plugin(p: &Map<String, Value>) -> Result<(), String> {
    let ty = p.get("type").and_then(Value::as_str).ok_or("no \"type\"")?;
    // The type names a binary in the search path; never a path of its own.
    if ty.is_empty() || ty.contains('/') || ty == "." || ty == ".." {
        return Err(format!("invalid plugin type {ty:?}"));
    }
    Ok(())
}

/// Network names end up in file names and interface names: keep them tame (as podman does).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid network name {name:?} (letters, digits, '-', '_', '.'; not starting with '.')"
        ))
    }
}

/// Config files in `dir` in the order libcni uses (sorted by file name).
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, NetError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetError::io(format!("listing {}", dir.display()), e)),
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// All networks in `dir`. A file that does not parse is an error naming it (a typo must not make
/// a network silently vanish); duplicate names keep the first, as libcni does.
pub fn load_all(dir: &Path) -> Result<Vec<NetworkConfigList>, NetError> {
    let mut out: Vec<NetworkConfigList> = Vec::new();
    for f in config_files(dir)? {
        let net = NetworkConfigList::from_file(&f)?;
        if !out.iter().any(|n| n.name == net.name) {
            out.push(net);
        }
    }
    Ok(out)
}

/// The network called `name` in `dir`. `.conflist` files win over `.conf` ones (libcni order);
/// a malformed file is only an error if nothing else matches, so that one broken file does not
/// take every network down.
pub fn load(dir: &Path, name: &str) -> Result<NetworkConfigList, NetError> {
    let files = config_files(dir)?;
    let mut first_err = None;
    let (lists, singles): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|p| p.extension().is_some_and(|e| e == "conflist"));
    for f in lists.iter().chain(singles.iter()) {
        match NetworkConfigList::from_file(f) {
            Ok(n) if n.name == name => return Ok(n),
            Ok(_) => {}
            Err(e) => {
                // Report a broken file that is (by its file name or its "name") this network.
                let named = fs::read(f)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .is_some_and(|v| v.get("name").and_then(Value::as_str) == Some(name));
                if named || f.file_stem().is_some_and(|s| s == name) {
                    return Err(e);
                }
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = &first_err {
        tracing::debug!(error = %e, "a config file in {} did not parse", dir.display());
    }
    Err(NetError::UnknownNetwork {
        name: name.to_owned(),
        dir: dir.to_path_buf(),
    })
}

/// What `caisson network create` asks for.
#[derive(Debug, Clone)]
pub struct NetworkCreate {
    pub name: String,
    /// Bridge device name; default: `cni-` + a short form of the name (max 15 bytes).
    pub bridge: Option<String>,
    /// IPv4 subnet; default: the first free `10.89.N.0/24`.
    pub subnet: Option<ipnet::Ipv4Net>,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Masquerade traffic leaving the subnet (needs iptables).
    pub ip_masq: bool,
    /// Directory for host-local's allocations (default [`super::IPAM_DATA_DIR`]; `None`: the
    /// plugin's own, /var/lib/cni/networks).
    pub ipam_data_dir: Option<PathBuf>,
    /// Add the `portmap` plugin so that `-p` works on this network.
    pub port_map: bool,
    pub cni_version: String,
}

impl NetworkCreate {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bridge: None,
            subnet: None,
            gateway: None,
            ip_masq: true,
            ipam_data_dir: Some(super::IPAM_DATA_DIR.into()),
            port_map: true,
            cni_version: "1.0.0".into(),
        }
    }
}

/// Builds the bridge + host-local (+ portmap) chain for a [`NetworkCreate`].
pub fn bridge_conflist(
    req: &NetworkCreate,
    subnet: ipnet::Ipv4Net,
) -> Result<NetworkConfigList, NetError> {
    let bridge = req.bridge.clone().unwrap_or_else(|| {
        let mut b = format!("cni-{}", req.name);
        b.truncate(15);
        b
    });
    if bridge.is_empty() || bridge.len() > 15 || bridge.contains('/') {
        return Err(NetError::InvalidRequest(format!(
            "invalid bridge name {bridge:?} (1 to 15 bytes)"
        )));
    }
    let mut range = json!({ "subnet": subnet.to_string() });
    if let Some(gw) = req.gateway {
        if !subnet.contains(&gw) {
            return Err(NetError::InvalidRequest(format!(
                "gateway {gw} is not in subnet {subnet}"
            )));
        }
        range["gateway"] = json!(gw.to_string());
    }
    let mut ipam = json!({
        "type": "host-local",
        "ranges": [[range]],
        "routes": [{ "dst": "0.0.0.0/0" }],
    });
    if let Some(d) = &req.ipam_data_dir {
        ipam["dataDir"] = json!(d);
    }
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": req.ip_masq,
        "hairpinMode": true,
        "ipam": ipam,
    })];
    if req.port_map {
        plugins.push(json!({ "type": "portmap", "capabilities": { "portMappings": true } }));
    }
    let doc = json!({ "cniVersion": req.cni_version, "name": req.name, "plugins": plugins });
    NetworkConfigList::from_conflist(doc.to_string().as_bytes(), None)
}

/// Writes `net` as `<dir>/<name>.conflist` atomically; fails if a network of that name exists.
pub fn write_new(dir: &Path, net: &NetworkConfigList) -> Result<PathBuf, NetError> {
    fs::create_dir_all(dir).map_err(|e| NetError::io(format!("creating {}", dir.display()), e))?;
    if load(dir, &net.name).is_ok() {
        return Err(NetError::NetworkExists(net.name.clone()));
    }
    let path = dir.join(format!("{}.conflist", net.name));
    let tmp = dir.join(format!(".{}.conflist.tmp", net.name));
    let body = serde_json::to_vec_pretty(&net.to_conflist()).expect("JSON value serializes");
    fs::write(&tmp, body).map_err(|e| NetError::io(format!("writing {}", tmp.display()), e))?;
    // A plain rename would replace a file another writer created meanwhile: link refuses to.
    let res = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match res {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(NetError::NetworkExists(net.name.clone()))
        }
        Err(e) => Err(NetError::io(format!("writing {}", path.display()), e)),
    }
}

/// The IPv4 subnets the networks in `dir` use (from host-local `ranges`/`subnet`).
pub fn used_subnets(nets: &[NetworkConfigList]) -> Vec<ipnet::Ipv4Net> {
    let mut out = Vec::new();
    for n in nets {
        for p in &n.plugins {
            let Some(ipam) = p.get("ipam") else { continue };
            if let Some(s) = ipam.get("subnet").and_then(Value::as_str) {
                out.extend(s.parse::<ipnet::Ipv4Net>().ok());
            }
            for set in ipam
                .get("ranges")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for r in set.as_array().into_iter().flatten() {
                    if let Some(s) = r.get("subnet").and_then(Value::as_str) {
                        out.extend(s.parse::<ipnet::Ipv4Net>().ok());
                    }
                }
            }
        }
    }
    out
}
