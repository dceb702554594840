//! Local sources for `caisson load -i PATH`: `docker save` / docker-archive tarballs,
//! oci-archive tarballs and OCI layout directories (`DIR[:tag]`), plain or compressed.
//!
//! Tarballs are not extracted: one pass records where each member lies, and blobs are then
//! read in place (a compressed tarball is first decompressed into the store's work area).
use super::digest::Digest;
use super::import::{self, BlobOpener, LayerProgress, PullOptions, Resolved};
use super::manifest::{self, Descriptor, ImageManifest, Index, Parsed};
use super::platform::Platform;
use super::reference::ImageRef;
use super::store::{ImageRecord, Store, Work};
use super::unpack::Compression;
use super::{Error, IoContext, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bound on the small JSON files we read whole (manifests, configs, index.json).
const MAX_JSON: u64 = 16 << 20;

/// The files of a layout or archive, by their path inside it.
enum Files {
    Dir(PathBuf),
    Tar {
        file: Arc<File>,
        members: HashMap<String, (u64, u64)>,
        _decompressed: Option<Work>,
    },
}

struct Slice {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive member is truncated",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn clean_member_name(name: &str) -> String {
    let n = name.trim_start_matches("./");
    n.trim_end_matches('/').to_string()
}

impl Files {
    fn open(&self, name: &str) -> io::Result<Box<dyn Read + Send>> {
        match self {
            Files::Dir(root) => {
                let f = File::open(root.join(name))?;
                Ok(Box::new(f))
            }
            Files::Tar { file, members, .. } => {
                let (pos, size) = members.get(&clean_member_name(name)).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("no member {name:?}"))
                })?;
                Ok(Box::new(Slice {
                    file: file.clone(),
                    pos: *pos,
                    end: pos + size,
                }))
            }
        }
    }

    fn exists(&self, name: &str) -> bool {
        match self {
            Files::Dir(root) => root.join(name).is_file(),
            Files::Tar { members, .. } => members.contains_key(&clean_member_name(name)),
        }
    }

    fn read_small(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.open(name)?.take(MAX_JSON + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > MAX_JSON {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is larger than {MAX_JSON} bytes"),
            ));
        }
        Ok(buf)
    }

    /// Indexes a tar file's regular members (links resolve to their targets).
    fn index_tar(file: File) -> io::Result<HashMap<String, (u64, u64)>> {
        let mut archive = tar::Archive::new(&file);
        let mut members = HashMap::new();
        let mut links = Vec::new();
        for entry in archive.entries()? {
            let entry = entry?;
            let name = clean_member_name(&entry.path()?.to_string_lossy());
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    members.insert(name, (entry.raw_file_position(), entry.size()));
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Some(target) = entry.link_name()? {
                        let target = target.to_string_lossy().into_owned();
                        // Symlinks are relative to the link's directory; hard links to the root.
                        let resolved = if entry.header().entry_type() == tar::EntryType::Symlink {
                            let dir = Path::new(&name).parent().unwrap_or(Path::new(""));
                            normalize(&dir.join(&target))
                        } else {
                            clean_member_name(&target)
                        };
                        links.push((name, resolved));
                    }
                }
                _ => {}
            }
        }
        for (name, target) in links {
            if let Some(v) = members.get(&target).copied() {
                members.insert(name, v);
            }
        }
        Ok(members)
    }
}

/// Lexically normalizes `a/b/../c` (archive member paths never leave the archive).
fn normalize(p: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    out.join("/")
}

struct FileBlobs {
    files: Arc<Files>,
    path: PathBuf,
    /// Layer descriptor digest -> member name (docker-archive layers are named by path).
    names: HashMap<String, String>,
}

impl BlobOpener for FileBlobs {
    fn open(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        let name = self
            .names
            .get(&desc.digest)
            .cloned()
            .unwrap_or_else(|| blob_name(&desc.digest));
        self.files.open(&name).map_err(|e| Error::Archive {
            path: self.path.clone(),
            message: format!("opening layer {}: {e}", desc.digest),
        })
    }
}

fn blob_name(digest: &str) -> String {
    // Digests are validated before use, so this never escapes the layout.
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// Splits `DIR:tag` when DIR is an existing directory and PATH itself is not.
fn split_path(input: &str) -> (PathBuf, Option<String>) {
    let p = PathBuf::from(input);
    if p.exists() {
        return (p, None);
    }
    if let Some((dir, tag)) = input.rsplit_once(':') {
        if Path::new(dir).is_dir() && !tag.is_empty() && !tag.contains('/') {
            return (PathBuf::from(dir), Some(tag.to_string()));
        }
    }
    (p, None)
}

/// Loads every image in `input` into the store.
pub async fn load(
    store: &Store,
    input: &str,
    opts: &PullOptions,
    progress: Arc<dyn LayerProgress>,
) -> Result<Vec<ImageRecord>> {
    let _guard = store.pull_guard()?;
    let (path, tag) = split_path(input);
    let arch_err = |message: String| Error::Archive {
        path: path.clone(),
        message,
    };
    let meta = std::fs::metadata(&path).map_err(|e| arch_err(format!("cannot read: {e}")))?;
    let files = if meta.is_dir() {
        Files::Dir(path.clone())
    } else {
        let st = store.clone();
        let p = path.clone();
        tokio::task::spawn_blocking(move || open_tarball(&st, &p))
            .await
            .expect("indexing task panicked")?
    };
    let files = Arc::new(files);
    if files.exists("manifest.json") {
        load_docker_archive(store, &path, files, opts, progress).await
    } else if files.exists("index.json") {
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        load_oci(store, &path, &base, files, tag.as_deref(), opts, progress).await
    } else {
        Err(arch_err(
            "neither a docker archive (manifest.json) nor an OCI layout (index.json)".into(),
        ))
    }
}

fn open_tarball(store: &Store, path: &Path) -> Result<Files> {
    let arch_err = |message: String| Error::Archive {
        path: path.to_path_buf(),
        message,
    };
    let mut f = File::open(path).map_err(|e| arch_err(format!("cannot open: {e}")))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| arch_err(e.to_string()))?;
    let compression = Compression::detect(&magic[..n]);
    let (file, work) = match compression {
        Compression::None => (File::open(path).map_err(|e| arch_err(e.to_string()))?, None),
        c => {
            let work = store.work()?;
            let out = work.path.join("archive.tar");
            let src = File::open(path).map_err(|e| arch_err(e.to_string()))?;
            let mut dec: Box<dyn Read> = match c {
                Compression::Gzip => {
                    Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(src)))
                }
                _ => Box::new(zstd::Decoder::new(src).map_err(|e| arch_err(e.to_string()))?),
            };
            let mut w = File::create(&out).ctx(|| format!("creating {}", out.display()))?;
            io::copy(&mut dec, &mut w).map_err(|e| arch_err(format!("decompressing: {e}")))?;
            (
                File::open(&out).ctx(|| out.display().to_string())?,
                Some(work),
            )
        }
    };
    let members = Files::index_tar(file.try_clone().ctx(|| path.display().to_string())?)
        .map_err(|e| arch_err(format!("not a valid tar archive: {e}")))?;
    Ok(Files::Tar {
        file: Arc::new(file),
        members,
        _decompressed: work,
    })
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

async fn load_docker_archive(
    store: &Store,
    path: &Path,
    files: Arc<Files>,
    opts: &PullOptions,
    progress: Arc<dyn LayerProgress>,
) -> Result<Vec<ImageRecord>> {
    let arch_err = |message: String| Error::Archive {
        path: path.to_path_buf(),
        message,
    };
    let raw = files
        .read_small("manifest.json")
        .map_err(|e| arch_err(format!("manifest.json: {e}")))?;
    let entries: Vec<DockerArchiveEntry> =
        serde_json::from_slice(&raw).map_err(|e| arch_err(format!("manifest.json: {e}")))?;
    if entries.is_empty() {
        return Err(arch_err("manifest.json lists no image".into()));
    }
    let mut out = Vec::new();
    for entry in entries {
        let config_bytes = files
            .read_small(&entry.config)
            .map_err(|e| arch_err(format!("config {}: {e}", entry.config)))?;
        let config_digest = Digest::of(&config_bytes);
        #[derive(serde::Deserialize)]
        struct Probe {
            rootfs: Rootfs,
        }
        #[derive(serde::Deserialize)]
        struct Rootfs {
            diff_ids: Vec<String>,
        }
        let probe: Probe = serde_json::from_slice(&config_bytes)
            .map_err(|e| arch_err(format!("config {}: {e}", entry.config)))?;
        if probe.rootfs.diff_ids.len() != entry.layers.len() {
            return Err(arch_err(format!(
                "manifest.json lists {} layers but the config has {} diff_ids",
                entry.layers.len(),
                probe.rootfs.diff_ids.len()
            )));
        }
        let mut names = HashMap::new();
        let mut layers = Vec::new();
        for (name, diff_id) in entry.layers.iter().zip(&probe.rootfs.diff_ids) {
            Digest::parse(diff_id).map_err(|e| arch_err(format!("config diff_id: {e}")))?;
            if !files.exists(name) {
                return Err(arch_err(format!(
                    "layer {name} is missing from the archive"
                )));
            }
            names.insert(diff_id.clone(), name.clone());
            layers.push(Descriptor {
                media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
                digest: diff_id.clone(),
                size: 0,
                platform: None,
                urls: vec![],
                annotations: HashMap::new(),
            });
        }
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: manifest::DOCKER_MANIFEST.into(),
            config: Descriptor {
                media_type: manifest::DOCKER_CONFIG.into(),
                digest: config_digest.to_string(),
                size: config_bytes.len() as u64,
                platform: None,
                urls: vec![],
                annotations: HashMap::new(),
            },
            layers,
            annotations: HashMap::new(),
        };
        let tags = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| {
                ImageRef::parse(t)
                    .ok()
                    .and_then(|r| r.tagged_name())
                    .ok_or_else(|| arch_err(format!("bad RepoTag {t:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let image = tags
            .first()
            .cloned()
            .unwrap_or_else(|| format!("{}", path.display()));
        let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
        let resolved = Resolved {
            image,
            manifest_bytes,
            manifest,
            config_bytes,
            repo_digest: None,
            tags,
            blob_digests_known: false,
        };
        let opener = Arc::new(FileBlobs {
            files: files.clone(),
            path: path.to_path_buf(),
            names,
        });
        out.push(import::import(store, resolved, opener, opts, progress.clone()).await?);
    }
    Ok(out)
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The store name for an OCI layout entry: containerd's full-name annotation, a full
/// reference in `ref.name`, or `localhost/<base>:<ref.name>`.
fn oci_name(desc: &Descriptor, base: &str) -> Option<String> {
    if let Some(n) = desc.annotations.get(CONTAINERD_NAME) {
        if let Some(t) = ImageRef::parse(n).ok().and_then(|r| r.tagged_name()) {
            return Some(t);
        }
    }
    let tag = desc
        .annotations
        .get(REF_NAME)
        .map(String::as_str)
        .unwrap_or("latest");
    if tag.contains('/') {
        if let Some(t) = ImageRef::parse(tag).ok().and_then(|r| r.tagged_name()) {
            return Some(t);
        }
    }
    let base: String = base
        .trim_end_matches(".tar")
        .trim_end_matches(".tar.gz")
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    ImageRef::parse(&format!("localhost/{base}:{tag}"))
        .ok()
        .and_then(|r| r.tagged_name())
}

async fn load_oci(
    store: &Store,
    path: &Path,
    base: &str,
    files: Arc<Files>,
    tag: Option<&str>,
    opts: &PullOptions,
    progress: Arc<dyn LayerProgress>,
) -> Result<Vec<ImageRecord>> {
    let arch_err = |message: String| Error::Archive {
        path: path.to_path_buf(),
        message,
    };
    let raw = files
        .read_small("index.json")
        .map_err(|e| arch_err(format!("index.json: {e}")))?;
    let index: Index = match manifest::parse(&raw, Some(manifest::OCI_INDEX))
        .map_err(|e| arch_err(format!("index.json: {e}")))?
    {
        Parsed::Index(i) => i,
        Parsed::Image(_) => return Err(arch_err("index.json is not an index".into())),
    };
    let chosen: Vec<&Descriptor> = match tag {
        Some(t) => {
            let found: Vec<&Descriptor> = index
                .manifests
                .iter()
                .filter(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
                .collect();
            if found.is_empty() {
                return Err(arch_err(format!("no image tagged {t:?} in the layout")));
            }
            found
        }
        None => index.manifests.iter().collect(),
    };
    if chosen.is_empty() {
        return Err(arch_err("index.json lists no image".into()));
    }
    let mut out = Vec::new();
    for desc in chosen {
        let name = oci_name(desc, base);
        let image = name.clone().unwrap_or_else(|| path.display().to_string());
        let (manifest_bytes, manifest) =
            resolve_oci_manifest(&files, desc, opts, &image).map_err(|e| match e {
                Error::Io { context, source } => arch_err(format!("{context}: {source}")),
                other => other,
            })?;
        let config_bytes = read_blob(&files, &manifest.config).map_err(&arch_err)?;
        let resolved = Resolved {
            image,
            manifest_bytes,
            manifest,
            config_bytes,
            repo_digest: None,
            tags: name.into_iter().collect(),
            blob_digests_known: true,
        };
        let opener = Arc::new(FileBlobs {
            files: files.clone(),
            path: path.to_path_buf(),
            names: HashMap::new(),
        });
        out.push(import::import(store, resolved, opener, opts, progress.clone()).await?);
    }
    Ok(out)
}

fn read_blob(files: &Files, desc: &Descriptor) -> std::result::Result<Vec<u8>, String> {
    let d = desc.digest()?;
    let bytes = files
        .read_small(&blob_name(d.as_str()))
        .map_err(|e| format!("blob {d}: {e}"))?;
    if Digest::of(&bytes) != d {
        return Err(format!("blob {d}: digest mismatch"));
    }
    Ok(bytes)
}

/// Follows an index entry to an image manifest, choosing the platform from nested indexes.
fn resolve_oci_manifest(
    files: &Files,
    desc: &Descriptor,
    opts: &PullOptions,
    image: &str,
) -> Result<(Vec<u8>, ImageManifest)> {
    let bad = |message: String| Error::Manifest {
        image: image.to_string(),
        message,
    };
    let mut desc = desc.clone();
    for _ in 0..4 {
        let bytes = read_blob(files, &desc).map_err(bad)?;
        let media = (!desc.media_type.is_empty()).then_some(desc.media_type.as_str());
        match manifest::parse(&bytes, media).map_err(bad)? {
            Parsed::Image(m) => {
                m.validate().map_err(bad)?;
                return Ok((bytes, m));
            }
            Parsed::Index(i) => {
                let wanted = opts.platform.clone().unwrap_or_else(Platform::host);
                desc = i
                    .select(&wanted)
                    .map_err(|available| Error::NoMatchingPlatform {
                        image: image.to_string(),
                        wanted: wanted.to_string(),
                        available,
                    })?
                    .clone();
            }
        }
    }
    Err(bad("indexes nested too deeply".into()))
}
