//! Manifests: OCI image manifest and index, Docker v2 schema 2 and manifest list.
//! Schema 1 and unknown media types are refused with a clear message.
use super::digest::Digest;
use super::platform::Platform;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What we send as `Accept`: everything we understand, plus schema 1 so that a registry
/// holding only schema 1 tells us so (and we can say why we refuse) instead of a bare 404.
pub const ACCEPTED: &[&str] = &[
    OCI_INDEX,
    DOCKER_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1_SIGNED,
    DOCKER_SCHEMA1,
];

/// Layer media types we can unpack (compression is detected from the bytes anyway).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

impl Descriptor {
    pub fn digest(&self) -> Result<Digest, String> {
        Digest::parse(&self.digest)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone)]
// Short-lived parse result: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    Image(ImageManifest),
    Index(Index),
}

/// Parses a manifest by its declared media type (from the body, else the transport's
/// `content_type`, else its shape).
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        schema_version: Option<u32>,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        layers: Option<serde_json::Value>,
        #[serde(default)]
        fs_layers: Option<serde_json::Value>,
    }
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
    let media_type = probe
        .media_type
        .clone()
        .or_else(|| content_type.map(|c| c.split(';').next().unwrap_or(c).trim().to_string()))
        .filter(|m| !m.is_empty() && m != "application/json")
        .unwrap_or_else(|| {
            if probe.schema_version == Some(1) || probe.fs_layers.is_some() {
                DOCKER_SCHEMA1.into()
            } else if probe.manifests.is_some() {
                OCI_INDEX.into()
            } else if probe.layers.is_some() {
                OCI_MANIFEST.into()
            } else {
                String::new()
            }
        });
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let mut m: ImageManifest = serde_json::from_slice(bytes)
                .map_err(|e| format!("malformed {media_type} manifest: {e}"))?;
            m.media_type = media_type;
            Ok(Parsed::Image(m))
        }
        OCI_INDEX | DOCKER_LIST => {
            let mut i: Index = serde_json::from_slice(bytes)
                .map_err(|e| format!("malformed {media_type} index: {e}"))?;
            i.media_type = media_type;
            Ok(Parsed::Index(i))
        }
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => Err(
            "Docker image manifest schema 1 is deprecated and not supported; push the image again with a current tool (schema 2 or OCI)"
                .into(),
        ),
        "" => Err("manifest has no media type and an unknown shape".into()),
        other => Err(format!("unsupported manifest media type {other:?}")),
    }
}

impl ImageManifest {
    /// Checks what we need before fetching anything: known layer types, no foreign layers,
    /// valid digests.
    pub fn validate(&self) -> Result<(), String> {
        self.config.digest()?;
        if super::wasm::is_artifact(self) {
            // Checked when it is stored (`image::wasm`): one Wasm layer, the module.
            return self.layers.iter().try_for_each(|l| l.digest().map(drop));
        }
        if !self.config.media_type.is_empty()
            && self.config.media_type != OCI_CONFIG
            && self.config.media_type != DOCKER_CONFIG
        {
            return Err(format!(
                "unsupported config media type {:?} (not a container image)",
                self.config.media_type
            ));
        }
        for l in &self.layers {
            l.digest()?;
            if !l.urls.is_empty() {
                return Err(format!(
                    "layer {} is a foreign layer (urls {:?}); not supported",
                    l.digest, l.urls
                ));
            }
            if !l.media_type.is_empty() && !LAYER_TYPES.contains(&l.media_type.as_str()) {
                return Err(format!(
                    "layer {} has unsupported media type {:?}",
                    l.digest, l.media_type
                ));
            }
        }
        Ok(())
    }
}

impl Index {
    /// The manifest for `wanted`, or the list of what the index offers.
    pub fn select(&self, wanted: &Platform) -> Result<&Descriptor, String> {
        let images = || {
            self.manifests
                .iter()
                .filter(|d| d.media_type != OCI_INDEX && d.media_type != DOCKER_LIST)
        };
        // An exact variant match beats a variant-less acceptance.
        let exact = images().find(|d| d.platform.as_ref() == Some(wanted));
        if let Some(d) = exact
            .or_else(|| images().find(|d| d.platform.as_ref().is_some_and(|p| wanted.accepts(p))))
        {
            return Ok(d);
        }
        let available: Vec<String> = images()
            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
            .collect();
        Err(if available.is_empty() {
            "none".into()
        } else {
            available.join(", ")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(p: &str) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::of(p.as_bytes()).to_string(),
            size: 1,
            platform: Some(Platform::parse(p).unwrap()),
            urls: vec![],
            annotations: HashMap::new(),
        }
    }

    #[test]
    fn media_types() {
        let schema1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(parse(schema1, None).unwrap_err().contains("schema 1"));
        let unknown = br#"{"schemaVersion":2,"mediaType":"application/x-foo","layers":[]}"#;
        assert!(parse(unknown, None)
            .unwrap_err()
            .contains("application/x-foo"));
        let idx = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(parse(idx, None).unwrap(), Parsed::Index(_)));
        assert!(parse(b"not json", None).is_err());
    }

    #[test]
    fn platform_selection() {
        let idx = Index {
            schema_version: 2,
            media_type: OCI_INDEX.into(),
            manifests: vec![
                desc("linux/arm/v7"),
                desc("linux/amd64"),
                desc("linux/arm64/v8"),
            ],
        };
        let p = |s| Platform::parse(s).unwrap();
        assert_eq!(idx.select(&p("linux/amd64")).unwrap(), &idx.manifests[1]);
        assert_eq!(idx.select(&p("linux/arm64")).unwrap(), &idx.manifests[2]);
        assert_eq!(idx.select(&p("linux/arm")).unwrap(), &idx.manifests[0]);
        let err = idx.select(&p("linux/s390x")).unwrap_err();
        assert!(
            err.contains("linux/amd64") && err.contains("linux/arm/v7"),
            "{err}"
        );
    }
}
