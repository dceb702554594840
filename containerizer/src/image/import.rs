//! The import pipeline shared by registry pulls and local archives: verify the config, fetch
//! and unpack each missing layer concurrently (streaming, verified), then record the image.
use super::auth::Credentials;
use super::digest::{Digest, HashingReader};
use super::manifest::{Descriptor, ImageManifest};
use super::platform::Platform;
use super::store::{ImageRecord, LayerMeta, LayerRef, Store};
use super::unpack::{self, UnpackOptions};
use super::{Error, IoContext, Result};
use std::collections::BTreeSet;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

/// How to pull or load an image.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to select from an index (the host's by default).
    pub platform: Option<Platform>,
    /// `Some(false)` allows plain HTTP and unverified TLS (podman's `--tls-verify=false`);
    /// `None` means TLS except for registries on loopback addresses.
    pub tls_verify: Option<bool>,
    pub credentials: Option<Credentials>,
    /// Connect and read timeout for registry requests.
    pub timeout: Duration,
    /// Bound on a layer's uncompressed size. Default: the larger of 4 GiB and 100x the
    /// compressed size, which no real layer reaches and every decompression bomb does.
    pub max_layer_size: Option<u64>,
    /// Layers fetched and unpacked at once.
    pub concurrency: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: None,
            tls_verify: None,
            credentials: None,
            timeout: Duration::from_secs(30),
            max_layer_size: None,
            concurrency: 3,
        }
    }
}

/// Progress callbacks (the CLI draws bars with them).
pub trait LayerProgress: Send + Sync {
    fn layer_start(&self, _digest: &str, _size: u64, _cached: bool) {}
    fn layer_bytes(&self, _digest: &str, _n: u64) {}
    fn layer_done(&self, _digest: &str) {}
}

pub struct NoProgress;
impl LayerProgress for NoProgress {}

/// Opens a layer blob for streaming. Called on a blocking thread.
pub(crate) trait BlobOpener: Send + Sync + 'static {
    fn open(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>>;
}

/// A manifest that has been resolved (platform chosen) and its config fetched.
pub(crate) struct Resolved {
    /// The user's name for the image, for messages.
    pub image: String,
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    pub config_bytes: Vec<u8>,
    /// `name@digest`, when the source is a repository.
    pub repo_digest: Option<String>,
    /// The tags to point at the image.
    pub tags: Vec<String>,
    /// Whether layer descriptors carry real blob digests and sizes (docker-archive: no).
    pub blob_digests_known: bool,
}

#[derive(serde::Deserialize)]
struct ConfigProbe {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    created: Option<String>,
    rootfs: RootfsProbe,
}

#[derive(serde::Deserialize)]
struct RootfsProbe {
    diff_ids: Vec<String>,
}

fn manifest_err(image: &str, message: impl Into<String>) -> Error {
    Error::Manifest {
        image: image.to_string(),
        message: message.into(),
    }
}

/// Checks a config blob against its descriptor and parses what the store needs from it.
pub(crate) fn check_config(
    image: &str,
    manifest: &ImageManifest,
    config: &[u8],
    wanted: Option<&Platform>,
) -> Result<(Platform, Vec<Digest>, Option<String>)> {
    let got = Digest::of(config);
    if got.as_str() != manifest.config.digest {
        return Err(Error::Blob {
            image: image.into(),
            digest: manifest.config.digest.clone(),
            message: format!("config digest mismatch: content is {got}"),
        });
    }
    let probe: ConfigProbe = serde_json::from_slice(config)
        .map_err(|e| manifest_err(image, format!("image config does not parse: {e}")))?;
    // The typed parse is what `inspect` and `run` use later: refuse now what they would.
    serde_json::from_slice::<oci_spec::image::ImageConfiguration>(config)
        .map_err(|e| manifest_err(image, format!("image config does not parse: {e}")))?;
    let platform = Platform {
        os: probe.os,
        architecture: probe.architecture,
        variant: probe.variant.filter(|v| !v.is_empty()),
    };
    if let Some(w) = wanted {
        if !w.accepts(&platform) {
            return Err(Error::NoMatchingPlatform {
                image: image.into(),
                wanted: w.to_string(),
                available: platform.to_string(),
            });
        }
    }
    let diff_ids = probe
        .rootfs
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| manifest_err(image, format!("config diff_id: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(manifest_err(
            image,
            format!(
                "manifest has {} layers but the config lists {} diff_ids",
                manifest.layers.len(),
                diff_ids.len()
            ),
        ));
    }
    Ok((platform, diff_ids, probe.created))
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Fetches, verifies and unpacks one layer into the store. Runs on a blocking thread.
#[allow(clippy::too_many_arguments)]
fn fetch_layer(
    store: &Store,
    image: &str,
    opener: &dyn BlobOpener,
    desc: &Descriptor,
    diff_id: &Digest,
    digest_known: bool,
    max_layer_size: Option<u64>,
    progress: &dyn LayerProgress,
) -> Result<()> {
    let work = store.work()?;
    let diff = work.path.join("diff");
    std::fs::create_dir(&diff).ctx(|| format!("creating {}", diff.display()))?;
    let blob = opener.open(desc)?;
    let key = desc.digest.clone();
    let mut reader = HashingReader::new(blob, digest_known.then_some(desc.size));
    let max_size =
        max_layer_size.unwrap_or_else(|| (4u64 << 30).max(desc.size.saturating_mul(100)));
    let layer_err = |source| Error::Layer {
        image: image.into(),
        digest: desc.digest.clone(),
        source: Box::new(source),
    };
    let stats = {
        let mut tracked = ProgressReader {
            inner: &mut reader,
            progress,
            key: &key,
        };
        unpack::unpack_layer(
            &mut tracked,
            &diff,
            &UnpackOptions {
                max_size,
                preserve_ownership: is_root(),
            },
        )
        .map_err(layer_err)?
    };
    let (got, size) = reader
        .finish()
        .ctx(|| format!("{image}: reading layer {}", desc.digest))?;
    let blob_err = |message: String| Error::Blob {
        image: image.into(),
        digest: desc.digest.clone(),
        message,
    };
    if digest_known {
        if got.as_str() != desc.digest {
            return Err(blob_err(format!("digest mismatch: content is {got}")));
        }
        if size != desc.size {
            return Err(blob_err(format!(
                "size mismatch: manifest says {} bytes, got {size}",
                desc.size
            )));
        }
    }
    if stats.diff_id != diff_id.as_str() {
        return Err(blob_err(format!(
            "uncompressed content is {} but the config's diff_id is {diff_id}",
            stats.diff_id
        )));
    }
    store.commit_layer(
        work,
        &LayerMeta {
            diff_id: diff_id.to_string(),
            size: stats.size,
            entries: stats.entries,
            digest: digest_known.then(|| desc.digest.clone()),
        },
    )?;
    progress.layer_done(&desc.digest);
    Ok(())
}

struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a dyn LayerProgress,
    key: &'a str,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.layer_bytes(self.key, n as u64);
        Ok(n)
    }
}

/// Fetches and unpacks every missing layer of `r`, then records the image and its tag.
pub(crate) async fn import(
    store: &Store,
    r: Resolved,
    opener: Arc<dyn BlobOpener>,
    opts: &PullOptions,
    progress: Arc<dyn LayerProgress>,
) -> Result<ImageRecord> {
    if super::wasm::is_artifact(&r.manifest) {
        let store = store.clone();
        return tokio::task::spawn_blocking(move || {
            super::wasm::import_artifact(&store, r, opener)
        })
        .await
        .expect("artifact import panicked");
    }
    let (platform, diff_ids, created) = check_config(
        &r.image,
        &r.manifest,
        &r.config_bytes,
        opts.platform.as_ref(),
    )?;
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    for (desc, diff_id) in r.manifest.layers.iter().zip(&diff_ids) {
        let cached = store.has_layer(diff_id);
        if !seen.insert(diff_id.clone()) {
            continue;
        }
        progress.layer_start(&desc.digest, desc.size, cached);
        if !cached {
            missing.push((desc.clone(), diff_id.clone()));
        }
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (desc, diff_id) in missing {
        let (store, image, opener, progress, sem) = (
            store.clone(),
            r.image.clone(),
            opener.clone(),
            progress.clone(),
            sem.clone(),
        );
        let (known, max) = (r.blob_digests_known, opts.max_layer_size);
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            tokio::task::spawn_blocking(move || {
                fetch_layer(
                    &store, &image, &*opener, &desc, &diff_id, known, max, &*progress,
                )
            })
            .await
            .expect("layer task panicked")
        });
    }
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res.expect("layer task panicked") {
            // Dropping the set aborts the layers still waiting; running ones finish and
            // are either committed (reusable) or cleaned up.
            tasks.abort_all();
            return Err(e);
        }
    }
    let manifest_digest = store.put_blob(&r.manifest_bytes)?;
    let id = store.put_blob(&r.config_bytes)?;
    let layers = r
        .manifest
        .layers
        .iter()
        .zip(&diff_ids)
        .map(|(d, diff_id)| LayerRef {
            diff_id: diff_id.to_string(),
            digest: r.blob_digests_known.then(|| d.digest.clone()),
            media_type: d.media_type.clone(),
            size: d.size,
        })
        .collect();
    let size = diff_ids
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter_map(|d| {
            std::fs::read(store.layer_dir(d).with_file_name("layer.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<LayerMeta>(&b).ok())
                .map(|m| m.size)
        })
        .sum();
    let record = ImageRecord {
        id: id.to_string(),
        manifest_digest: manifest_digest.to_string(),
        manifest_media_type: r.manifest.media_type.clone(),
        repo_digests: r.repo_digest.into_iter().collect(),
        platform,
        layers,
        size,
        created,
        stored_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    store.put_image(&record, &r.tags)?;
    store.record(&id)
}
