//! `caisson network ls|inspect|create|rm`: CNI network configurations in the config dir.
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use containerizer::net::{Cni, CniOptions, NetworkCreate};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where CNI configs and plugins are (CNI's own conventions by default).
#[derive(Args, Clone)]
pub struct CniArgs {
    /// Directory of network configurations (.conf/.conflist).
    #[arg(
        long,
        global = true,
        env = "CNI_CONF_DIR",
        default_value = "/etc/cni/net.d"
    )]
    cni_config_dir: PathBuf,
    /// Plugin search path (colon-separated), like CNI_PATH.
    #[arg(
        long,
        global = true,
        env = "CNI_PATH",
        default_value = "/opt/cni/bin:/usr/lib/cni"
    )]
    cni_plugin_dir: String,
}

impl CniArgs {
    /// These settings as command-line arguments (for commands caisson runs later).
    pub fn argv(&self) -> Vec<String> {
        vec![
            "--cni-config-dir".into(),
            self.cni_config_dir.to_string_lossy().into_owned(),
            "--cni-plugin-dir".into(),
            self.cni_plugin_dir.clone(),
        ]
    }

    pub fn cni(&self, root: &Path) -> Cni {
        Cni::new(CniOptions {
            config_dir: self.cni_config_dir.clone(),
            plugin_dirs: CniOptions::parse_path_list(&self.cni_plugin_dir),
            state_dir: containerizer::net::volatile_dir(root).join("cni"),
            ..CniOptions::default()
        })
    }
}

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// List networks.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show networks' configurations (JSON).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Create a bridge network (bridge + host-local IPAM + portmap).
    Create(CreateArgs),
    /// Remove networks (refused while tasks are attached, unless -f).
    Rm {
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Subnet in CIDR form (default: the first free 10.89.N.0/24).
    #[arg(long)]
    subnet: Option<String>,
    /// Gateway address (default: the subnet's first address).
    #[arg(long)]
    gateway: Option<std::net::Ipv4Addr>,
    /// Bridge interface name (default: derived from the network name).
    #[arg(long)]
    bridge: Option<String>,
    /// Do not masquerade traffic leaving the subnet.
    #[arg(long)]
    no_masquerade: bool,
    name: String,
}

pub fn network(root: &Path, cni: &CniArgs, cmd: NetworkCommand) -> Result<ExitCode> {
    let cni = cni.cni(root);
    match cmd {
        NetworkCommand::Ls { json } => {
            let nets = cni.networks()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nets)?);
            } else {
                println!("{:<20} {:<8} {:<40} SOURCE", "NAME", "VERSION", "PLUGINS");
                for n in nets {
                    let plugins: Vec<&str> = n
                        .plugins
                        .iter()
                        .filter_map(|p| p.get("type").and_then(|t| t.as_str()))
                        .collect();
                    println!(
                        "{:<20} {:<8} {:<40} {}",
                        n.name,
                        n.cni_version,
                        plugins.join(","),
                        n.source
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    );
                }
            }
        }
        NetworkCommand::Inspect { names } => {
            let nets = names
                .iter()
                .map(|n| cni.network(n))
                .collect::<Result<Vec<_>, _>>()?;
            println!("{}", serde_json::to_string_pretty(&nets)?);
        }
        NetworkCommand::Create(a) => {
            let mut req = NetworkCreate::new(&a.name);
            req.subnet = a
                .subnet
                .as_deref()
                .map(|s| s.parse().with_context(|| format!("invalid --subnet {s:?}")))
                .transpose()?;
            req.gateway = a.gateway;
            req.bridge = a.bridge;
            req.ip_masq = !a.no_masquerade;
            let net = cni.create_network(&req)?;
            println!("{}", net.name);
        }
        NetworkCommand::Rm { force, names } => {
            for n in names {
                let path = cni.remove_network(&n, force)?;
                println!("{n} ({})", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
