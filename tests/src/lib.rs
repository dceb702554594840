//! Helpers for end-to-end tests: the real `caisson` binary, a real `docker-registry`, images
//! built with `umoci`/`skopeo`/`busybox-static`, and hand-made OCI layouts for what those tools
//! cannot make (indexes, hostile layers).
pub mod cluster;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory of the programs under test: `CAISSON_TEST_BIN_DIR` (e.g. `target/dist-debug`,
/// the static build of `scripts/build-dist.sh`, which `scripts/test.sh` runs the end-to-end
/// tests against too), else the test executable's `target/<profile>`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAISSON_TEST_BIN_DIR").filter(|d| !d.is_empty()) {
        return std::path::absolute(d).expect("CAISSON_TEST_BIN_DIR");
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The `caisson` binary under test ([`bin_dir`]).
pub fn caisson_bin() -> PathBuf {
    let bin = bin_dir().join("caisson");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Whether root-only tests can run. Under CI=true a missing prerequisite is a failure.
pub fn require_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root, and CI must run it");
    }
    eprintln!("skipping: needs root");
    false
}

/// Checks that a host tool exists; under CI a missing tool is a failure.
pub fn require_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is not installed (scripts/test.sh installs it)");
        }
        eprintln!("skipping: {name} not installed");
    }
    found
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A caisson store in a temp dir, with the binary to drive it.
pub struct Caisson {
    pub root: tempfile::TempDir,
}

impl Caisson {
    pub fn new() -> Caisson {
        Caisson {
            root: tempfile::Builder::new()
                .prefix("caisson-root")
                .tempdir()
                .expect("temp root"),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(caisson_bin());
        c.arg("--root").arg(self.root.path());
        c.env_remove("REGISTRY_AUTH_FILE");
        c
    }

    /// Runs caisson with `args`; returns (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd().args(args).output().expect("run caisson");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs caisson and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "caisson {args:?} failed: {out}{err}");
        out
    }

    pub fn images_json(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["images", "--json"])).expect("images --json")
    }

    pub fn inspect(&self, image: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["image", "inspect", image])).expect("inspect json");
        v[0].clone()
    }

    /// The unpacked dir of layer `i` (bottom first) of `image`.
    pub fn layer_dir(&self, image: &str, i: usize) -> PathBuf {
        let v = self.inspect(image);
        let diff_id = v["Layers"][i]["diff_id"].as_str().expect("diff_id");
        self.root
            .path()
            .join("layers/sha256")
            .join(&diff_id[7..])
            .join("diff")
    }

    /// Entries left in the store's tmp/ (should be none between commands).
    pub fn tmp_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path().join("tmp"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn layer_count(&self) -> usize {
        std::fs::read_dir(self.root.path().join("layers/sha256"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    }
}

impl Default for Caisson {
    fn default() -> Self {
        Self::new()
    }
}

/// A loopback port free now, and never handed out before in this test process: the port is
/// released before its user binds it, and the kernel may give the same one to a concurrent
/// test's `bind(0)` meanwhile (two clusters' masters on one port: one test then talks to the
/// other's master).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A real `docker-registry` (distribution 2.8) on a free loopback port.
pub struct Registry {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        Self::start_with_auth(None)
    }

    /// With `Some((user, pass))`, the registry requires basic auth (bcrypt htpasswd).
    pub fn start_with_auth(auth: Option<(&str, &str)>) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = auth {
            let out = run(Command::new("htpasswd").args(["-Bbn", user, pass]))?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, &out.stdout)?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: caisson-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry")?;
        let reg = Registry {
            addr,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&reg.addr).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not start on {}", reg.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(reg)
    }

    /// Pushes an image with skopeo (`format`: "oci" or "v2s2").
    pub fn push(&self, src: &str, repo_tag: &str, format: &str, creds: Option<&str>) -> Result<()> {
        let mut c = Command::new("skopeo");
        c.args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--format",
            format,
        ]);
        if let Some(creds) = creds {
            c.args(["--dest-creds", creds]);
        }
        c.arg(src).arg(format!("docker://{}/{repo_tag}", self.addr));
        run(&mut c)?;
        Ok(())
    }
}

impl Drop for Caisson {
    fn drop(&mut self) {
        // Tasks a test left behind (an exited task without --rm keeps its overlay root
        // mounted until `rm`) are removed, so that the temp root goes without leaving mounts.
        let left = std::fs::read_dir(self.root.path().join("containers"))
            .is_ok_and(|mut d| d.next().is_some());
        if left {
            let _ = self.cmd().args(["rm", "-f", "--all"]).output();
        }
        // The store's volatile networking dir (/run/caisson/net/stores/<hash>): empty once its
        // tasks are gone; a netns still pinned there (a leak) makes this fail, and stays.
        let _ = std::fs::remove_dir_all(containerizer::net::volatile_dir(self.root.path()));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OCI image layout built with umoci from busybox-static: `/bin/busybox` plus applet links,
/// config with `Cmd ["/bin/sh"]`, `Env PATH=/bin`. Returns the layout dir (tag `tag`).
pub fn busybox_layout(parent: &Path, tag: &str) -> Result<PathBuf> {
    let layout = parent.join("oci");
    if !layout.join("index.json").exists() {
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(&layout))?;
    }
    let img = format!("{}:{tag}", layout.display());
    run(Command::new("umoci").args(["new", "--image", &img]))?;
    let bundle = parent.join(format!("bundle-{tag}"));
    run(Command::new("umoci")
        .args(["unpack", "--image", &img])
        .arg(&bundle))?;
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy("/bin/busybox", bin.join("busybox"))?;
    for applet in [
        "sh", "ls", "cat", "echo", "true", "false", "sleep", "id", "hostname",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    std::fs::create_dir_all(bundle.join("rootfs/etc"))?;
    std::fs::write(bundle.join("rootfs/etc/motd"), "hello from caisson tests\n")?;
    run(Command::new("umoci")
        .args(["repack", "--image", &img])
        .arg(&bundle))?;
    run(Command::new("umoci").args([
        "config",
        "--image",
        &img,
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "PATH=/bin",
        "--config.workingdir",
        "/",
    ]))?;
    std::fs::remove_dir_all(&bundle)?;
    Ok(layout)
}

/// A state root with [`busybox_layout`]'s image loaded as `localhost/oci:latest`, and the
/// work dir holding its layout; `None` where a root-only test may skip (see [`require_root`]).
pub fn busybox_store() -> Option<(Caisson, tempfile::TempDir)> {
    if !require_root() || !require_tool("umoci") {
        return None;
    }
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), "latest").unwrap();
    let c = Caisson::new();
    let (code, out, err) = c.run(&["load", "-q", "-i", &format!("{}:latest", layout.display())]);
    assert_eq!(code, 0, "load: {out}{err}");
    Some((c, work))
}

/// Adds a layer to `layout:tag` with umoci: runs `change` on the unpacked rootfs, then repacks.
pub fn umoci_layer(
    layout: &Path,
    tag: &str,
    change: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let img = format!("{}:{tag}", layout.display());
    let bundle = layout.with_file_name(format!("bundle-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bundle);
    run(Command::new("umoci")
        .args(["unpack", "--image", &img])
        .arg(&bundle))?;
    change(&bundle.join("rootfs"))?;
    run(Command::new("umoci")
        .args(["repack", "--image", &img])
        .arg(&bundle))?;
    std::fs::remove_dir_all(&bundle)?;
    Ok(())
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// How a hand-made layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Writes blobs into an OCI layout by hand (for indexes and hostile layers).
pub struct LayoutWriter {
    pub dir: PathBuf,
}

impl LayoutWriter {
    pub fn new(dir: &Path) -> Result<LayoutWriter> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(LayoutWriter {
            dir: dir.to_path_buf(),
        })
    }

    pub fn blob(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let d = sha256(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), bytes)?;
        Ok((d, bytes.len() as u64))
    }

    /// Writes an image made of the given uncompressed layer tars (gzip-compressed here) and
    /// returns the manifest descriptor JSON.
    pub fn image(&self, layers: &[Vec<u8>], arch: &str, cmd: &[&str]) -> Result<serde_json::Value> {
        let layers: Vec<(Vec<u8>, Compression)> = layers
            .iter()
            .map(|l| (l.clone(), Compression::Gzip))
            .collect();
        self.image_with(&layers, arch, cmd)
    }

    /// Like [`LayoutWriter::image`], choosing each layer's compression.
    pub fn image_with(
        &self,
        layers: &[(Vec<u8>, Compression)],
        arch: &str,
        cmd: &[&str],
    ) -> Result<serde_json::Value> {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, compression) in layers {
            diff_ids.push(sha256(tar));
            let (blob, media_type) = match compression {
                Compression::None => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
                Compression::Gzip => {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(tar)?;
                    (gz.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
                }
                Compression::Zstd => (
                    zstd::encode_all(&tar[..], 3)?,
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                ),
            };
            let (d, size) = self.blob(&blob)?;
            descs.push(serde_json::json!({"mediaType": media_type, "digest": d, "size": size}));
        }
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (cd, cs) = self.blob(&serde_json::to_vec(&config)?)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": descs,
        });
        let (md, ms) = self.blob(&serde_json::to_vec(&manifest)?)?;
        Ok(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "platform": {"os": "linux", "architecture": arch},
        }))
    }

    /// Writes `index.json` listing `manifests` under `tag`, or under an image index blob when
    /// `nested` (what `skopeo copy --all` needs to push a multi-platform image).
    /// A `wasi/wasm` image (podman's and crun's convention): one gzip layer holding `module` at
    /// `path` (e.g. `/app/hello.wasm`, the entrypoint), `env` in its config. Returns the
    /// manifest's descriptor (for [`LayoutWriter::index`]).
    pub fn wasi_image(&self, path: &str, module: &[u8], env: &[&str]) -> Result<serde_json::Value> {
        let rel = path.trim_start_matches('/');
        let mut tar = RawTar::new();
        if let Some((dir, _)) = rel.rsplit_once('/') {
            tar = tar.dir(dir);
        }
        let tar = tar.file(rel, module).finish();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar)?;
        let (ld, ls) = self.blob(&gz.finish()?)?;
        let config = serde_json::json!({"architecture": "wasm", "os": "wasi",
            "config": {"Entrypoint": [path], "Env": env},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]}});
        let (cd, cs) = self.blob(&serde_json::to_vec(&config)?)?;
        let manifest = serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]});
        let (md, ms) = self.blob(&serde_json::to_vec(&manifest)?)?;
        Ok(
            serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms, "platform": {"os": "wasi", "architecture": "wasm"}}),
        )
    }

    pub fn index(&self, manifests: Vec<serde_json::Value>, tag: &str, nested: bool) -> Result<()> {
        let top = if nested {
            let inner = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests,
            });
            let (d, s) = self.blob(&serde_json::to_vec(&inner)?)?;
            vec![serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": d, "size": s,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            })]
        } else {
            manifests
                .into_iter()
                .map(|mut m| {
                    m["annotations"] =
                        serde_json::json!({"org.opencontainers.image.ref.name": tag});
                    m
                })
                .collect()
        };
        let index = serde_json::json!({"schemaVersion": 2, "manifests": top});
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// A tar built entry by entry, including entries `tar::Builder` refuses (`..`, absolute).
pub struct RawTar {
    buf: Vec<u8>,
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar { buf: Vec::new() }
    }

    fn header(name: &str, kind: tar::EntryType, size: u64, link: Option<&str>) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        // Write the name bytes directly so hostile names are kept as they are.
        let raw = h.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            raw.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    pub fn file(mut self, name: &str, data: &[u8]) -> Self {
        let h = Self::header(name, tar::EntryType::Regular, data.len() as u64, None);
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn dir(mut self, name: &str) -> Self {
        let h = Self::header(name, tar::EntryType::Directory, 0, None);
        self.buf.extend_from_slice(h.as_bytes());
        self
    }

    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        let h = Self::header(name, tar::EntryType::Symlink, 0, Some(target));
        self.buf.extend_from_slice(h.as_bytes());
        self
    }

    pub fn hardlink(mut self, name: &str, target: &str) -> Self {
        let h = Self::header(name, tar::EntryType::Link, 0, Some(target));
        self.buf.extend_from_slice(h.as_bytes());
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0u8, 1024));
        self.buf
    }
}

impl Default for RawTar {
    fn default() -> Self {
        Self::new()
    }
}

/// Every file below `dir` (recursively); empty when `dir` does not exist.
pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Builds the Wasm guest crate `tests/guests/<name>` for `target` (release, into
/// `target/wasm-guests`) and returns `artifact` in its output; `None` (skip) when it cannot be
/// built, a failure under CI.
pub fn build_guest(name: &str, target: &str, artifact: &str) -> Option<PathBuf> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target_dir = ws.join("target/wasm-guests");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "--target", target])
        .arg("--manifest-path")
        .arg(ws.join("tests/guests").join(name).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if std::env::var_os("CI").is_some() {
            panic!("building the {target} guest {name} failed: {err}");
        }
        eprintln!("skipping: cannot build the {target} guest {name}: {err}");
        return None;
    }
    Some(target_dir.join(target).join("release").join(artifact))
}

/// One HTTP/1.0 GET over loopback; the whole response (head and body), or `None` when the
/// port does not answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after 20 s.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The names in `dir` (none if it cannot be read).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
