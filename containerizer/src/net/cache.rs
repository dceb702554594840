//! The per-attachment cache: what ADD ran with (configuration, arguments, netns) and what it
//! returned, so that CHECK and DEL after an agent restart use exactly that, even if the config
//! file has changed or gone since.
//!
//! Layout: `<state>/<container id>/<network>:<ifname>.json` (neither a network name nor an
//! interface name may contain ':', so the file name is unambiguous). The record is written before
//! the first plugin runs (`result: null`) so that a crash during ADD still leaves enough behind
//! for teardown to DEL.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::NetError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheRecord {
    pub kind: String,
    pub container_id: String,
    pub network: String,
    pub ifname: String,
    pub netns: PathBuf,
    /// The configuration list in `.conflist` form.
    pub config: Value,
    #[serde(default)]
    pub cni_args: Vec<(String, String)>,
    #[serde(default)]
    pub capability_args: Map<String, Value>,
    /// The final ADD result; `None` while ADD runs (or if it never finished).
    pub result: Option<Value>,
    /// When ADD started (seconds since the epoch); teardown DELs the newest first.
    #[serde(default)]
    pub created: u64,
}

pub const KIND: &str = "caisson-cni-cache-v1";

pub(crate) fn container_dir(state: &Path, container_id: &str) -> PathBuf {
    state.join(container_id)
}

pub(crate) fn record_path(
    state: &Path,
    container_id: &str,
    network: &str,
    ifname: &str,
) -> PathBuf {
    container_dir(state, container_id).join(format!("{network}:{ifname}.json"))
}

pub(crate) fn write(state: &Path, rec: &CacheRecord) -> Result<(), NetError> {
    let dir = container_dir(state, &rec.container_id);
    fs::create_dir_all(&dir).map_err(|e| NetError::io(format!("creating {}", dir.display()), e))?;
    let path = record_path(state, &rec.container_id, &rec.network, &rec.ifname);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(rec).expect("cache record serializes");
    fs::write(&tmp, body).map_err(|e| NetError::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, &path).map_err(|e| NetError::io(format!("writing {}", path.display()), e))
}

pub(crate) fn read(
    state: &Path,
    container_id: &str,
    network: &str,
    ifname: &str,
) -> Result<Option<CacheRecord>, NetError> {
    read_path(&record_path(state, container_id, network, ifname))
}

fn read_path(path: &Path) -> Result<Option<CacheRecord>, NetError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| NetError::BadConfig {
                path: path.to_path_buf(),
                reason: format!("corrupt cache record: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NetError::io(format!("reading {}", path.display()), e)),
    }
}

pub(crate) fn remove(
    state: &Path,
    container_id: &str,
    network: &str,
    ifname: &str,
) -> Result<(), NetError> {
    let path = record_path(state, container_id, network, ifname);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(NetError::io(format!("removing {}", path.display()), e))
        }
        _ => {}
    }
    // Leave no empty per-container directories behind; fails harmlessly if others remain.
    let _ = fs::remove_dir(container_dir(state, container_id));
    Ok(())
}

/// All records of one container, newest first.
pub(crate) fn list(state: &Path, container_id: &str) -> Result<Vec<CacheRecord>, NetError> {
    let dir = container_dir(state, container_id);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetError::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for e in rd.filter_map(Result::ok) {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            out.extend(read_path(&p)?);
        }
    }
    out.sort_by(|a, b| b.created.cmp(&a.created).then(b.ifname.cmp(&a.ifname)));
    Ok(out)
}

/// Containers with records in the cache.
pub(crate) fn containers(state: &Path) -> Vec<String> {
    fs::read_dir(state)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}
