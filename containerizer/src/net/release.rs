//! Releasing a task's networks from its supervisor: when the task has exited, the supervisor
//! runs CNI DEL from the attachment cache and deletes the netns itself, instead of starting a
//! second program (`caisson cleanup`) to do it. Whoever comes later (`caisson rm`, an agent
//! after a restart, `caisson cleanup`) still finds the cache and DELs whatever is left, so a
//! supervisor killed before it got there leaks nothing for long.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Cni, CniOptions, NetError};

/// What the supervisor needs to release a task's networks (part of the task's spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub container_id: String,
    /// The task's namespace, deleted after DEL.
    pub netns: PathBuf,
    /// The attachment cache ([`CniOptions::state_dir`]).
    pub state_dir: PathBuf,
    /// The plugin search path DEL runs with.
    pub plugin_dirs: Vec<PathBuf>,
    pub timeout_ms: u64,
}

impl Release {
    pub fn new(cni: &Cni, container_id: &str, netns: PathBuf) -> Self {
        let o = cni.options();
        Self {
            container_id: container_id.to_owned(),
            netns,
            state_dir: o.state_dir.clone(),
            plugin_dirs: o.plugin_dirs.clone(),
            timeout_ms: o.timeout.as_millis() as u64,
        }
    }

    /// DEL of every cached attachment (newest first), then the netns ([`Cni::release`]).
    /// Blocking; runs the plugins on a current-thread runtime of its own, so call it outside
    /// any async runtime.
    pub fn run(&self) -> Result<(), NetError> {
        let cni = Cni::new(CniOptions {
            // DEL uses the configuration ADD cached, not the config directory.
            config_dir: PathBuf::new(),
            plugin_dirs: self.plugin_dirs.clone(),
            state_dir: self.state_dir.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::io("starting the CNI runtime", e))?;
        rt.block_on(cni.release(&self.container_id, &self.netns))
    }
}
