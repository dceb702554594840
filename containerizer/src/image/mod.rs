//! Images: references, registry pulls, local archives, the content-addressed store, layer unpack
//! and root filesystems.
//!
//! The flow is the same for every source: resolve a manifest (choosing a platform from an index),
//! fetch and verify the config, then fetch, verify and unpack each missing layer into the store
//! (concurrently, streaming), and only then make the image visible with a record and a tag.
pub mod archive;
pub mod auth;
pub mod digest;
mod import;
pub mod manifest;
pub mod platform;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod store;
pub mod unpack;
pub mod wasm;

pub use import::{LayerProgress, NoProgress, PullOptions};
pub use platform::Platform;
pub use reference::ImageRef;
pub use store::{ImageRecord, LayerRef, Store};

use std::path::PathBuf;

/// Everything that can go wrong while getting an image onto the host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("invalid platform {0:?}: expected os/arch[/variant]")]
    Platform(String),
    #[error("{image}: {message}")]
    Registry { image: String, message: String },
    #[error("{image}: authentication required or refused by {registry}: {message}")]
    Unauthorized {
        image: String,
        registry: String,
        message: String,
    },
    #[error("{image}: not found: {message}")]
    NotFound { image: String, message: String },
    #[error("{image}: {message}")]
    Manifest { image: String, message: String },
    #[error("{image}: no manifest for platform {wanted} (the image offers: {available})")]
    NoMatchingPlatform {
        image: String,
        wanted: String,
        available: String,
    },
    #[error("{image}: blob {digest}: {message}")]
    Blob {
        image: String,
        digest: String,
        message: String,
    },
    #[error("{image}: layer {digest}: {source}")]
    Layer {
        image: String,
        digest: String,
        #[source]
        source: Box<unpack::UnpackError>,
    },
    #[error("{path}: {message}")]
    Archive { path: PathBuf, message: String },
    #[error("image not known: {0}")]
    ImageNotKnown(String),
    #[error("image {image} is in use by container(s): {containers}")]
    ImageInUse { image: String, containers: String },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a human context to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
