//! Layer unpack: stream a (possibly compressed) OCI/Docker layer tarball into a fresh directory,
//! hashing the uncompressed stream (the diff_id) on the way and converting OCI whiteouts into
//! overlayfs form so the directory can serve directly as an overlay lower layer.
//!
//! Safety model: `dest` is a private, initially empty directory and only this function writes to
//! it, so the only adversary is the archive itself. Every entry path is cleaned (no absolute paths,
//! no `..`), every parent directory is checked with `lstat` (refusing symlinks) before anything is
//! created under it, and final components are created with `O_EXCL`/`O_NOFOLLOW` semantics, so
//! nothing is ever written outside `dest`. Known-safe directories are cached and the cache is
//! invalidated whenever a directory is removed or replaced.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use filetime::FileTime;
use flate2::read::MultiGzDecoder;
use nix::sys::stat::{Mode, SFlag};
use sha2::{Digest, Sha256};
use tar::EntryType;
use xattr::FileExt as _;

/// Size of the I/O buffers: large enough that per-call overhead (hashing, syscalls) is noise.
const BUF_SIZE: usize = 256 * 1024;
/// Most bytes tar may read between two entries (headers, GNU long names, PAX records, which it
/// holds in memory), plus read-ahead slack of one buffer.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// Extended attribute marking an overlayfs directory as opaque.
pub const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// How to unpack a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Upper bound on the uncompressed stream size in bytes (decompression bombs).
    pub max_size: u64,
    /// Apply the uid/gid recorded in the archive (needs root / CAP_CHOWN).
    pub preserve_ownership: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self {
            max_size: 64 << 30,
            preserve_ownership: true,
        }
    }
}

/// What an unpack produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// `sha256:<hex>` of the uncompressed tar stream (the layer's diff_id).
    pub diff_id: String,
    /// Size in bytes of the uncompressed tar stream.
    pub size: u64,
    /// Number of archive members processed (extension headers not counted).
    pub entries: u64,
}

/// Compression of a layer blob, detected from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Detect the compression from the magic bytes at the start of a blob (media types are not
    /// trusted: docker archives often mislabel layers).
    pub fn detect(magic: &[u8]) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Why a layer could not be unpacked. `entry` fields hold the archive path as written in the tar.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(
        "layer is corrupt or truncated ({compression:?} stream, after entry {after:?}): {source}"
    )]
    Stream {
        compression: Compression,
        after: String,
        #[source]
        source: io::Error,
    },
    #[error("layer expands to more than the limit of {limit} bytes (decompression bomb?)")]
    TooLarge { limit: u64 },
    #[error(
        "extension headers (long names, PAX records) after entry {after:?} exceed {limit} bytes"
    )]
    HeadersTooLarge { after: String, limit: u64 },
    #[error("entry {entry:?}: refused: {reason}")]
    UnsafePath { entry: String, reason: String },
    #[error("entry {entry:?}: refused hard link to {target:?}: {reason}")]
    UnsafeLink {
        entry: String,
        target: String,
        reason: String,
    },
    #[error("entry {entry:?}: unsupported entry type {kind}")]
    Unsupported { entry: String, kind: String },
    #[error("entry {entry:?}: malformed header: {source}")]
    Header {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("entry {entry:?}: data truncated: header says {expected} bytes, stream had {got}")]
    Truncated {
        entry: String,
        expected: u64,
        got: u64,
    },
    #[error("entry {entry:?}: {action} {path}: {source}")]
    Write {
        entry: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Unpack the layer blob `reader` (gzip, zstd or plain tar) into the existing empty directory
/// `dest`. Reads `reader` to its very end, so a caller hashing the compressed bytes through its
/// own reader sees all of them.
pub fn unpack_layer<R: Read + Send>(
    reader: R,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let mut reader = reader;
    let mut head = Vec::with_capacity(4);
    let compression;
    {
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < magic.len() {
            match reader.read(&mut magic[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(UnpackError::Stream {
                        compression: Compression::None,
                        after: String::new(),
                        source,
                    })
                }
            }
        }
        head.extend_from_slice(&magic[..got]);
        compression = Compression::detect(&head);
    }
    let input = io::Cursor::new(head).chain(reader);
    let stream_err = |after: &str, source: io::Error| UnpackError::Stream {
        compression,
        after: after.to_string(),
        source,
    };
    let decoder = match compression {
        Compression::None => Decoder::Plain(input),
        Compression::Gzip => Decoder::Gzip(Box::new(MultiGzDecoder::new(input))),
        Compression::Zstd => {
            Decoder::Zstd(zstd::stream::read::Decoder::new(input).map_err(|e| stream_err("", e))?)
        }
    };
    let limits = Rc::new(Limits::default());
    let size_exceeded = AtomicBool::new(false);
    let map_stream = |after: &str, e: io::Error| {
        if size_exceeded.load(Ordering::Relaxed) {
            UnpackError::TooLarge {
                limit: opts.max_size,
            }
        } else if limits.header_exceeded.get() {
            UnpackError::HeadersTooLarge {
                after: after.to_string(),
                limit: MAX_HEADER_BYTES,
            }
        } else {
            stream_err(after, e)
        }
    };

    // Decompression and hashing run on their own thread, feeding the extractor through a
    // small queue of chunks: on two or more cores the decoder no longer waits on the file
    // writes, nor the writes on the decoder.
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(QUEUE_CHUNKS);
    let mut extractor = Extractor::new(dest, opts);
    let mut last_entry = String::new();
    let (extracted, produced) = std::thread::scope(|scope| {
        let producer = scope.spawn(|| produce(decoder, tx, opts.max_size, &size_exceeded));
        let extracted = (|| {
            let mut guarded = GuardedReader {
                rx,
                chunk: Vec::new(),
                pos: 0,
                limits: limits.clone(),
            };
            let mut buffered = BufReader::with_capacity(BUF_SIZE, &mut guarded);
            {
                let mut archive = tar::Archive::new(&mut buffered);
                let mut entries = archive.entries().map_err(|e| map_stream(&last_entry, e))?;
                loop {
                    // Inside next(), tar reads headers and buffers long names / PAX records
                    // whole: bound those bytes so a huge extension header cannot exhaust memory.
                    limits.header_bytes.set(0);
                    limits.header_guard.set(true);
                    let next = entries.next();
                    limits.header_guard.set(false);
                    let Some(entry) = next else { break };
                    let mut entry = entry.map_err(|e| map_stream(&last_entry, e))?;
                    last_entry = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                    extractor
                        .extract(&mut entry, &last_entry)
                        .map_err(|e| match e {
                            // Read errors surface while copying file data; the bomb flag tells
                            // them apart.
                            UnpackError::Stream { source, .. } => map_stream(&last_entry, source),
                            other => other,
                        })?;
                    // Skip data of non-file entries now, outside the header guard.
                    io::copy(&mut entry, &mut io::sink())
                        .map_err(|e| map_stream(&last_entry, e))?;
                }
            }
            // Bytes after the end-of-archive blocks still belong to the diff_id.
            io::copy(&mut buffered, &mut io::sink()).map_err(|e| map_stream(&last_entry, e))?;
            Ok::<(), UnpackError>(())
        })();
        // On an extraction error the queue's receiver is gone, which stops the producer.
        let produced = producer.join().expect("decoder thread panicked");
        (extracted, produced)
    });
    extracted?;
    // The producer read the compressed input to its end (the caller's blob digest needs it).
    let (hasher, count) = produced.map_err(|e| map_stream(&last_entry, e))?;
    extractor.finish()?;

    let stats = UnpackStats {
        diff_id: format!("sha256:{}", hex::encode(hasher.finalize())),
        size: count,
        entries: extractor.entries,
    };
    tracing::debug!(
        dest = %dest.display(),
        ?compression,
        diff_id = %stats.diff_id,
        size = stats.size,
        entries = stats.entries,
        "unpacked layer"
    );
    Ok(stats)
}

enum Decoder<R: Read> {
    Plain(R),
    // Boxed: the gzip state is large and this enum lives on the stack.
    Gzip(Box<MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

impl<R: Read> Decoder<R> {
    /// Read whatever the decoder left of the raw input (normally nothing: both decoders read
    /// until input EOF looking for further members/frames).
    fn drain_input(&mut self) -> io::Result<u64> {
        match self {
            Decoder::Plain(_) => Ok(0),
            Decoder::Gzip(r) => io::copy(r.get_mut(), &mut io::sink()),
            Decoder::Zstd(r) => io::copy(r.get_mut(), &mut io::sink()),
        }
    }
}

/// Limit state shared between the reader (deep inside tar) and the unpack loop, which tells
/// the two limit errors apart from genuine stream errors.
#[derive(Default)]
struct Limits {
    /// While set, bytes read count towards `header_bytes`.
    header_guard: Cell<bool>,
    header_bytes: Cell<u64>,
    header_exceeded: Cell<bool>,
}

/// Chunks in flight between the decoder thread and the extractor (each up to `BUF_SIZE`).
const QUEUE_CHUNKS: usize = 4;

/// The decoder thread: decompresses, hashes and counts the uncompressed stream (failing as
/// soon as it crosses `limit`), sends it on in chunks, then consumes the rest of the raw
/// input. Returns the hash and size of the whole uncompressed stream.
fn produce<R: Read>(
    mut decoder: Decoder<R>,
    tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
    limit: u64,
    size_exceeded: &AtomicBool,
) -> io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    loop {
        let mut buf = vec![0u8; BUF_SIZE];
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
        };
        count += n as u64;
        if count > limit {
            size_exceeded.store(true, Ordering::Relaxed);
            let _ = tx.send(Err(io::Error::other("layer size limit exceeded")));
            return Err(io::Error::other("layer size limit exceeded"));
        }
        hasher.update(&buf[..n]);
        buf.truncate(n);
        if tx.send(Ok(buf)).is_err() {
            // The extractor stopped (it has its own error to report).
            return Err(io::Error::other("extraction stopped"));
        }
    }
    drop(tx);
    decoder.drain_input()?;
    Ok((hasher, count))
}

/// The extractor's end of the queue. Counts header bytes while tar reads headers (see
/// `Limits`) and fails as soon as they exceed `MAX_HEADER_BYTES`.
struct GuardedReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
    limits: Rc<Limits>,
}

impl Read for GuardedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The decoder is done: end of stream.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        if self.limits.header_guard.get() {
            let h = self.limits.header_bytes.get() + n as u64;
            self.limits.header_bytes.set(h);
            if h > MAX_HEADER_BYTES {
                self.limits.header_exceeded.set(true);
                return Err(io::Error::other("header size limit exceeded"));
            }
        }
        Ok(n)
    }
}

/// Metadata applied to directories at the end, once their content is written (creating
/// children changes a directory's mtime, and a read-only mode could block creating them).
#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime: FileTime,
    owner: Option<(u32, u32)>,
}

struct Extractor<'a> {
    dest: &'a Path,
    opts: &'a UnpackOptions,
    /// Relative paths of directories known to be real directories (not symlinks) inside dest.
    safe_dirs: HashSet<PathBuf>,
    dirs: HashMap<PathBuf, DirMeta>,
    buf: Vec<u8>,
    entries: u64,
}

/// What a tar entry becomes on disk.
enum Kind {
    File,
    Dir,
    Symlink(OsString),
    HardLink(PathBuf),
    Device(SFlag, u64),
}

impl<'a> Extractor<'a> {
    fn new(dest: &'a Path, opts: &'a UnpackOptions) -> Self {
        let mut safe_dirs = HashSet::new();
        safe_dirs.insert(PathBuf::new());
        Self {
            dest,
            opts,
            safe_dirs,
            dirs: HashMap::new(),
            buf: vec![0; BUF_SIZE],
            entries: 0,
        }
    }

    fn extract<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let header_err = |source| UnpackError::Header {
            entry: name.to_string(),
            source,
        };
        let etype = entry.header().entry_type();
        if etype.is_pax_global_extensions() {
            return Ok(());
        }
        self.entries += 1;
        let path = entry.path().map_err(header_err)?;
        let rel = clean_path(&path).map_err(|reason| UnpackError::UnsafePath {
            entry: name.to_string(),
            reason: reason.to_string(),
        })?;
        let Some(file_name) = rel.file_name().map(|n| n.to_owned()) else {
            // The layer root ("./"): dest belongs to the caller, keep its metadata.
            return Ok(());
        };
        let file_name_bytes = file_name.as_bytes();

        if file_name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&rel, file_name_bytes, name);
        }

        let header = entry.header();
        let mode = header.mode().map_err(header_err)? & 0o7777;
        let mut mtime = FileTime::from_unix_time(header.mtime().map_err(header_err)? as i64, 0);
        let owner = if self.opts.preserve_ownership {
            let uid = header.uid().map_err(header_err)?;
            let gid = header.gid().map_err(header_err)?;
            let uid =
                u32::try_from(uid).map_err(|_| header_err(io::Error::other("uid out of range")))?;
            let gid =
                u32::try_from(gid).map_err(|_| header_err(io::Error::other("gid out of range")))?;
            Some((uid, gid))
        } else {
            None
        };
        let kind = match etype {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Kind::File,
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| header_err(io::Error::other("symlink without a target")))?;
                Kind::Symlink(OsString::from_vec(target.into_owned()))
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(header_err)?
                    .ok_or_else(|| header_err(io::Error::other("hard link without a target")))?;
                Kind::HardLink(target.into_owned())
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let major = header.device_major().map_err(header_err)?.unwrap_or(0);
                let minor = header.device_minor().map_err(header_err)?.unwrap_or(0);
                let flag = match etype {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                Kind::Device(flag, nix::sys::stat::makedev(major.into(), minor.into()))
            }
            other => {
                return Err(UnpackError::Unsupported {
                    entry: name.to_string(),
                    kind: format!("'{}'", other.as_byte().escape_ascii()),
                })
            }
        };

        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(header_err)? {
            for ext in pax {
                let ext = ext.map_err(header_err)?;
                let Ok(key) = ext.key() else { continue };
                if let Some(xname) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    if xname.starts_with("trusted.overlay.") {
                        // Would let a layer forge overlay metadata (redirects, metacopy).
                        tracing::warn!(entry = name, xattr = xname, "dropping overlay xattr");
                        continue;
                    }
                    xattrs.push((xname.to_string(), ext.value_bytes().to_vec()));
                } else if key == "mtime" {
                    if let Some(t) = ext.value().ok().and_then(parse_pax_time) {
                        mtime = t;
                    }
                }
            }
        }

        self.ensure_parents(&rel, name)?;
        let abs = self.dest.join(&rel);
        let meta = Meta {
            mode,
            mtime,
            owner,
            xattrs: &xattrs,
        };
        match kind {
            Kind::File => self.write_file(entry, &rel, &abs, &meta, name),
            Kind::Dir => self.make_dir(&rel, &abs, &meta, name),
            Kind::Symlink(target) => self.make_symlink(&rel, &abs, &target, &meta, name),
            Kind::HardLink(target) => self.make_hard_link(&rel, &abs, &target, name),
            Kind::Device(flag, dev) => self.make_node(&rel, &abs, flag, dev, &meta, name),
        }
    }

    /// Make sure every parent of `rel` is a real directory inside dest, creating missing ones.
    fn ensure_parents(&mut self, rel: &Path, name: &str) -> Result<(), UnpackError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if self.safe_dirs.contains(parent) {
            return Ok(());
        }
        let mut cur = PathBuf::new();
        for comp in parent.components() {
            cur.push(comp);
            if self.safe_dirs.contains(&cur) {
                continue;
            }
            let abs = self.dest.join(&cur);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                Ok(m) => {
                    let what = if m.file_type().is_symlink() {
                        "a symlink"
                    } else {
                        "not a directory"
                    };
                    return Err(UnpackError::UnsafePath {
                        entry: name.to_string(),
                        reason: format!("parent {} is {what}", cur.display()),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&abs)
                        .map_err(|e| write_err(name, "creating parent directory", &abs, e))?;
                }
                Err(e) => return Err(write_err(name, "inspecting", &abs, e)),
            }
            self.safe_dirs.insert(cur.clone());
        }
        Ok(())
    }

    /// Remove whatever is at `rel` (a later entry replaces an earlier one).
    fn remove_existing(&mut self, rel: &Path, abs: &Path, name: &str) -> Result<(), UnpackError> {
        match fs::symlink_metadata(abs) {
            Ok(m) if m.is_dir() => self
                .remove_tree(rel, abs)
                .map_err(|e| write_err(name, "removing", abs, e))?,
            Ok(_) => fs::remove_file(abs).map_err(|e| write_err(name, "removing", abs, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(name, "inspecting", abs, e)),
        }
        Ok(())
    }

    /// Delete a directory tree, dropping each removed dir from the caches on the way. Walking
    /// the tree ourselves (rather than scanning the caches) keeps the cost proportional to what
    /// is removed, so a layer replacing many dirs cannot make unpack quadratic.
    fn remove_tree(&mut self, rel: &Path, abs: &Path) -> io::Result<()> {
        for ent in fs::read_dir(abs)? {
            let ent = ent?;
            // d_type/lstat: a symlink is reported as a symlink and removed, never followed.
            if ent.file_type()?.is_dir() {
                self.remove_tree(&rel.join(ent.file_name()), &ent.path())?;
            } else {
                fs::remove_file(ent.path())?;
            }
        }
        fs::remove_dir(abs)?;
        self.safe_dirs.remove(rel);
        self.dirs.remove(rel);
        Ok(())
    }

    fn whiteout(&mut self, rel: &Path, file_name: &[u8], name: &str) -> Result<(), UnpackError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if file_name == OPAQUE_WHITEOUT.as_bytes() {
            // The parent itself must be a real directory: create/check it like any parent.
            self.ensure_parents(&parent.join("x"), name)?;
            let abs = self.dest.join(parent);
            xattr::set(&abs, OVERLAY_OPAQUE_XATTR, b"y")
                .map_err(|e| write_err(name, "marking opaque", &abs, e))?;
            return Ok(());
        }
        if file_name.starts_with(b".wh..wh.") {
            // AUFS bookkeeping (e.g. .wh..wh.plnk); meaningless for overlay.
            tracing::debug!(entry = name, "skipping aufs metadata entry");
            return Ok(());
        }
        let target = &file_name[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(UnpackError::UnsafePath {
                entry: name.to_string(),
                reason: "whiteout of an invalid name".to_string(),
            });
        }
        let rel = parent.join(OsStr::from_bytes(target));
        self.ensure_parents(&rel, name)?;
        let abs = self.dest.join(&rel);
        self.remove_existing(&rel, &abs, name)?;
        nix::sys::stat::mknod(&abs, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| write_err(name, "creating whiteout", &abs, e.into()))?;
        Ok(())
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        abs: &Path,
        meta: &Meta<'_>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(abs)
        };
        let mut file = match open() {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.remove_existing(rel, abs, name)?;
                open().map_err(|e| write_err(name, "creating", abs, e))?
            }
            Err(e) => return Err(write_err(name, "creating", abs, e)),
        };
        let expected = entry.size();
        let mut got = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(UnpackError::Stream {
                        compression: Compression::None,
                        after: name.to_string(),
                        source,
                    })
                }
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| write_err(name, "writing", abs, e))?;
            got += n as u64;
        }
        if got != expected {
            return Err(UnpackError::Truncated {
                entry: name.to_string(),
                expected,
                got,
            });
        }
        apply_fd_meta(&file, meta, name, abs)
    }

    fn make_dir(
        &mut self,
        rel: &Path,
        abs: &Path,
        meta: &Meta<'_>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let builder = {
            let mut b = fs::DirBuilder::new();
            b.mode(0o700);
            b
        };
        match builder.create(abs) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let is_dir = fs::symlink_metadata(abs)
                    .map_err(|e| write_err(name, "inspecting", abs, e))?
                    .is_dir();
                // A directory over an existing directory merges; anything else is replaced.
                if !is_dir {
                    self.remove_existing(rel, abs, name)?;
                    builder
                        .create(abs)
                        .map_err(|e| write_err(name, "creating directory", abs, e))?;
                }
            }
            Err(e) => return Err(write_err(name, "creating directory", abs, e)),
        }
        for (key, value) in meta.xattrs {
            set_xattr_path(abs, key, value, true, name)?;
        }
        self.safe_dirs.insert(rel.to_path_buf());
        self.dirs.insert(
            rel.to_path_buf(),
            DirMeta {
                mode: meta.mode,
                mtime: meta.mtime,
                owner: meta.owner,
            },
        );
        Ok(())
    }

    fn make_symlink(
        &mut self,
        rel: &Path,
        abs: &Path,
        target: &OsStr,
        meta: &Meta<'_>,
        name: &str,
    ) -> Result<(), UnpackError> {
        // The target is stored verbatim: it is never followed here.
        if let Err(e) = std::os::unix::fs::symlink(target, abs) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(write_err(name, "creating symlink", abs, e));
            }
            self.remove_existing(rel, abs, name)?;
            std::os::unix::fs::symlink(target, abs)
                .map_err(|e| write_err(name, "creating symlink", abs, e))?;
        }
        apply_path_meta(abs, meta, false, name)
    }

    fn make_node(
        &mut self,
        rel: &Path,
        abs: &Path,
        flag: SFlag,
        dev: u64,
        meta: &Meta<'_>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let mknod = || nix::sys::stat::mknod(abs, flag, Mode::empty(), dev);
        if let Err(e) = mknod() {
            if e != nix::errno::Errno::EEXIST {
                return Err(write_err(name, "creating node", abs, e.into()));
            }
            self.remove_existing(rel, abs, name)?;
            mknod().map_err(|e| write_err(name, "creating node", abs, e.into()))?;
        }
        apply_path_meta(abs, meta, true, name)
    }

    fn make_hard_link(
        &mut self,
        rel: &Path,
        abs: &Path,
        target: &Path,
        name: &str,
    ) -> Result<(), UnpackError> {
        let refuse = |reason: String| UnpackError::UnsafeLink {
            entry: name.to_string(),
            target: target.display().to_string(),
            reason,
        };
        let target_rel = clean_path(target).map_err(|r| refuse(r.to_string()))?;
        if target_rel.as_os_str().is_empty() {
            return Err(refuse("target is the layer root".to_string()));
        }
        if target_rel == rel {
            return Err(refuse("link to itself".to_string()));
        }
        // Every parent of the target must be a known or verified real directory.
        let mut cur = PathBuf::new();
        for comp in target_rel.parent().unwrap_or(Path::new("")).components() {
            cur.push(comp);
            if self.safe_dirs.contains(&cur) {
                continue;
            }
            match fs::symlink_metadata(self.dest.join(&cur)) {
                Ok(m) if m.is_dir() => {
                    self.safe_dirs.insert(cur.clone());
                }
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse(format!("{} is a symlink", cur.display())))
                }
                Ok(_) => return Err(refuse(format!("{} is not a directory", cur.display()))),
                Err(_) => return Err(refuse("target does not exist in this layer".to_string())),
            }
        }
        let target_abs = self.dest.join(&target_rel);
        match fs::symlink_metadata(&target_abs) {
            Ok(m) if m.is_dir() => return Err(refuse("target is a directory".to_string())),
            Ok(_) => {}
            Err(_) => return Err(refuse("target does not exist in this layer".to_string())),
        }
        // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself, never followed.
        if let Err(e) = fs::hard_link(&target_abs, abs) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(write_err(name, "creating hard link", abs, e));
            }
            self.remove_existing(rel, abs, name)?;
            fs::hard_link(&target_abs, abs)
                .map_err(|e| write_err(name, "creating hard link", abs, e))?;
        }
        Ok(())
    }

    /// Apply the deferred directory metadata.
    fn finish(&mut self) -> Result<(), UnpackError> {
        for (rel, meta) in self.dirs.drain() {
            let abs = self.dest.join(&rel);
            let name = rel.display().to_string();
            let dir = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&abs)
                .map_err(|e| write_err(&name, "opening directory", &abs, e))?;
            if let Some((uid, gid)) = meta.owner {
                std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))
                    .map_err(|e| write_err(&name, "chown", &abs, e))?;
            }
            dir.set_permissions(fs::Permissions::from_mode(meta.mode))
                .map_err(|e| write_err(&name, "chmod", &abs, e))?;
            filetime::set_file_handle_times(&dir, Some(meta.mtime), Some(meta.mtime))
                .map_err(|e| write_err(&name, "setting times", &abs, e))?;
        }
        Ok(())
    }
}

struct Meta<'x> {
    mode: u32,
    mtime: FileTime,
    owner: Option<(u32, u32)>,
    xattrs: &'x [(String, Vec<u8>)],
}

fn write_err(entry: &str, action: &'static str, path: &Path, source: io::Error) -> UnpackError {
    UnpackError::Write {
        entry: entry.to_string(),
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Metadata through an open regular file: chown first (it clears setuid bits and file
/// capabilities), then mode, then xattrs, then times.
fn apply_fd_meta(file: &File, meta: &Meta<'_>, name: &str, abs: &Path) -> Result<(), UnpackError> {
    if let Some((uid, gid)) = meta.owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))
            .map_err(|e| write_err(name, "chown", abs, e))?;
    }
    file.set_permissions(fs::Permissions::from_mode(meta.mode))
        .map_err(|e| write_err(name, "chmod", abs, e))?;
    for (key, value) in meta.xattrs {
        if let Err(e) = file.set_xattr(key, value) {
            xattr_error(abs, key, e, true, name)?;
        }
    }
    filetime::set_file_handle_times(file, Some(meta.mtime), Some(meta.mtime))
        .map_err(|e| write_err(name, "setting times", abs, e))
}

/// Metadata by path for symlinks and device nodes, never following a symlink.
fn apply_path_meta(
    abs: &Path,
    meta: &Meta<'_>,
    chmod: bool,
    name: &str,
) -> Result<(), UnpackError> {
    if let Some((uid, gid)) = meta.owner {
        std::os::unix::fs::lchown(abs, Some(uid), Some(gid))
            .map_err(|e| write_err(name, "chown", abs, e))?;
    }
    if chmod {
        // Only called for nodes we just created (not symlinks), so following is harmless.
        fs::set_permissions(abs, fs::Permissions::from_mode(meta.mode))
            .map_err(|e| write_err(name, "chmod", abs, e))?;
    }
    for (key, value) in meta.xattrs {
        set_xattr_path(abs, key, value, false, name)?;
    }
    filetime::set_symlink_file_times(abs, meta.mtime, meta.mtime)
        .map_err(|e| write_err(name, "setting times", abs, e))
}

fn set_xattr_path(
    abs: &Path,
    key: &str,
    value: &[u8],
    user_ok: bool,
    name: &str,
) -> Result<(), UnpackError> {
    // xattr::set operates on a symlink itself, never on its target.
    match xattr::set(abs, key, value) {
        Ok(()) => Ok(()),
        Err(e) => xattr_error(abs, key, e, user_ok, name),
    }
}

/// Decide whether a failed xattr is fatal: filesystems without xattr support and `user.*`
/// attributes on symlinks/devices (which Linux forbids) are skipped with a warning.
fn xattr_error(
    abs: &Path,
    key: &str,
    e: io::Error,
    user_ok: bool,
    name: &str,
) -> Result<(), UnpackError> {
    let unsupported = e.raw_os_error() == Some(libc::EOPNOTSUPP);
    let forbidden_user =
        !user_ok && key.starts_with("user.") && e.raw_os_error() == Some(libc::EPERM);
    if unsupported || forbidden_user {
        tracing::warn!(entry = name, xattr = key, error = %e, "skipping xattr");
        Ok(())
    } else {
        Err(write_err(name, "setting xattr", abs, e))
    }
}

/// PAX times are decimal seconds with an optional fraction ("1700000000.123456789").
fn parse_pax_time(value: &str) -> Option<FileTime> {
    let (secs, frac) = match value.split_once('.') {
        Some((s, f)) => (s, f),
        None => (value, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut nanos = 0u32;
    if !frac.is_empty() {
        let digits: String = frac.chars().take(9).collect();
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        nanos = format!("{digits:0<9}").parse().ok()?;
    }
    if secs < 0 && nanos > 0 {
        // Negative fractional times are rare; keep whole seconds rather than mis-rounding.
        nanos = 0;
    }
    Some(FileTime::from_unix_time(secs, nanos))
}

/// Clean an archive path into a relative path inside the layer: `.` components dropped,
/// absolute paths and `..` refused.
fn clean_path(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains a '..' component"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::Header;

    /// Root-needing tests: must run under CI, may be skipped (loudly) elsewhere.
    pub(crate) fn require_root(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!("{test} needs root and CI is set: refusing to skip");
        }
        eprintln!("skipping {test}: needs root");
        false
    }

    /// Builds tars entry by entry, including what `tar::Builder` would refuse.
    pub(crate) struct TarW {
        b: tar::Builder<Vec<u8>>,
    }

    pub(crate) const MTIME: u64 = 1_600_000_000;

    impl TarW {
        pub(crate) fn new() -> Self {
            Self {
                b: tar::Builder::new(Vec::new()),
            }
        }

        pub(crate) fn add(
            &mut self,
            name: &[u8],
            ty: EntryType,
            data: &[u8],
            f: impl FnOnce(&mut Header),
        ) -> &mut Self {
            let mut h = Header::new_gnu();
            if name.len() > 100 {
                // GNU long name record, written by hand so any bytes pass through.
                let mut l = Header::new_gnu();
                l.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
                l.set_entry_type(EntryType::GNULongName);
                l.set_size(name.len() as u64 + 1);
                l.set_mode(0o644);
                l.set_cksum();
                let mut data = name.to_vec();
                data.push(0);
                self.b.append(&l, &data[..]).unwrap();
                h.as_old_mut().name[..4].copy_from_slice(b"long");
            } else {
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
            }
            h.set_entry_type(ty);
            h.set_size(data.len() as u64);
            h.set_mode(if ty == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_mtime(MTIME);
            h.set_uid(0);
            h.set_gid(0);
            f(&mut h);
            h.set_cksum();
            self.b.append(&h, data).unwrap();
            self
        }

        pub(crate) fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
            self.add(name.as_bytes(), EntryType::Regular, data, |_| {})
        }

        pub(crate) fn dir(&mut self, name: &str) -> &mut Self {
            self.add(name.as_bytes(), EntryType::Directory, b"", |_| {})
        }

        pub(crate) fn link(&mut self, ty: EntryType, name: &str, target: &str) -> &mut Self {
            self.add(name.as_bytes(), ty, b"", |h| {
                h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            })
        }

        pub(crate) fn node(
            &mut self,
            ty: EntryType,
            name: &str,
            major: u32,
            minor: u32,
        ) -> &mut Self {
            self.add(name.as_bytes(), ty, b"", |h| {
                h.set_device_major(major).unwrap();
                h.set_device_minor(minor).unwrap();
            })
        }

        /// A PAX extended header applying to the next entry.
        pub(crate) fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
            let mut data = Vec::new();
            for (k, v) in records {
                let body = k.len() + v.len() + 3; // ' ', '=', '\n'
                let mut len = body + 1;
                while len != body + len.to_string().len() {
                    len = body + len.to_string().len();
                }
                data.extend_from_slice(format!("{len} {k}=").as_bytes());
                data.extend_from_slice(v);
                data.push(b'\n');
            }
            self.add(b"PaxHeaders/x", EntryType::XHeader, &data, |_| {})
        }

        pub(crate) fn finish(&mut self) -> Vec<u8> {
            self.b.finish().unwrap();
            self.b.get_ref().clone()
        }
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    pub(crate) fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    /// Everything about a tree that unpack/rootfs must preserve, one line per path.
    pub(crate) fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
            let mut names: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for name in names {
                let p = dir.join(&name);
                let m = fs::symlink_metadata(&p).unwrap();
                let ft = m.file_type();
                let what = if ft.is_dir() {
                    "dir".to_string()
                } else if ft.is_symlink() {
                    format!("symlink->{}", fs::read_link(&p).unwrap().display())
                } else if ft.is_file() {
                    format!("file nlink={} {}", m.nlink(), sha(&fs::read(&p).unwrap()))
                } else if ft.is_char_device() {
                    format!("char {:x}", m.rdev())
                } else if ft.is_block_device() {
                    format!("block {:x}", m.rdev())
                } else {
                    "fifo".to_string()
                };
                let mut xattrs: Vec<String> = xattr::list(&p)
                    .unwrap()
                    .filter(|n| !n.as_bytes().starts_with(b"trusted.overlay."))
                    .map(|n| {
                        let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                        format!("{}={}", n.to_string_lossy(), String::from_utf8_lossy(&v))
                    })
                    .collect();
                xattrs.sort();
                let mode = if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                };
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    format!(
                        "{what} mode={mode:o} owner={}:{} mtime={} xattrs={xattrs:?}",
                        m.uid(),
                        m.gid(),
                        m.mtime()
                    ),
                );
                if ft.is_dir() {
                    walk(root, &p, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    fn unpack_bytes(data: &[u8], dest: &Path) -> Result<UnpackStats, UnpackError> {
        unpack_layer(data, dest, &UnpackOptions::default())
    }

    /// A layer exercising every entry type and metadata kind.
    fn rich_tar() -> Vec<u8> {
        let long = format!("deep/{}/file", "n".repeat(120));
        let pax_long = format!("pax/{}/file", "p".repeat(150));
        let mut t = TarW::new();
        t.dir("bin/")
            .add(b"bin/su", EntryType::Regular, b"#!suid", |h| {
                h.set_mode(0o4755);
                h.set_uid(1234);
                h.set_gid(5678);
                h.set_mtime(1_500_000_000);
            })
            .add(b"tmp/", EntryType::Directory, b"", |h| {
                h.set_mode(0o1777);
                h.set_mtime(1_400_000_000);
            })
            .add(b"tmp/inner", EntryType::Regular, b"x", |h| h.set_mode(0o600))
            .file("etc/hosts", b"127.0.0.1 localhost\n")
            .link(EntryType::Symlink, "etc/link", "../bin/su")
            .link(EntryType::Symlink, "abs", "/etc/passwd")
            .link(EntryType::Link, "bin/su-hard", "bin/su")
            .node(EntryType::Char, "dev/null", 1, 3)
            .node(EntryType::Block, "dev/loop0", 7, 0)
            .node(EntryType::Fifo, "dev/fifo", 0, 0)
            .file(&long, b"long gnu name")
            .pax(&[
                ("path", pax_long.as_bytes()),
                ("SCHILY.xattr.user.color", b"blue"),
                ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"),
                ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
                ("mtime", b"1700000000.5"),
            ])
            .file("placeholder", b"pax long name")
            .pax(&[("SCHILY.xattr.user.dir", b"yes")])
            .dir("xdir/");
        t.finish()
    }

    #[test]
    fn detect_compression() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"bin/"), Compression::None);
        assert_eq!(Compression::detect(&[0x1f]), Compression::None);
        assert_eq!(Compression::detect(&[]), Compression::None);
    }

    #[test]
    fn pax_time_parsing() {
        assert_eq!(
            parse_pax_time("12.5"),
            Some(FileTime::from_unix_time(12, 500_000_000))
        );
        assert_eq!(parse_pax_time("12"), Some(FileTime::from_unix_time(12, 0)));
        assert_eq!(parse_pax_time("x"), None);
    }

    #[test]
    fn root_formats_give_same_tree_and_diff_id() {
        if !require_root("root_formats_give_same_tree_and_diff_id") {
            return;
        }
        let plain = rich_tar();
        let tmp = tempfile::tempdir().unwrap();
        let mut trees = Vec::new();
        for (name, blob) in [
            ("plain", plain.clone()),
            ("gzip", gzip(&plain)),
            ("zstd", zstd::encode_all(&plain[..], 3).unwrap()),
        ] {
            let dest = tmp.path().join(name);
            fs::create_dir(&dest).unwrap();
            let stats = unpack_bytes(&blob, &dest).unwrap();
            assert_eq!(stats.diff_id, sha(&plain), "{name}");
            assert_eq!(stats.size, plain.len() as u64, "{name}");
            assert_eq!(stats.entries, 14, "{name}");
            trees.push(snapshot(&dest));
        }
        // Directories the archive does not list get the unpack's time (the archive's own
        // times are years old): unpacks a second apart must still compare equal.
        let recent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 3600;
        for tree in trees.iter_mut() {
            for line in tree.values_mut() {
                let Some((head, rest)) = line.split_once(" mtime=") else {
                    continue;
                };
                let (t, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if t.parse::<u64>().is_ok_and(|t| t >= recent) {
                    *line = format!("{head} mtime=recent {tail}");
                }
            }
        }
        assert_eq!(trees[0], trees[1]);
        assert_eq!(trees[0], trees[2]);
    }

    #[test]
    fn root_metadata_file_by_file() {
        if !require_root("root_metadata_file_by_file") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        unpack_bytes(&rich_tar(), d).unwrap();
        let meta = |p: &str| fs::symlink_metadata(d.join(p)).unwrap();

        let su = meta("bin/su");
        assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept after chown");
        assert_eq!((su.uid(), su.gid()), (1234, 5678));
        assert_eq!(su.mtime(), 1_500_000_000);
        assert_eq!(su.nlink(), 2);
        assert_eq!(meta("bin/su-hard").ino(), su.ino());

        let tmpdir = meta("tmp");
        assert!(tmpdir.is_dir());
        assert_eq!(tmpdir.mode() & 0o7777, 0o1777);
        assert_eq!(
            tmpdir.mtime(),
            1_400_000_000,
            "dir mtime set after its content"
        );
        assert_eq!(meta("tmp/inner").mode() & 0o7777, 0o600);
        assert_eq!(meta("bin").mtime(), MTIME as i64);
        // Implicit parents get 0755.
        assert_eq!(meta("etc").mode() & 0o7777, 0o755);

        assert_eq!(
            fs::read_link(d.join("etc/link")).unwrap(),
            Path::new("../bin/su")
        );
        assert_eq!(
            fs::read_link(d.join("abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(meta("abs").mtime(), MTIME as i64);

        let null = meta("dev/null");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o644);
        let lp = meta("dev/loop0");
        assert!(lp.file_type().is_block_device());
        assert_eq!(lp.rdev(), nix::sys::stat::makedev(7, 0));
        assert!(meta("dev/fifo").file_type().is_fifo());

        let long = format!("deep/{}/file", "n".repeat(120));
        assert_eq!(fs::read(d.join(long)).unwrap(), b"long gnu name");
        let pax_long = d.join(format!("pax/{}/file", "p".repeat(150)));
        assert_eq!(fs::read(&pax_long).unwrap(), b"pax long name");
        assert!(!d.join("placeholder").exists());
        assert_eq!(
            xattr::get(&pax_long, "user.color").unwrap().unwrap(),
            b"blue"
        );
        assert!(xattr::get(&pax_long, "security.capability")
            .unwrap()
            .is_some());
        assert_eq!(
            xattr::get(&pax_long, "trusted.overlay.redirect").unwrap(),
            None
        );
        let pm = fs::metadata(&pax_long).unwrap();
        assert_eq!((pm.mtime(), pm.mtime_nsec()), (1_700_000_000, 500_000_000));
        assert_eq!(
            xattr::get(d.join("xdir"), "user.dir").unwrap().unwrap(),
            b"yes"
        );
    }

    #[test]
    fn root_ownership_not_preserved_when_disabled() {
        if !require_root("root_ownership_not_preserved_when_disabled") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let opts = UnpackOptions {
            preserve_ownership: false,
            ..Default::default()
        };
        unpack_layer(&rich_tar()[..], tmp.path(), &opts).unwrap();
        assert_eq!(fs::metadata(tmp.path().join("bin/su")).unwrap().uid(), 0);
    }

    #[test]
    fn root_whiteouts_become_overlay_form() {
        if !require_root("root_whiteouts_become_overlay_form") {
            return;
        }
        let mut t = TarW::new();
        t.dir("a/")
            .file("a/.wh.gone", b"")
            .file("a/replaced", b"data")
            .file("a/.wh.replaced", b"")
            .dir("a/sub/")
            .file("a/sub/x", b"")
            .file("a/.wh.sub", b"")
            .dir("b/")
            .file("b/.wh..wh..opq", b"")
            .file("b/keep", b"k")
            .file("c/.wh..wh..opq", b"")
            .file(".wh..wh.plnk", b"");
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let stats = unpack_bytes(&t.finish(), d).unwrap();
        assert_eq!(stats.entries, 12);
        for w in ["a/gone", "a/replaced", "a/sub"] {
            let m = fs::symlink_metadata(d.join(w)).unwrap();
            assert!(m.file_type().is_char_device(), "{w}");
            assert_eq!(m.rdev(), 0, "{w}");
        }
        for not in ["a/.wh.gone", "b/.wh..wh..opq", ".wh..wh.plnk", "a/sub/x"] {
            assert!(fs::symlink_metadata(d.join(not)).is_err(), "{not}");
        }
        assert_eq!(
            xattr::get(d.join("b"), OVERLAY_OPAQUE_XATTR)
                .unwrap()
                .unwrap(),
            b"y"
        );
        assert_eq!(
            xattr::get(d.join("c"), OVERLAY_OPAQUE_XATTR)
                .unwrap()
                .unwrap(),
            b"y"
        );
        assert_eq!(xattr::get(d.join("a"), OVERLAY_OPAQUE_XATTR).unwrap(), None);
        assert_eq!(fs::read(d.join("b/keep")).unwrap(), b"k");
    }

    #[test]
    fn root_duplicates_later_wins() {
        if !require_root("root_duplicates_later_wins") {
            return;
        }
        let mut t = TarW::new();
        t.file("f", b"one")
            .file("f", b"two")
            .dir("d/")
            .file("d/a", b"a")
            .add(b"d/", EntryType::Directory, b"", |h| h.set_mode(0o700))
            .file("d/b", b"b")
            .dir("x/")
            .file("x/inner", b"")
            .file("x", b"file over dir")
            .file("y", b"")
            .dir("y/")
            .link(EntryType::Symlink, "s", "/nowhere")
            .file("s", b"file over symlink");
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        unpack_bytes(&t.finish(), d).unwrap();
        assert_eq!(fs::read(d.join("f")).unwrap(), b"two");
        assert_eq!(fs::read(d.join("d/a")).unwrap(), b"a", "dirs merge");
        assert_eq!(fs::read(d.join("d/b")).unwrap(), b"b");
        assert_eq!(fs::metadata(d.join("d")).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(fs::read(d.join("x")).unwrap(), b"file over dir");
        assert!(fs::symlink_metadata(d.join("y")).unwrap().is_dir());
        assert_eq!(fs::read(d.join("s")).unwrap(), b"file over symlink");
    }

    /// Everything in `root` except the subtree `skip`.
    fn outside_snapshot(root: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
        let rel = skip.strip_prefix(root).unwrap();
        snapshot(root)
            .into_iter()
            .filter(|(p, _)| !p.starts_with(rel) || p == rel)
            .map(|(p, v)| if p == rel { (p, String::new()) } else { (p, v) })
            .collect()
    }

    #[test]
    fn root_hostile_corpus_is_refused() {
        if !require_root("root_hostile_corpus_is_refused") {
            return;
        }
        type Case = (&'static str, Box<dyn Fn(&mut TarW)>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "dotdot",
                Box::new(|t| {
                    t.file("../evil", b"x");
                }),
                "UnsafePath",
            ),
            (
                "dotdot-inner",
                Box::new(|t| {
                    t.file("a/../../evil", b"x");
                }),
                "UnsafePath",
            ),
            (
                "absolute",
                Box::new(|t| {
                    t.file("/tmp/evil", b"x");
                }),
                "UnsafePath",
            ),
            (
                "gnu-long-dotdot",
                Box::new(|t| {
                    let name = format!("{}/../../../evil", "a/".repeat(60));
                    t.file(&name, b"x");
                }),
                "UnsafePath",
            ),
            (
                "pax-path-dotdot",
                Box::new(|t| {
                    t.pax(&[("path", b"../outside/evil")])
                        .file("innocent", b"x");
                }),
                "UnsafePath",
            ),
            (
                "symlink-parent-relative",
                Box::new(|t| {
                    t.link(EntryType::Symlink, "up", "..").file("up/evil", b"x");
                }),
                "UnsafePath",
            ),
            (
                "symlink-parent-absolute",
                Box::new(|t| {
                    t.link(EntryType::Symlink, "out", "/")
                        .file("out/evil", b"x");
                }),
                "UnsafePath",
            ),
            (
                "dir-replaced-by-symlink",
                Box::new(|t| {
                    t.dir("d/")
                        .file("d/ok", b"")
                        .link(EntryType::Symlink, "d", "..")
                        .file("d/evil", b"x");
                }),
                "UnsafePath",
            ),
            (
                "symlink-parent-dir-entry",
                Box::new(|t| {
                    t.link(EntryType::Symlink, "up", "..").dir("up/evildir/");
                }),
                "UnsafePath",
            ),
            (
                "symlink-parent-device",
                Box::new(|t| {
                    t.link(EntryType::Symlink, "up", "..").node(
                        EntryType::Char,
                        "up/evilnode",
                        1,
                        3,
                    );
                }),
                "UnsafePath",
            ),
            (
                "whiteout-through-symlink",
                Box::new(|t| {
                    t.link(EntryType::Symlink, "up", "..")
                        .file("up/.wh.outside", b"");
                }),
                "UnsafePath",
            ),
            (
                "opaque-through-symlink",
                Box::new(|t| {
                    t.link(EntryType::Symlink, "up", "..")
                        .file("up/.wh..wh..opq", b"");
                }),
                "UnsafePath",
            ),
            (
                "whiteout-dotdot-name",
                Box::new(|t| {
                    t.file(".wh...", b"");
                }),
                "UnsafePath",
            ),
            (
                "hardlink-absolute",
                Box::new(|t| {
                    t.link(EntryType::Link, "h", "/etc/passwd");
                }),
                "UnsafeLink",
            ),
            (
                "hardlink-dotdot",
                Box::new(|t| {
                    t.link(EntryType::Link, "h", "../outside/secret");
                }),
                "UnsafeLink",
            ),
            (
                "hardlink-through-symlink",
                Box::new(|t| {
                    t.link(EntryType::Symlink, "up", "..").link(
                        EntryType::Link,
                        "h",
                        "up/outside/secret",
                    );
                }),
                "UnsafeLink",
            ),
            (
                "hardlink-missing",
                Box::new(|t| {
                    t.link(EntryType::Link, "h", "not-yet");
                }),
                "UnsafeLink",
            ),
            (
                "hardlink-self",
                Box::new(|t| {
                    t.file("h", b"").link(EntryType::Link, "h", "h");
                }),
                "UnsafeLink",
            ),
            (
                "unsupported-type",
                Box::new(|t| {
                    t.add(b"vol", EntryType::new(b'V'), b"", |_| {});
                }),
                "Unsupported",
            ),
        ];
        for (name, build, want) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let outside = tmp.path().join("outside");
            fs::create_dir(&outside).unwrap();
            fs::write(outside.join("secret"), b"secret").unwrap();
            // dest two levels down, so "../" and "../../" land in watched places.
            let dest = tmp.path().join("store/dest");
            fs::create_dir_all(&dest).unwrap();
            let before = outside_snapshot(tmp.path(), &dest);
            let mut t = TarW::new();
            build(&mut t);
            let err = unpack_bytes(&t.finish(), &dest).expect_err(name);
            let dbg = format!("{err:?}");
            assert!(dbg.starts_with(want), "{name}: got {dbg}");
            assert!(err.to_string().contains("entry"), "{name}: {err}");
            assert_eq!(before, outside_snapshot(tmp.path(), &dest), "{name}");
            assert!(!Path::new("/tmp/evil").exists() && !Path::new("/evil").exists());
            assert!(!Path::new("/evildir").exists() && !Path::new("/evilnode").exists());
        }
    }

    #[test]
    fn corrupt_and_truncated_streams_are_errors() {
        let mut t = TarW::new();
        let big: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        t.file("big", &big).file("after", b"x");
        let plain = t.finish();
        let gz = gzip(&plain);
        let zs = zstd::encode_all(&plain[..], 3).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("gzip-truncated", gz[..gz.len() / 2].to_vec()),
            ("gzip-no-trailer", gz[..gz.len() - 4].to_vec()),
            ("gzip-garbage", {
                let mut g = gz.clone();
                for b in &mut g[100..200] {
                    *b ^= 0x5a;
                }
                g
            }),
            ("zstd-truncated", zs[..zs.len() / 2].to_vec()),
            ("plain-truncated-data", plain[..100_000].to_vec()),
            ("plain-truncated-header", plain[..300].to_vec()),
            ("plain-bad-checksum", {
                let mut p = plain.clone();
                p[0] ^= 1;
                p
            }),
        ];
        for (name, blob) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let opts = UnpackOptions {
                preserve_ownership: false,
                ..Default::default()
            };
            let err = unpack_layer(&blob[..], tmp.path(), &opts).expect_err(name);
            assert!(
                matches!(
                    err,
                    UnpackError::Stream { .. } | UnpackError::Truncated { .. }
                ),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn decompression_bomb_is_refused() {
        let zeros = vec![0u8; 8 << 20];
        let mut t = TarW::new();
        t.file("zeros", &zeros);
        let blob = gzip(&t.finish());
        assert!(blob.len() < 100_000);
        let tmp = tempfile::tempdir().unwrap();
        let opts = UnpackOptions {
            max_size: 1 << 20,
            preserve_ownership: false,
        };
        let err = unpack_layer(&blob[..], tmp.path(), &opts).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooLarge { limit } if limit == 1 << 20),
            "{err:?}"
        );
        // Aborted early: not the whole 8 MiB file was written.
        let written = fs::metadata(tmp.path().join("zeros"))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(written <= 1 << 20, "{written}");
        // The exact size passes.
        let tmp2 = tempfile::tempdir().unwrap();
        let plain_len = (8 << 20) + 512 + 1024;
        let opts = UnpackOptions {
            max_size: plain_len,
            preserve_ownership: false,
        };
        unpack_layer(&blob[..], tmp2.path(), &opts).unwrap();
    }

    #[test]
    fn huge_extension_header_is_refused() {
        let mut t = TarW::new();
        t.file("first", b"")
            .pax(&[("comment", &vec![b'x'; 20 << 20])])
            .file("second", b"");
        let blob = gzip(&t.finish());
        let tmp = tempfile::tempdir().unwrap();
        let opts = UnpackOptions {
            preserve_ownership: false,
            ..Default::default()
        };
        let err = unpack_layer(&blob[..], tmp.path(), &opts).unwrap_err();
        assert!(
            matches!(&err, UnpackError::HeadersTooLarge { after, .. } if after == "first"),
            "{err:?}"
        );
        // Large data in a non-file entry is skipped without being held in memory.
        let mut t = TarW::new();
        t.add(b"dir/", EntryType::Directory, &vec![0u8; 20 << 20], |_| {})
            .file("after", b"a");
        let tmp = tempfile::tempdir().unwrap();
        unpack_layer(&gzip(&t.finish())[..], tmp.path(), &opts).unwrap();
        assert_eq!(fs::read(tmp.path().join("after")).unwrap(), b"a");
    }

    /// Counts what the unpacker pulled from the raw blob.
    struct Counting<'a> {
        data: &'a [u8],
        pos: usize,
    }
    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.data.len() - self.pos).min(7919);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn input_is_read_to_the_end() {
        let mut t = TarW::new();
        t.file("a", b"hello");
        let mut plain = t.finish();
        // Docker pads tars to a 10 KiB record; that padding is part of the diff_id.
        plain.resize(10240, 0);
        let opts = UnpackOptions {
            preserve_ownership: false,
            ..Default::default()
        };
        for blob in [
            plain.clone(),
            gzip(&plain),
            zstd::encode_all(&plain[..], 1).unwrap(),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let mut r = Counting {
                data: &blob,
                pos: 0,
            };
            let stats = unpack_layer(&mut r, tmp.path(), &opts).unwrap();
            assert_eq!(r.pos, blob.len());
            assert_eq!(stats.diff_id, sha(&plain));
            assert_eq!(stats.size, 10240);
            assert_eq!(stats.entries, 1);
        }
        // Two concatenated gzip members are one valid stream.
        let mut two = gzip(&plain[..512]);
        two.extend(gzip(&plain[512..]));
        let tmp = tempfile::tempdir().unwrap();
        let stats = unpack_layer(&two[..], tmp.path(), &opts).unwrap();
        assert_eq!(stats.diff_id, sha(&plain));
    }

    #[test]
    fn empty_input_is_an_empty_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let stats = unpack_layer(&b""[..], tmp.path(), &UnpackOptions::default()).unwrap();
        assert_eq!(stats.entries, 0);
        assert_eq!(stats.diff_id, sha(b""));
    }
}
