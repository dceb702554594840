//! Image commands: pull, load, images, image inspect, rmi, image prune.
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use containerizer::image::{
    archive, auth::Credentials, registry, ImageRef, LayerProgress, NoProgress, Platform,
    PullOptions, Store,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Args)]
pub struct FetchArgs {
    /// Platform to choose from a multi-platform image (os/arch[/variant]); the host's by default.
    #[arg(long)]
    platform: Option<String>,
    /// Suppress the progress display.
    #[arg(short, long)]
    quiet: bool,
    /// Bound on a layer's uncompressed size, in bytes (default: max(4 GiB, 100x its compressed size)).
    #[arg(long)]
    max_layer_size: Option<u64>,
}

#[derive(Args)]
pub struct PullArgs {
    /// Image reference, e.g. `busybox`, `127.0.0.1:5000/app:1`, `name@sha256:...`.
    reference: String,
    /// Require HTTPS with verified certificates (`--tls-verify=false` allows HTTP and any
    /// certificate). Registries on loopback addresses use HTTP unless this is given.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    tls_verify: Option<bool>,
    /// Registry credentials, USERNAME:PASSWORD.
    #[arg(long)]
    creds: Option<String>,
    /// Connect and read timeout for registry requests, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    #[command(flatten)]
    fetch: FetchArgs,
}

#[derive(Args)]
pub struct LoadArgs {
    /// docker-archive or oci-archive tarball (plain, gzip or zstd), or an OCI layout `DIR[:tag]`.
    #[arg(short, long)]
    input: String,
    #[command(flatten)]
    fetch: FetchArgs,
}

#[derive(Args)]
pub struct ImagesArgs {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Only image ids.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
pub struct RmiArgs {
    /// Images (name[:tag], name@digest, or id prefix).
    #[arg(required = true)]
    images: Vec<String>,
    /// Remove even if containers use the image.
    #[arg(short, long)]
    force: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    #[arg(required = true)]
    images: Vec<String>,
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry.
    Pull(PullArgs),
    /// Load images from an archive or OCI layout.
    Load(LoadArgs),
    /// List images.
    #[command(alias = "list")]
    Ls(ImagesArgs),
    /// Show an image's digest, platform, layers and config (JSON).
    Inspect(InspectArgs),
    /// Remove images.
    Rm(RmiArgs),
    /// Remove images without tags and layers no image uses.
    Prune,
}

pub fn image(root: &Path, cmd: ImageCommand) -> Result<ExitCode> {
    match cmd {
        ImageCommand::Pull(a) => pull(root, a),
        ImageCommand::Load(a) => load(root, a),
        ImageCommand::Ls(a) => list(root, a),
        ImageCommand::Inspect(a) => inspect(root, a),
        ImageCommand::Rm(a) => rmi(root, a),
        ImageCommand::Prune => prune(root),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Progress bars per layer, drawn only on a terminal.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
        }
    }
}

impl LayerProgress for Bars {
    fn layer_start(&self, digest: &str, size: u64, cached: bool) {
        let short = digest
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect::<String>();
        let bar = self.multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(short);
        if cached {
            bar.finish_with_message("already present");
        }
        self.bars
            .lock()
            .expect("bars")
            .insert(digest.to_string(), bar);
    }
    fn layer_bytes(&self, digest: &str, n: u64) {
        if let Some(b) = self.bars.lock().expect("bars").get(digest) {
            b.inc(n);
        }
    }
    fn layer_done(&self, digest: &str) {
        if let Some(b) = self.bars.lock().expect("bars").get(digest) {
            b.finish_with_message("done");
        }
    }
}

fn progress(quiet: bool) -> Arc<dyn LayerProgress> {
    if !quiet && std::io::stdout().is_terminal() {
        Arc::new(Bars::new())
    } else {
        Arc::new(NoProgress)
    }
}

fn options(fetch: &FetchArgs) -> Result<PullOptions> {
    Ok(PullOptions {
        platform: fetch.platform.as_deref().map(Platform::parse).transpose()?,
        max_layer_size: fetch.max_layer_size,
        ..PullOptions::default()
    })
}

pub fn pull(root: &Path, a: PullArgs) -> Result<ExitCode> {
    let reference = ImageRef::parse(&a.reference)?;
    let mut opts = options(&a.fetch)?;
    opts.tls_verify = a.tls_verify;
    opts.credentials = a.creds.as_deref().map(Credentials::parse).transpose()?;
    opts.timeout = Duration::from_secs(a.timeout.max(1));
    let store = Store::open(root)?;
    let rec = runtime()?.block_on(registry::pull(
        &store,
        &reference,
        &opts,
        progress(a.fetch.quiet),
    ))?;
    println!("{}", rec.id);
    Ok(ExitCode::SUCCESS)
}

pub fn load(root: &Path, a: LoadArgs) -> Result<ExitCode> {
    let opts = options(&a.fetch)?;
    let store = Store::open(root)?;
    let recs = runtime()?.block_on(archive::load(
        &store,
        &a.input,
        &opts,
        progress(a.fetch.quiet),
    ))?;
    let all = store.images()?;
    for rec in recs {
        let tags = all
            .iter()
            .find(|(r, _)| r.id == rec.id)
            .map(|(_, t)| t.join(", "))
            .unwrap_or_default();
        println!("Loaded image: {} {}", rec.id, tags);
    }
    Ok(ExitCode::SUCCESS)
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000", "")
    }
}

pub fn list(root: &Path, a: ImagesArgs) -> Result<ExitCode> {
    let store = Store::open(root)?;
    let images = store.images()?;
    if a.json {
        let out: Vec<serde_json::Value> = images
            .iter()
            .map(|(r, tags)| {
                serde_json::json!({
                    "Id": r.id,
                    "Names": tags,
                    "Digest": r.manifest_digest,
                    "RepoDigests": r.repo_digests,
                    "Platform": r.platform.to_string(),
                    "Created": r.created,
                    "Size": r.size,
                    "Layers": r.layers.len(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if a.quiet {
        for (r, _) in &images {
            println!("{}", &r.id[7..19]);
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<45} {:<15} {:<14} {:<22} {:>10}",
        "REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"
    );
    for (r, tags) in &images {
        let created = r
            .created
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(19)
            .collect::<String>();
        let names: Vec<(String, String)> = if tags.is_empty() {
            vec![("<none>".into(), "<none>".into())]
        } else {
            tags.iter()
                .map(|t| match t.rsplit_once(':') {
                    Some((n, tag)) => (n.to_string(), tag.to_string()),
                    None => (t.clone(), "<none>".into()),
                })
                .collect()
        };
        for (repo, tag) in names {
            println!(
                "{:<45} {:<15} {:<14} {:<22} {:>10}",
                repo,
                tag,
                &r.id[7..19],
                created,
                human_size(r.size)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(root: &Path, a: InspectArgs) -> Result<ExitCode> {
    let store = Store::open(root)?;
    let mut out = Vec::new();
    for name in &a.images {
        let rec = store.resolve(name)?;
        let config = store.config(&rec)?;
        let tags: Vec<String> = store
            .images()?
            .into_iter()
            .find(|(r, _)| r.id == rec.id)
            .map(|(_, t)| t)
            .unwrap_or_default();
        let c = config.config();
        out.push(serde_json::json!({
            "Id": rec.id,
            "Digest": rec.manifest_digest,
            "ManifestMediaType": rec.manifest_media_type,
            "RepoTags": tags,
            "RepoDigests": rec.repo_digests,
            "Platform": rec.platform.to_string(),
            "Os": rec.platform.os,
            "Architecture": rec.platform.architecture,
            "Variant": rec.platform.variant,
            "Created": rec.created,
            "Size": rec.size,
            "Layers": rec.layers,
            "Config": {
                "Entrypoint": c.as_ref().and_then(|c| c.entrypoint().clone()),
                "Cmd": c.as_ref().and_then(|c| c.cmd().clone()),
                "Env": c.as_ref().and_then(|c| c.env().clone()),
                "WorkingDir": c.as_ref().and_then(|c| c.working_dir().clone()),
                "User": c.as_ref().and_then(|c| c.user().clone()),
                "ExposedPorts": c.as_ref().and_then(|c| c.exposed_ports().clone()),
                "Labels": c.as_ref().and_then(|c| c.labels().clone()),
                "StopSignal": c.as_ref().and_then(|c| c.stop_signal().clone()),
            },
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

pub fn rmi(root: &Path, a: RmiArgs) -> Result<ExitCode> {
    let store = Store::open(root)?;
    let mut failed = false;
    for name in &a.images {
        match store.remove_image(name, a.force) {
            Ok(report) => {
                for t in report.untagged {
                    println!("Untagged: {t}");
                }
                for d in report.deleted_images {
                    println!("Deleted: {d}");
                }
            }
            Err(e) => {
                eprintln!("Error: {e}");
                failed = true;
            }
        }
    }
    // podman: 1 when an image is unknown or could not be removed.
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn prune(root: &Path) -> Result<ExitCode> {
    let store = Store::open(root)?;
    let report = store.prune()?;
    for d in report.deleted_images {
        println!("Deleted: {d}");
    }
    for l in report.deleted_layers {
        println!("Deleted layer: {l}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Pulls an image `run` found missing (podman pulls missing images before running them).
pub fn pull_for_run(store: &Store, image: &str) -> Result<containerizer::image::ImageRecord> {
    let reference = ImageRef::parse(image)?;
    eprintln!("Pulling {reference}");
    let rec = runtime()?.block_on(registry::pull(
        store,
        &reference,
        &PullOptions::default(),
        progress(false),
    ))?;
    Ok(rec)
}
