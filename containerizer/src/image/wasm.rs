//! Wasm OCI artifacts in the store: manifests whose layer is the module itself
//! (`application/vnd.wasm.content.layer.v1+wasm`, the containerd/runwasi convention, and the
//! CNCF layout with config `application/vnd.wasm.config.v0+json` and layer `application/wasm`).
//!
//! Such a layer is not a tar: it is kept as a one-file layer, `layers/sha256/<blob hex>/diff/
//! module.wasm`, keyed by the blob digest (its "diff_id"), so records, `rmi` and garbage
//! collection treat it like any layer. The record's platform is `wasi/wasm`.
use super::digest::Digest;
use super::import::{BlobOpener, Resolved};
use super::manifest::ImageManifest;
use super::platform::Platform;
use super::store::{LayerMeta, LayerRef, Store};
use super::{Error, ImageRecord, Result};
use crate::wasm::{is_wasm_layer_media_type, WASM_CONFIG_MEDIA_TYPE};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

/// File name of the module inside an artifact layer's directory.
pub const MODULE_FILE: &str = "module.wasm";

/// Whether a manifest is a Wasm artifact (rather than an image of tar layers).
pub fn is_artifact(manifest: &ImageManifest) -> bool {
    manifest.config.media_type == WASM_CONFIG_MEDIA_TYPE
        || manifest
            .layers
            .iter()
            .any(|l| is_wasm_layer_media_type(&l.media_type))
}

/// The module file of a stored Wasm artifact, or `None` if `record` is not one.
pub fn artifact_module(store: &Store, record: &ImageRecord) -> Result<Option<PathBuf>> {
    let Some(layer) = record
        .layers
        .iter()
        .find(|l| is_wasm_layer_media_type(&l.media_type))
    else {
        return Ok(None);
    };
    let store_err = |message: String| Error::Store {
        path: store.root().to_path_buf(),
        message,
    };
    let d = Digest::parse(&layer.diff_id).map_err(|e| store_err(e.to_string()))?;
    if !store.has_layer(&d) {
        return Err(store_err(format!(
            "Wasm layer {d} of {} is missing",
            record.id
        )));
    }
    Ok(Some(store.layer_dir(&d).join(MODULE_FILE)))
}

/// `{"os": .., "architecture": ..}` of a config, when it has them.
#[derive(serde::Deserialize, Default)]
struct PlatformProbe {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

/// Stores a Wasm artifact: fetches and verifies its Wasm layer (exactly one), then records it.
/// `opener` is blocking: call from a blocking thread.
pub(crate) fn import_artifact(
    store: &Store,
    r: Resolved,
    opener: Arc<dyn BlobOpener>,
) -> Result<ImageRecord> {
    let bad = |m: String| Error::Manifest {
        image: r.image.clone(),
        message: m,
    };
    let got = Digest::of(&r.config_bytes);
    if got.as_str() != r.manifest.config.digest {
        return Err(Error::Blob {
            image: r.image.clone(),
            digest: r.manifest.config.digest.clone(),
            message: format!("config digest mismatch: content is {got}"),
        });
    }
    let wasm_layers: Vec<_> = r
        .manifest
        .layers
        .iter()
        .filter(|l| is_wasm_layer_media_type(&l.media_type))
        .collect();
    let layer = match wasm_layers.as_slice() {
        [one] => *one,
        [] => {
            return Err(bad(format!(
                "a Wasm artifact (config {}) without a Wasm layer ({})",
                r.manifest.config.media_type,
                crate::wasm::WASM_LAYER_MEDIA_TYPES.join(", ")
            )))
        }
        _ => {
            return Err(bad(format!(
                "a Wasm artifact with {} Wasm layers: caisson runs single-module artifacts",
                wasm_layers.len()
            )))
        }
    };
    let digest = Digest::parse(&layer.digest).map_err(|e| bad(e.to_string()))?;
    if !store.has_layer(&digest) {
        let mut bytes = Vec::with_capacity(layer.size as usize);
        opener
            .open(layer)?
            .take(layer.size.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| Error::Blob {
                image: r.image.clone(),
                digest: layer.digest.clone(),
                message: e.to_string(),
            })?;
        let got = Digest::of(&bytes);
        if got != digest {
            return Err(Error::Blob {
                image: r.image.clone(),
                digest: layer.digest.clone(),
                message: format!("digest mismatch: content is {got}"),
            });
        }
        if crate::wasm::sniff(&bytes).is_none() {
            return Err(Error::Blob {
                image: r.image.clone(),
                digest: layer.digest.clone(),
                message: format!(
                    "the {} layer is not a Wasm module (no Wasm magic number)",
                    layer.media_type
                ),
            });
        }
        let work = store.work()?;
        let diff = work.path.join("diff");
        let write = std::fs::create_dir_all(&diff)
            .and_then(|()| std::fs::write(diff.join(MODULE_FILE), &bytes));
        write.map_err(|e| Error::Store {
            path: diff.clone(),
            message: e.to_string(),
        })?;
        store.commit_layer(
            work,
            &LayerMeta {
                diff_id: digest.to_string(),
                size: bytes.len() as u64,
                entries: 1,
                digest: Some(digest.to_string()),
            },
        )?;
    }
    let probe: PlatformProbe = serde_json::from_slice(&r.config_bytes).unwrap_or_default();
    // The CNCF layout says `wasip1`/`wasip2` for os; record it as the `wasi/wasm` platform.
    let platform = Platform {
        os: if probe.os.is_empty() || probe.os.starts_with("wasi") {
            "wasi".into()
        } else {
            probe.os
        },
        architecture: if probe.architecture.is_empty() {
            "wasm".into()
        } else {
            probe.architecture
        },
        variant: None,
    };
    let manifest_digest = store.put_blob(&r.manifest_bytes)?;
    let id = store.put_blob(&r.config_bytes)?;
    let record = ImageRecord {
        id: id.to_string(),
        manifest_digest: manifest_digest.to_string(),
        manifest_media_type: r.manifest.media_type.clone(),
        repo_digests: r.repo_digest.clone().into_iter().collect(),
        platform,
        layers: vec![LayerRef {
            diff_id: digest.to_string(),
            digest: Some(digest.to_string()),
            media_type: layer.media_type.clone(),
            size: layer.size,
        }],
        size: layer.size,
        created: None,
        stored_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    store.put_image(&record, &r.tags)?;
    store.record(&id)
}
