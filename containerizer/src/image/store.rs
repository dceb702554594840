//! The content-addressed store under `--root`:
//!
//! ```text
//! blobs/sha256/<hex>          manifests, indexes and configs, as fetched
//! layers/sha256/<diff-hex>/   one unpacked layer (`diff/`, overlay-ready) + `layer.json`
//! images/<config-hex>.json    one record per image (id = config digest)
//! tags.json                   name:tag -> image id
//! tmp/<work>/ + <work>.lock   in-flight work, flock-ed by its owner; stale ones are removed
//! locks/                      meta.lock (short metadata updates), gc.lock (pulls share, GC excludes)
//! rootfs/<id>/                containers' root filesystems; `image-id` marks the image in use
//! ```
//! Layers are keyed by diff_id, so images share them and a layer is fetched and unpacked once.
//! Everything becomes visible by a rename, in the order layers, blobs, record, tag: a pull killed
//! at any point leaves only unreferenced or temporary files, cleaned on the next open.
use super::digest::Digest;
use super::platform::Platform;
use super::reference::ImageRef;
use super::{Error, IoContext, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Per-image init layers (`<root>/init-layers/<image id hex>`): the mount points every task
/// root needs, on top of the image's layers (as docker's `-init` layer), so that no launch
/// creates (and copies up) them in its overlay and no removal deletes them again.
pub const INIT_LAYERS: &str = "init-layers";
/// Directories of an init layer (parents first); `mnt/sandbox` is the task's sandbox
/// (`launch::SANDBOX_TARGET`).
pub const INIT_DIRS: &[&str] = &["proc", "dev", "sys", "etc", "mnt", "mnt/sandbox"];
/// Files of an init layer: the targets of a task's /etc bind mounts.
pub const INIT_FILES: &[&str] = &["etc/hostname", "etc/hosts", "etc/resolv.conf"];

pub const DEFAULT_ROOT: &str = "/var/lib/caisson";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerRef {
    /// Digest of the uncompressed tar (the store key).
    pub diff_id: String,
    /// Digest of the blob as distributed (compressed), when the source had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default)]
    pub media_type: String,
    /// Size of the blob as distributed.
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// The config digest, as docker and podman name images.
    pub id: String,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// `name@digest` for each repository the image came from.
    #[serde(default)]
    pub repo_digests: Vec<String>,
    pub platform: Platform,
    pub layers: Vec<LayerRef>,
    /// Unpacked size (sum of the layers' uncompressed tar sizes).
    pub size: u64,
    #[serde(default)]
    pub created: Option<String>,
    /// When it arrived in this store (seconds since the epoch).
    pub stored_at: u64,
}

/// What the unpacker recorded about a layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMeta {
    pub diff_id: String,
    pub size: u64,
    pub entries: u64,
    #[serde(default)]
    pub digest: Option<String>,
}

/// A temporary work directory in `tmp/`, locked by this process and removed on drop unless
/// its content was committed (renamed away).
pub struct Work {
    pub path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = remove_tree(&self.path);
        let _ = fs::remove_file(&self.lock_path);
    }
}

#[derive(Debug, Default, Serialize)]
pub struct RemoveReport {
    pub untagged: Vec<String>,
    pub deleted_images: Vec<String>,
    pub deleted_layers: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store at `root` and removes stale work left by killed
    /// processes.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        // Once per process and root: a command may open its store several times (`run` looks
        // for a Wasm image, then prepares a native root), and the directories and the sweep of
        // `tmp/` are what the first open is for.
        static OPENED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
        let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
        if opened.contains(&root) {
            return Ok(Store { root });
        }
        for d in ["blobs/sha256", "layers/sha256", "images", "tmp", "locks"] {
            let p = root.join(d);
            fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        crate::launch::state::prepare_state_dirs(&root)
            .ctx(|| format!("creating {}", root.join("containers").display()))?;
        let store = Store { root };
        store.clean_tmp()?;
        opened.push(store.root.clone());
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn store_err(&self, message: impl Into<String>) -> Error {
        Error::Store {
            path: self.root.clone(),
            message: message.into(),
        }
    }

    fn lock(&self, name: &str, arg: FlockArg) -> Result<Flock<File>> {
        let path = self.root.join("locks").join(name);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        Flock::lock(f, arg).map_err(|(_, e)| self.store_err(format!("locking {name}: {e}")))
    }

    /// Held (shared) by pulls for their whole duration, so GC cannot delete a layer that a
    /// pull found present and is about to reference.
    pub fn pull_guard(&self) -> Result<Flock<File>> {
        self.lock("gc.lock", FlockArg::LockShared)
    }

    fn meta_lock(&self) -> Result<Flock<File>> {
        self.lock("meta.lock", FlockArg::LockExclusive)
    }

    fn clean_tmp(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        let entries = fs::read_dir(&tmp).ctx(|| format!("reading {}", tmp.display()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".lock") else {
                // A work dir is created after its lock file and removed before it: a dir
                // without a lock file is debris.
                if !tmp.join(format!("{name}.lock")).exists() {
                    let _ = remove_tree(&e.path());
                }
                continue;
            };
            if let Ok(f) = File::open(e.path()) {
                if let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                    tracing::debug!(work = stem, "removing stale work from a killed process");
                    let _ = remove_tree(&tmp.join(stem));
                    let _ = fs::remove_file(e.path());
                    drop(lock);
                }
            }
        }
        Ok(())
    }

    /// A fresh, locked work directory in `tmp/`.
    pub fn work(&self) -> Result<Work> {
        let name = format!("{:016x}", rand::random::<u64>());
        let tmp = self.root.join("tmp");
        let lock_path = tmp.join(format!("{name}.lock"));
        let f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&lock_path)
            .ctx(|| format!("creating {}", lock_path.display()))?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| self.store_err(format!("locking work dir: {e}")))?;
        let path = tmp.join(&name);
        fs::create_dir(&path).ctx(|| format!("creating {}", path.display()))?;
        Ok(Work {
            path,
            lock_path,
            _lock: lock,
        })
    }

    /// Writes a file atomically (work file + fsync + rename).
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{:016x}.file", rand::random::<u64>()));
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, dest)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.ctx(|| format!("writing {}", dest.display()))
    }

    /// Writes back everything not yet on disk in the store's filesystem.
    fn sync_fs(&self) -> std::io::Result<()> {
        let dir = File::open(&self.root)?;
        nix::unistd::syncfs(&dir).map_err(std::io::Error::from)
    }

    // ---- blobs ----

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        let path = self.blob_path(&d);
        if !path.exists() {
            self.write_atomic(&path, bytes)?;
        }
        Ok(d)
    }

    pub fn blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(d);
        let bytes = fs::read(&path).ctx(|| format!("reading blob {d}"))?;
        if Digest::of(&bytes) != *d {
            return Err(self.store_err(format!("blob {d} is corrupt (digest mismatch)")));
        }
        Ok(bytes)
    }

    // ---- layers ----

    fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(diff_id.hex())
    }

    /// The unpacked tree of a layer (an overlay lower dir).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.layer_path(diff_id).join("diff")
    }

    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_path(diff_id).join("layer.json").exists()
    }

    /// Moves an unpacked, verified layer (`work/diff`) into place, its content on disk first: a
    /// layer in place is trusted by every later pull that has it, so a host crash must not leave
    /// one whose files are empty or short (the page cache writes them back up to 30 s later).
    /// One `syncfs` per layer, as containerd's `image_pull_with_sync_fs`: a layer has
    /// thousands of files, one `fsync` each would flush the disk's cache thousands of times.
    /// Losing a race with another pull of the same layer is fine: theirs is identical.
    pub fn commit_layer(&self, work: Work, meta: &LayerMeta) -> Result<()> {
        let diff_id = Digest::parse(&meta.diff_id).map_err(|e| self.store_err(e))?;
        let json = serde_json::to_vec_pretty(meta).expect("layer meta serializes");
        fs::write(work.path.join("layer.json"), json)
            .ctx(|| format!("writing layer meta in {}", work.path.display()))?;
        self.sync_fs()
            .ctx(|| format!("flushing layer {diff_id} to disk"))?;
        let dest = self.layer_path(&diff_id);
        match fs::rename(&work.path, &dest) {
            Ok(()) => Ok(()),
            Err(_) if self.has_layer(&diff_id) => Ok(()),
            Err(e) => Err(e).ctx(|| format!("moving layer into {}", dest.display())),
        }
    }

    // ---- images ----

    fn record_path(&self, id: &Digest) -> PathBuf {
        self.root.join("images").join(format!("{}.json", id.hex()))
    }

    fn read_tags(&self) -> Result<BTreeMap<String, String>> {
        let path = self.root.join("tags.json");
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| self.store_err(format!("tags.json is corrupt: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).ctx(|| format!("reading {}", path.display())),
        }
    }

    fn write_tags(&self, tags: &BTreeMap<String, String>) -> Result<()> {
        let json = serde_json::to_vec_pretty(tags).expect("tags serialize");
        self.write_atomic(&self.root.join("tags.json"), &json)
    }

    /// Records an image whose layers and blobs are all in place, then points `tags` at it.
    pub fn put_image(&self, record: &ImageRecord, tags: &[String]) -> Result<()> {
        let id = Digest::parse(&record.id).map_err(|e| self.store_err(e))?;
        for l in &record.layers {
            let d = Digest::parse(&l.diff_id).map_err(|e| self.store_err(e))?;
            if !self.has_layer(&d) {
                return Err(self.store_err(format!("layer {d} missing while recording {id}")));
            }
        }
        // The renames that put the layers and blobs in place reach the disk before the record
        // that names them (the layers' content already has; little is left to write).
        self.sync_fs()
            .ctx(|| format!("flushing the layers of {id} to disk"))?;
        let _meta = self.meta_lock()?;
        let mut record = record.clone();
        if let Ok(old) = self.record(&id) {
            // Same image reached from another repository: keep both repo digests.
            for rd in old.repo_digests {
                if !record.repo_digests.contains(&rd) {
                    record.repo_digests.push(rd);
                }
            }
            record.stored_at = old.stored_at;
        }
        record.repo_digests.sort();
        let json = serde_json::to_vec_pretty(&record).expect("record serializes");
        self.write_atomic(&self.record_path(&id), &json)?;
        if !tags.is_empty() {
            let mut all = self.read_tags()?;
            for t in tags {
                all.insert(t.clone(), record.id.clone());
            }
            self.write_tags(&all)?;
        }
        Ok(())
    }

    pub fn record(&self, id: &Digest) -> Result<ImageRecord> {
        let path = self.record_path(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ImageNotKnown(id.to_string()))
            }
            Err(e) => return Err(e).ctx(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| self.store_err(format!("{} is corrupt: {e}", path.display())))
    }

    /// All images with their tags, newest first.
    pub fn images(&self) -> Result<Vec<(ImageRecord, Vec<String>)>> {
        let tags = self.read_tags()?;
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).ctx(|| format!("reading {}", dir.display()))? {
            let e = e.ctx(|| format!("reading {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(id) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            let rec = self.record(&id)?;
            let t = tags
                .iter()
                .filter(|(_, v)| **v == rec.id)
                .map(|(k, _)| k.clone())
                .collect();
            out.push((rec, t));
        }
        out.sort_by(|a, b| b.0.stored_at.cmp(&a.0.stored_at).then(a.0.id.cmp(&b.0.id)));
        Ok(out)
    }

    /// Finds an image by `name[:tag]`, `name@digest`, full id (`sha256:...`) or a unique id prefix.
    pub fn resolve(&self, s: &str) -> Result<ImageRecord> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: Vec<ImageRecord> = self
                .images()?
                .into_iter()
                .map(|(r, _)| r)
                .filter(|r| r.id[7..].starts_with(hex))
                .collect();
            match matches.len() {
                1 => return Ok(matches.into_iter().next().expect("one")),
                0 => {}
                _ => {
                    return Err(Error::ImageNotKnown(format!(
                        "{s} (ambiguous id prefix: {} images match)",
                        matches.len()
                    )))
                }
            }
        }
        if let Some(name) = super::reference::quick_tagged_name(s) {
            if let Some(id) = self.read_tags()?.get(&name) {
                return self.record(&Digest::parse(id).map_err(|e| self.store_err(e))?);
            }
        }
        let r = ImageRef::parse(s).map_err(|_| Error::ImageNotKnown(s.to_string()))?;
        if let Some(digest) = r.digest() {
            let want = format!("{}@{digest}", r.name());
            return self
                .images()?
                .into_iter()
                .map(|(rec, _)| rec)
                .find(|rec| rec.repo_digests.contains(&want))
                .ok_or_else(|| Error::ImageNotKnown(s.to_string()));
        }
        let name = r.tagged_name().expect("no digest means a tag");
        let tags = self.read_tags()?;
        let id = tags
            .get(&name)
            .ok_or_else(|| Error::ImageNotKnown(s.to_string()))?;
        self.record(&Digest::parse(id).map_err(|e| self.store_err(e))?)
    }

    /// The image's config (OCI image configuration JSON).
    pub fn config(&self, record: &ImageRecord) -> Result<oci_spec::image::ImageConfiguration> {
        let d = Digest::parse(&record.id).map_err(|e| self.store_err(e))?;
        let bytes = self.blob(&d)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| self.store_err(format!("config {d} does not parse: {e}")))
    }

    /// The image's unpacked layer dirs, bottom layer first.
    pub fn layer_dirs(&self, record: &ImageRecord) -> Result<Vec<PathBuf>> {
        record
            .layers
            .iter()
            .map(|l| {
                let d = Digest::parse(&l.diff_id).map_err(|e| self.store_err(e))?;
                if !self.has_layer(&d) {
                    return Err(self.store_err(format!("layer {d} of {} is missing", record.id)));
                }
                Ok(self.layer_dir(&d))
            })
            .collect()
    }

    /// Builds a container's root filesystem from `record` in `container_dir` (an existing empty
    /// dir, normally `rootfs/<id>/`), and marks the image as in use by it.
    pub fn create_rootfs(
        &self,
        record: &ImageRecord,
        container_dir: &Path,
        backend: super::rootfs::Backend,
        opts: &super::rootfs::CreateOptions,
    ) -> Result<super::rootfs::Rootfs> {
        let mut lowers = self.layer_dirs(record)?;
        let init = (opts.init_layer && backend == super::rootfs::Backend::Overlay)
            .then(|| self.init_layer_dir(record));
        let init_ready = init.as_deref().is_some_and(Path::is_dir);
        if let (Some(dir), true) = (&init, init_ready) {
            lowers.push(dir.clone());
        }
        let rootfs = super::rootfs::create_with(&lowers, container_dir, backend, opts)?;
        fs::write(container_dir.join("image-id"), &record.id)
            .ctx(|| format!("writing image-id in {}", container_dir.display()))?;
        if let (Some(dir), false, None) = (&init, init_ready, &opts.idmap) {
            // Made from this first root, for the next ones; this one goes without. (Not from
            // an idmapped root: it shows shifted owners.)
            if let Err(e) = self.make_init_layer(&rootfs.path, dir) {
                tracing::debug!(image = %record.id, "no init layer: {e:#}");
            }
        }
        Ok(rootfs)
    }

    /// Where the init layer of `record` is (made at its first task root).
    fn init_layer_dir(&self, record: &ImageRecord) -> PathBuf {
        let hex = record.id.strip_prefix("sha256:").unwrap_or(&record.id);
        self.root.join(INIT_LAYERS).join(hex)
    }

    /// Builds the init layer of an image from `merged`, a root of the image alone: for each of
    /// [`INIT_DIRS`] and [`INIT_FILES`] the image lacks, an empty one (a directory the image
    /// has is repeated with its mode and owner, so the union keeps them; a file it has is
    /// shadowed by an empty one, which every task's bind mount covers anyway); anything the
    /// image has as another kind (e.g. `/etc` a symlink) is left out, with what is under it,
    /// and the task's init makes it as before. Made in `tmp/`, renamed into place: a
    /// concurrent maker's copy wins and ours goes.
    fn make_init_layer(&self, merged: &Path, dest: &Path) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
        // A locked work dir: a concurrent `Store::open` leaves it alone.
        let work = self.work()?;
        let tmp = work.path.join("init");
        let build = || -> std::io::Result<()> {
            fs::create_dir(&tmp)?;
            let mut skipped: Vec<&str> = vec![];
            let under_skipped =
                |p: &str, skipped: &[&str]| skipped.iter().any(|s| p.starts_with(&format!("{s}/")));
            for d in INIT_DIRS {
                if under_skipped(d, &skipped) {
                    continue;
                }
                let (mode, owner) = match fs::symlink_metadata(merged.join(d)) {
                    Ok(m) if m.is_dir() => (m.mode() & 0o7777, Some((m.uid(), m.gid()))),
                    Ok(_) => {
                        skipped.push(d);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0o755, None),
                    Err(e) => return Err(e),
                };
                let p = tmp.join(d);
                fs::DirBuilder::new().mode(mode).create(&p)?;
                // The mode again: mkdir applies the umask.
                fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
                }
            }
            for f in INIT_FILES {
                if under_skipped(f, &skipped) {
                    continue;
                }
                match fs::symlink_metadata(merged.join(f)) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(tmp.join(f))?;
            }
            Ok(())
        };
        let res = build().and_then(|()| {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, dest)
        });
        drop(work);
        match res {
            // Another launch made it first.
            Err(e) if dest.is_dir() => {
                tracing::debug!("init layer made concurrently: {e}");
                Ok(())
            }
            r => r.ctx(|| format!("making the init layer {}", dest.display())),
        }
    }

    /// Image ids used by containers (from `rootfs/<id>/image-id`, written by
    /// [`Store::create_rootfs`]), with the containers.
    fn images_in_use(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Ok(rd) = fs::read_dir(self.root.join("rootfs")) {
            for e in rd.flatten() {
                if let Ok(id) = fs::read_to_string(e.path().join("image-id")) {
                    out.entry(id.trim().to_string())
                        .or_default()
                        .push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        out
    }

    /// `rmi`: removes a tag (or, given an id, all of the image's tags); the image goes when no
    /// tag is left, and then every layer and blob no other image uses.
    pub fn remove_image(&self, s: &str, force: bool) -> Result<RemoveReport> {
        let _gc = self.lock("gc.lock", FlockArg::LockExclusive)?;
        let rec = self.resolve(s)?;
        let mut report = RemoveReport::default();
        {
            let _meta = self.meta_lock()?;
            let mut tags = self.read_tags()?;
            let by_name = ImageRef::parse(s)
                .ok()
                .and_then(|r| r.tagged_name())
                .filter(|n| tags.get(n) == Some(&rec.id));
            let doomed: Vec<String> = match by_name {
                Some(n) => vec![n],
                None => tags
                    .iter()
                    .filter(|(_, v)| **v == rec.id)
                    .map(|(k, _)| k.clone())
                    .collect(),
            };
            let remaining = tags.values().filter(|v| **v == rec.id).count() - doomed.len();
            if remaining == 0 && !force {
                if let Some(users) = self.images_in_use().get(&rec.id) {
                    return Err(Error::ImageInUse {
                        image: s.to_string(),
                        containers: users.join(", "),
                    });
                }
            }
            for t in &doomed {
                tags.remove(t);
            }
            self.write_tags(&tags)?;
            report.untagged = doomed;
            if remaining == 0 {
                let id = Digest::parse(&rec.id).map_err(|e| self.store_err(e))?;
                fs::remove_file(self.record_path(&id)).ctx(|| format!("removing record {id}"))?;
                report.deleted_images.push(rec.id.clone());
            }
        }
        report.deleted_layers = self.collect_garbage()?;
        Ok(report)
    }

    /// `image prune`: removes images without tags (not used by containers) and everything
    /// no image references.
    pub fn prune(&self) -> Result<RemoveReport> {
        let _gc = self.lock("gc.lock", FlockArg::LockExclusive)?;
        let mut report = RemoveReport::default();
        {
            let _meta = self.meta_lock()?;
            let in_use = self.images_in_use();
            for (rec, tags) in self.images()? {
                if tags.is_empty() && !in_use.contains_key(&rec.id) {
                    let id = Digest::parse(&rec.id).map_err(|e| self.store_err(e))?;
                    fs::remove_file(self.record_path(&id))
                        .ctx(|| format!("removing record {id}"))?;
                    report.deleted_images.push(rec.id);
                }
            }
        }
        report.deleted_layers = self.collect_garbage()?;
        Ok(report)
    }

    /// Deletes layers and blobs that no image record references. Caller holds gc.lock.
    fn collect_garbage(&self) -> Result<Vec<String>> {
        let mut live_layers = BTreeSet::new();
        let mut live_blobs = BTreeSet::new();
        let mut live_ids = BTreeSet::new();
        for (rec, _) in self.images()? {
            live_ids.insert(rec.id[7..].to_string());
            live_blobs.insert(rec.id[7..].to_string());
            live_blobs.insert(rec.manifest_digest[7..].to_string());
            for l in &rec.layers {
                live_layers.insert(l.diff_id[7..].to_string());
            }
        }
        let mut deleted = Vec::new();
        let layers = self.root.join("layers/sha256");
        for e in fs::read_dir(&layers).ctx(|| format!("reading {}", layers.display()))? {
            let e = e.ctx(|| format!("reading {}", layers.display()))?;
            let hex = e.file_name().to_string_lossy().into_owned();
            if !live_layers.contains(&hex) {
                // Rename first so the layer disappears atomically, then delete at leisure.
                let work = self.work()?;
                let grave = work.path.join("layer");
                fs::rename(e.path(), &grave).ctx(|| format!("removing layer {hex}"))?;
                drop(work);
                deleted.push(format!("sha256:{hex}"));
            }
        }
        // Init layers of images that are gone.
        if let Ok(rd) = fs::read_dir(self.root.join(INIT_LAYERS)) {
            for e in rd.flatten() {
                if !live_ids.contains(&*e.file_name().to_string_lossy()) {
                    let _ = remove_tree(&e.path());
                }
            }
        }
        // Blobs of indexes are not in records; keep any blob an index we keep might need? We
        // record only image manifests and configs, so everything else is unreferenced.
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs).ctx(|| format!("reading {}", blobs.display()))? {
            let e = e.ctx(|| format!("reading {}", blobs.display()))?;
            if !live_blobs.contains(&*e.file_name().to_string_lossy()) {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(deleted)
    }
}

/// Removes a tree without following symlinks (std's remove_dir_all does not follow them).
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
