//! End-to-end image tests: a real docker-registry, images made by umoci/skopeo from
//! busybox-static, and the real `caisson` binary.
use caisson_tests::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn tools() -> bool {
    ["umoci", "skopeo", "docker-registry", "htpasswd"]
        .iter()
        .all(|t| require_tool(t))
}

/// Checks a busybox rootfs layer file by file.
fn assert_busybox_tree(dir: &Path) {
    let bb = dir.join("bin/busybox");
    let host = fs::metadata("/bin/busybox").unwrap();
    let m = fs::metadata(&bb).unwrap();
    assert_eq!(m.len(), host.len(), "busybox size");
    assert_eq!(fs::read(&bb).unwrap(), fs::read("/bin/busybox").unwrap());
    assert!(m.permissions().mode() & 0o111 != 0, "busybox executable");
    assert_eq!(
        fs::read_link(dir.join("bin/sh")).unwrap().to_str(),
        Some("busybox")
    );
    assert_eq!(
        fs::read_to_string(dir.join("etc/motd")).unwrap(),
        "hello from caisson tests\n"
    );
    if nix::unistd::Uid::effective().is_root() {
        assert_eq!((m.uid(), m.gid()), (0, 0));
    }
}

#[test]
fn pull_oci_and_docker_v2s2_from_a_real_registry() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "latest").unwrap();
    let reg = Registry::start().unwrap();
    let src = format!("oci:{}:latest", layout.display());
    reg.push(&src, "test/busybox:oci", "oci", None).unwrap();
    reg.push(&src, "test/busybox:v2s2", "v2s2", None).unwrap();

    let c = Caisson::new();
    let oci = format!("{}/test/busybox:oci", reg.addr);
    let v2 = format!("{}/test/busybox:v2s2", reg.addr);
    let id1 = c.ok(&["pull", &oci]);
    let i1 = c.inspect(&oci);
    assert_eq!(
        i1["ManifestMediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let id2 = c.ok(&["pull", &v2]);
    assert_eq!(id1, id2, "same config, same image id");
    // One layer on disk, shared by both tags.
    assert_eq!(c.layer_count(), 1);
    assert!(c.tmp_entries().is_empty(), "tmp: {:?}", c.tmp_entries());

    assert_eq!(i1["Config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(i1["Config"]["Env"], serde_json::json!(["PATH=/bin"]));
    assert_eq!(i1["Platform"], "linux/amd64");
    let i2 = c.inspect(&v2);
    assert_eq!(
        i2["ManifestMediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let tags = i2["RepoTags"].as_array().unwrap();
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert_busybox_tree(&c.layer_dir(&oci, 0));

    // By digest, from what the registry reported.
    let repo_digest = i1["RepoDigests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d.as_str().unwrap().contains("@sha256:"))
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let c2 = Caisson::new();
    c2.ok(&["pull", &repo_digest]);
    assert_eq!(c2.inspect(&repo_digest)["Id"], i1["Id"]);

    // rmi: one tag goes, the image stays; the last tag takes image and layer with it.
    c.ok(&["rmi", &oci]);
    assert_eq!(c.layer_count(), 1);
    assert_eq!(c.images_json().len(), 1);
    c.ok(&["rmi", &v2]);
    assert_eq!(c.images_json().len(), 0);
    assert_eq!(c.layer_count(), 0);
    let (code, _, err) = c.run(&["rmi", &v2]);
    assert_eq!(code, 1);
    assert!(err.contains("not known"), "{err}");

    // Unknown image and unknown registry host: clear errors, exit 125.
    let (code, _, err) = c.run(&["pull", &format!("{}/test/nope:1", reg.addr)]);
    assert_eq!(code, 125);
    assert!(
        err.contains("not found") && err.contains("test/nope"),
        "{err}"
    );
}

#[test]
fn multi_platform_index_selects_host_or_requested_platform() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = LayoutWriter::new(&tmp.path().join("multi")).unwrap();
    let amd = w
        .image(
            &[RawTar::new().file("arch", b"amd64\n").finish()],
            "amd64",
            &["/arch"],
        )
        .unwrap();
    let arm = w
        .image(
            &[RawTar::new().file("arch", b"arm64\n").finish()],
            "arm64",
            &["/arch"],
        )
        .unwrap();
    w.index(vec![amd, arm], "multi", true).unwrap();
    let reg = Registry::start().unwrap();
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", w.dir.display()),
        &format!("docker://{}/test/multi:1", reg.addr),
    ]))
    .unwrap();
    let name = format!("{}/test/multi:1", reg.addr);
    let c = Caisson::new();
    c.ok(&["pull", &name]);
    let dir = c.layer_dir(&name, 0);
    assert_eq!(fs::read_to_string(dir.join("arch")).unwrap(), "amd64\n");
    assert_eq!(c.inspect(&name)["Platform"], "linux/amd64");

    let c2 = Caisson::new();
    c2.ok(&["pull", "--platform", "linux/arm64", &name]);
    assert_eq!(c2.inspect(&name)["Platform"], "linux/arm64");
    let dir = c2.layer_dir(&name, 0);
    assert_eq!(fs::read_to_string(dir.join("arch")).unwrap(), "arm64\n");

    let (code, _, err) = c2.run(&["pull", "--platform", "linux/s390x", &name]);
    assert_eq!(code, 125);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );
    let (code, _, err) = c2.run(&["pull", "--platform", "linux", &name]);
    assert_eq!(code, 125);
    assert!(err.contains("os/arch"), "{err}");
}

#[test]
fn whiteouts_from_umoci_layers_become_overlay_whiteouts() {
    if !tools() || !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "wh").unwrap();
    umoci_layer(&layout, "wh", |root| {
        fs::create_dir_all(root.join("data/keep"))?;
        fs::write(root.join("data/gone"), "x")?;
        fs::write(root.join("data/keep/file"), "y")?;
        fs::hard_link(root.join("data/keep/file"), root.join("data/keep/link"))?;
        Ok(())
    })
    .unwrap();
    umoci_layer(&layout, "wh", |root| {
        fs::remove_file(root.join("data/gone"))?;
        fs::remove_file(root.join("etc/motd"))?;
        Ok(())
    })
    .unwrap();
    let c = Caisson::new();
    c.ok(&["load", "-i", &format!("{}:wh", layout.display())]);
    let name = "localhost/oci:wh";
    let v = c.inspect(name);
    assert_eq!(v["Layers"].as_array().unwrap().len(), 3);
    let l1 = c.layer_dir(name, 1);
    let a = fs::metadata(l1.join("data/keep/file")).unwrap();
    let b = fs::metadata(l1.join("data/keep/link")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard link preserved");
    let l2 = c.layer_dir(name, 2);
    for gone in ["data/gone", "etc/motd"] {
        let m = fs::symlink_metadata(l2.join(gone)).unwrap();
        assert!(
            m.file_type().is_char_device(),
            "{gone} is a whiteout device"
        );
        assert_eq!(m.rdev(), 0, "{gone} is 0:0");
    }
    assert!(!l2.join("data/.wh.gone").exists());
}

#[test]
fn docker_archive_oci_archive_and_layout_load_the_same_image() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "latest").unwrap();
    let src = format!("oci:{}:latest", layout.display());
    let docker_tar = tmp.path().join("docker.tar");
    let oci_tar = tmp.path().join("oci.tar");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &src,
        &format!(
            "docker-archive:{}:example.com/team/bb:1.0",
            docker_tar.display()
        ),
    ]))
    .unwrap();
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &src,
        &format!("oci-archive:{}:2.0", oci_tar.display()),
    ]))
    .unwrap();
    // A gzip-compressed docker archive too (`docker save | gzip`).
    let gz_tar = tmp.path().join("docker.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(
        fs::File::create(&gz_tar).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::copy(&mut fs::File::open(&docker_tar).unwrap(), &mut enc).unwrap();
    enc.finish().unwrap();

    let c = Caisson::new();
    let out = c.ok(&["load", "-i", docker_tar.to_str().unwrap()]);
    assert!(out.contains("example.com/team/bb:1.0"), "{out}");
    assert_busybox_tree(&c.layer_dir("example.com/team/bb:1.0", 0));
    let out = c.ok(&["load", "-i", oci_tar.to_str().unwrap()]);
    assert!(out.contains("localhost/oci:2.0"), "{out}");
    c.ok(&["load", "-i", &format!("{}:latest", layout.display())]);
    let c2 = Caisson::new();
    c2.ok(&["load", "-i", gz_tar.to_str().unwrap()]);
    assert_busybox_tree(&c2.layer_dir("example.com/team/bb:1.0", 0));
    // All three are one image with one layer.
    let images = c.images_json();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0]["Names"].as_array().unwrap().len(), 3);
    assert_eq!(c.layer_count(), 1);
    assert!(c.tmp_entries().is_empty(), "tmp: {:?}", c.tmp_entries());

    // Bad inputs: missing path, not an archive, a tag the layout lacks.
    let junk = tmp.path().join("junk.tar");
    fs::write(&junk, b"this is not a tar").unwrap();
    for (input, want) in [
        ("/nonexistent/x.tar".to_string(), "cannot read"),
        (junk.display().to_string(), "junk.tar"),
        (format!("{}:nosuchtag", layout.display()), "nosuchtag"),
    ] {
        let (code, _, err) = c.run(&["load", "-i", &input]);
        assert_eq!(code, 125, "{input}");
        assert!(err.contains(want), "{input}: {err}");
    }
}

#[test]
fn basic_auth_registry_with_creds_and_auth_file() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "latest").unwrap();
    let reg = Registry::start_with_auth(Some(("alice", "s3cret"))).unwrap();
    reg.push(
        &format!("oci:{}:latest", layout.display()),
        "private/bb:1",
        "oci",
        Some("alice:s3cret"),
    )
    .unwrap();
    let name = format!("{}/private/bb:1", reg.addr);
    let c = Caisson::new();
    let (code, _, err) = c.run(&["pull", &name]);
    assert_eq!(code, 125);
    assert!(err.to_lowercase().contains("auth"), "{err}");
    let (code, _, err) = c.run(&["pull", "--creds", "alice:wrong", &name]);
    assert_eq!(code, 125, "{err}");
    c.ok(&["pull", "--creds", "alice:s3cret", &name]);

    // containers' auth.json via $REGISTRY_AUTH_FILE.
    let auth = tmp.path().join("auth.json");
    let b64 = {
        use std::io::Write;
        let mut out = Vec::new();
        let mut enc = base64_encoder(&mut out);
        enc.write_all(b"alice:s3cret").unwrap();
        drop(enc);
        String::from_utf8(out).unwrap()
    };
    fs::write(
        &auth,
        format!(r#"{{"auths":{{"{}":{{"auth":"{b64}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let c2 = Caisson::new();
    let out = c2
        .cmd()
        .args(["pull", &name])
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Minimal base64 (standard alphabet) for the auth file, to keep test deps small.
fn base64_encoder(out: &mut Vec<u8>) -> impl std::io::Write + '_ {
    struct Enc<'a>(&'a mut Vec<u8>, Vec<u8>);
    impl std::io::Write for Enc<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Drop for Enc<'_> {
        fn drop(&mut self) {
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            for chunk in self.1.chunks(3) {
                let n = chunk.len();
                let v = (chunk[0] as u32) << 16
                    | (*chunk.get(1).unwrap_or(&0) as u32) << 8
                    | *chunk.get(2).unwrap_or(&0) as u32;
                for i in 0..4 {
                    if i <= n {
                        self.0.push(A[((v >> (18 - 6 * i)) & 63) as usize]);
                    } else {
                        self.0.push(b'=');
                    }
                }
            }
        }
    }
    Enc(out, Vec::new())
}

/// A fake registry that answers every request with `response`, or never answers.
fn fake_registry(response: Option<&'static str>) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            if let Some(r) = response {
                use std::io::{Read, Write};
                let mut s = s;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(r.as_bytes());
            } else {
                held.push(s);
            }
        }
    });
    addr
}

#[test]
fn registry_errors_and_hangs_are_clear_and_bounded() {
    let c = Caisson::new();
    let addr = fake_registry(Some(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\noops",
    ));
    let (code, _, err) = c.run(&["pull", &format!("{addr}/x/y:1")]);
    assert_eq!(code, 125);
    assert!(err.contains("500"), "{err}");

    let addr = fake_registry(None);
    let t = Instant::now();
    let (code, _, err) = c.run(&["pull", "--timeout", "1", &format!("{addr}/x/y:1")]);
    assert_eq!(code, 125);
    assert!(t.elapsed() < Duration::from_secs(20), "timeout honoured");
    assert!(
        err.contains("in time") || err.contains("timed out"),
        "{err}"
    );

    // Nothing listening.
    let port = free_port();
    let (code, _, err) = c.run(&["pull", &format!("127.0.0.1:{port}/x/y:1")]);
    assert_eq!(code, 125);
    assert!(err.contains("connect"), "{err}");
    assert_eq!(c.images_json().len(), 0);
}

/// Hostile or corrupt layers are refused naming image, layer and entry, and leave nothing.
#[test]
fn hostile_and_corrupt_layers_are_refused_and_leave_nothing() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            RawTar::new().file("../evil", b"x").finish(),
            "../evil",
        ),
        (
            "absolute",
            RawTar::new().file("/evil", b"x").finish(),
            "/evil",
        ),
        (
            "symlink-escape",
            RawTar::new()
                .symlink("link", "/tmp")
                .file("link/evil", b"x")
                .finish(),
            "link/evil",
        ),
        (
            "hardlink-outside",
            RawTar::new().hardlink("h", "/etc/passwd").finish(),
            "h",
        ),
    ];
    for (name, tar, entry) in cases {
        let dir = tmp.path().join(name);
        let w = LayoutWriter::new(&dir).unwrap();
        let ok_layer = RawTar::new().file("fine", b"ok").finish();
        let m = w.image(&[ok_layer, tar], "amd64", &["/x"]).unwrap();
        w.index(vec![m], "t", false).unwrap();
        let c = Caisson::new();
        let (code, _, err) = c.run(&["load", "-i", dir.to_str().unwrap()]);
        assert_eq!(code, 125, "{name}");
        assert!(err.contains(entry), "{name}: {err}");
        assert!(err.contains("localhost/"), "{name} names the image: {err}");
        assert!(
            err.contains("layer sha256:"),
            "{name} names the layer: {err}"
        );
        assert_eq!(c.images_json().len(), 0, "{name}");
        assert!(
            c.tmp_entries().is_empty(),
            "{name}: tmp {:?}",
            c.tmp_entries()
        );
        assert!(!tmp.path().join("evil").exists() && !Path::new("/evil").exists());
        assert!(!Path::new("/tmp/evil").exists());
    }

    // A corrupt blob: flip a byte of the layer blob.
    let dir = tmp.path().join("corrupt");
    let w = LayoutWriter::new(&dir).unwrap();
    let m = w
        .image(
            &[RawTar::new().file("f", &[7u8; 10000]).finish()],
            "amd64",
            &["/x"],
        )
        .unwrap();
    w.index(vec![m.clone()], "t", false).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(
            dir.join("blobs/sha256")
                .join(&m["digest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = dir
        .join("blobs/sha256")
        .join(&manifest["layers"][0]["digest"].as_str().unwrap()[7..]);
    let mut bytes = fs::read(&layer).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    fs::write(&layer, &bytes).unwrap();
    let c = Caisson::new();
    let (code, _, err) = c.run(&["load", "-i", dir.to_str().unwrap()]);
    assert_eq!(code, 125);
    assert!(
        err.contains("layer sha256:") || err.contains("blob sha256:"),
        "{err}"
    );
    assert_eq!(c.layer_count(), 0);
    assert!(c.tmp_entries().is_empty());

    // A truncated blob.
    bytes.truncate(n / 2);
    fs::write(&layer, &bytes).unwrap();
    let (code, _, err) = c.run(&["load", "-i", dir.to_str().unwrap()]);
    assert_eq!(code, 125, "{err}");
    assert_eq!(c.layer_count(), 0);

    // A decompression bomb: 64 MiB of zeros, bounded at 8 MiB.
    let dir = tmp.path().join("bomb");
    let w = LayoutWriter::new(&dir).unwrap();
    let zeros = vec![0u8; 64 << 20];
    let m = w
        .image(
            &[RawTar::new().file("zeros", &zeros).finish()],
            "amd64",
            &["/x"],
        )
        .unwrap();
    w.index(vec![m], "t", false).unwrap();
    let (code, _, err) = c.run(&[
        "load",
        "--max-layer-size",
        &(8u64 << 20).to_string(),
        "-i",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 125);
    assert!(
        err.to_lowercase().contains("size") || err.contains("bomb"),
        "{err}"
    );
    assert_eq!(c.layer_count(), 0);
    assert!(c.tmp_entries().is_empty());
}

/// kill -9 in the middle of a pull leaves nothing visible, and the next pull completes.
#[test]
fn pull_killed_midway_leaves_nothing_half_visible() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // ~48 MB of incompressible data in 3 layers, so the pull takes long enough to interrupt.
    let w = LayoutWriter::new(&tmp.path().join("big")).unwrap();
    let mut layers = Vec::new();
    for i in 0..3u64 {
        let mut data = vec![0u8; 16 << 20];
        let mut x = 0x9e3779b97f4a7c15u64 ^ i;
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        layers.push(RawTar::new().file(&format!("blob{i}"), &data).finish());
    }
    let m = w.image(&layers, "amd64", &["/x"]).unwrap();
    w.index(vec![m], "big", false).unwrap();
    let reg = Registry::start().unwrap();
    reg.push(
        &format!("oci:{}:big", w.dir.display()),
        "test/big:1",
        "oci",
        None,
    )
    .unwrap();
    let name = format!("{}/test/big:1", reg.addr);
    let c = Caisson::new();
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    // First kill: while the first layers are being unpacked into work dirs.
    let mut child = c.cmd().args(["pull", "-q", &name]).spawn().unwrap();
    wait_for("a work dir", &|| !c.tmp_entries().is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(c.images_json().is_empty(), "no image after a killed pull");
    // Second kill: after at least one layer was committed, before the image is recorded.
    let mut child = c.cmd().args(["pull", "-q", &name]).spawn().unwrap();
    wait_for("a committed layer", &|| c.layer_count() >= 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, out, _) = c.run(&["images", "--json"]);
    assert_eq!(code, 0);
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(
        v.is_empty() || c.layer_count() == 3,
        "image visible only when whole: {v:?}"
    );
    c.ok(&["pull", "-q", &name]);
    let v = c.inspect(&name);
    assert_eq!(v["Layers"].as_array().unwrap().len(), 3);
    for i in 0..3 {
        let f = c.layer_dir(&name, i).join(format!("blob{i}"));
        assert_eq!(fs::metadata(&f).unwrap().len(), 16 << 20);
    }
    assert!(
        c.tmp_entries().is_empty(),
        "stale work cleaned: {:?}",
        c.tmp_entries()
    );
    assert_eq!(c.layer_count(), 3);
}

/// What a load or pull unpacked is on disk when it returns (not only in the page cache, which
/// writes back up to 30 s later): a host crash after it cannot leave the store with an image
/// whose files are empty or short, which nothing would notice. Checked page by page with
/// `cachestat` on a store on a disk filesystem (the target dir: /tmp may be a tmpfs).
#[test]
fn unpacked_layers_are_on_disk_when_the_command_returns() {
    if !require_tool("umoci") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), "latest").unwrap();
    let c = Caisson {
        root: tempfile::Builder::new()
            .prefix("caisson-root")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap(),
    };
    let fs_type = nix::sys::statfs::statfs(c.root.path())
        .unwrap()
        .filesystem_type();
    assert!(
        fs_type != nix::sys::statfs::TMPFS_MAGIC,
        "{} is on a tmpfs: this test needs a disk filesystem",
        c.root.path().display()
    );
    c.ok(&["load", "-q", "-i", &format!("{}:latest", layout.display())]);
    let layers = c.root.path().join("layers/sha256");
    let files: Vec<_> = walk_files(&layers)
        .into_iter()
        .filter(|p| fs::symlink_metadata(p).unwrap().is_file())
        .collect();
    assert!(
        files.iter().any(|p| p.ends_with("bin/busybox")),
        "busybox unpacked: {files:?}"
    );
    let images = c.root.path().join("images");
    for p in files.iter().chain(&walk_files(&images)) {
        let f = fs::File::open(p).unwrap();
        let pages = containerizer::sys::unwritten_pages(&f)
            .unwrap_or_else(|e| panic!("cachestat {}: {e}", p.display()));
        assert_eq!(pages, 0, "{} has pages not yet on disk", p.display());
    }
}

#[test]
fn prune_removes_untagged_images_and_unused_layers() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = LayoutWriter::new(&tmp.path().join("p")).unwrap();
    let shared = RawTar::new().file("shared", b"s").finish();
    let a = w
        .image(
            &[shared.clone(), RawTar::new().file("a", b"a").finish()],
            "amd64",
            &["/a"],
        )
        .unwrap();
    w.index(vec![a], "a", false).unwrap();
    let c = Caisson::new();
    c.ok(&["load", "-i", w.dir.to_str().unwrap()]);
    let b = w
        .image(
            &[shared, RawTar::new().file("b", b"b").finish()],
            "amd64",
            &["/b"],
        )
        .unwrap();
    w.index(vec![b], "b", false).unwrap();
    c.ok(&["load", "-i", w.dir.to_str().unwrap()]);
    assert_eq!(c.layer_count(), 3, "shared layer stored once");
    c.ok(&["rmi", "localhost/p:a"]);
    assert_eq!(c.layer_count(), 2, "the shared layer stays");
    c.ok(&["image", "prune"]);
    assert_eq!(c.images_json().len(), 1);
    c.ok(&["rmi", "localhost/p:b"]);
    assert_eq!(c.layer_count(), 0);
    let blobs = fs::read_dir(c.root.path().join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0);
}

/// A pulled multi-layer image becomes an overlay root with the merged view (whiteouts applied,
/// writes in the upper dir), and the copy backend gives the same view; removal leaves no mount.
#[test]
fn pulled_image_becomes_overlay_and_copy_rootfs() {
    use containerizer::image::{rootfs, Store};
    if !tools() || !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "fs").unwrap();
    umoci_layer(&layout, "fs", |root| {
        fs::create_dir_all(root.join("data"))?;
        fs::write(root.join("data/gone"), "x")?;
        fs::write(root.join("data/kept"), "y")?;
        Ok(())
    })
    .unwrap();
    umoci_layer(&layout, "fs", |root| {
        fs::remove_file(root.join("data/gone"))?;
        fs::write(root.join("data/kept"), "z")?;
        Ok(())
    })
    .unwrap();
    let reg = Registry::start().unwrap();
    reg.push(
        &format!("oci:{}:fs", layout.display()),
        "t/fs:1",
        "v2s2",
        None,
    )
    .unwrap();
    let c = Caisson::new();
    let name = format!("{}/t/fs:1", reg.addr);
    c.ok(&["pull", &name]);

    let store = Store::open(c.root.path()).unwrap();
    let rec = store.resolve(&name).unwrap();
    let mut views = Vec::new();
    for (i, backend) in [rootfs::Backend::Overlay, rootfs::Backend::Copy]
        .into_iter()
        .enumerate()
    {
        let dir = c.root.path().join(format!("rootfs/c{i}"));
        fs::create_dir_all(&dir).unwrap();
        let opts = rootfs::CreateOptions {
            volatile: i == 0,
            ..Default::default()
        };
        let r = store.create_rootfs(&rec, &dir, backend, &opts).unwrap();
        assert!(
            !r.path.join("data/gone").exists(),
            "{backend:?}: whiteout applied"
        );
        assert_eq!(fs::read_to_string(r.path.join("data/kept")).unwrap(), "z");
        assert_busybox_tree(&r.path);
        fs::write(r.path.join("etc/new"), "w").unwrap();
        if let Some(upper) = &r.upper {
            assert_eq!(fs::read_to_string(upper.join("etc/new")).unwrap(), "w");
        }
        let mut names: Vec<String> = walk(&r.path);
        names.sort();
        views.push(names);
        // The image is in use while the container exists.
        let (code, _, err) = c.run(&["rmi", &name]);
        assert_eq!(code, 1);
        assert!(err.contains("in use"), "{err}");
        rootfs::remove(&dir).unwrap();
        assert!(!dir.exists());
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(c.root.path().to_str().unwrap()),
            "mount leaked"
        );
    }
    assert_eq!(views[0], views[1], "overlay and copy show the same tree");
    c.ok(&["rmi", &name]);
    assert_eq!(c.layer_count(), 0);
}

/// A task root of an image gets the image's init layer on top from the second root on: the
/// mount points a task needs (/proc, /dev, /sys, /mnt/sandbox, the /etc files) exist without
/// anything created in the root's upper dir. What the image has as another kind (an /etc that
/// is a symlink) is left alone; the init layers go with their images.
#[test]
fn init_layer_holds_task_mount_points_and_goes_with_the_image() {
    use containerizer::image::{rootfs, store, Store};
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = LayoutWriter::new(&tmp.path().join("plain")).unwrap();
    let plain = w
        .image_with(
            &[(
                RawTar::new()
                    .dir("bin")
                    .file("bin/x", b"x")
                    .dir("etc")
                    .file("etc/hosts", b"image hosts")
                    .finish(),
                Compression::None,
            )],
            "amd64",
            &["/bin/x"],
        )
        .unwrap();
    w.index(vec![plain], "plain", false).unwrap();
    let c = Caisson::new();
    c.ok(&["load", "-i", w.dir.to_str().unwrap()]);
    let w2 = LayoutWriter::new(&tmp.path().join("linked")).unwrap();
    let linked = w2
        .image_with(
            &[(
                RawTar::new()
                    .dir("usr")
                    .dir("usr/etc")
                    .symlink("etc", "usr/etc")
                    .finish(),
                Compression::None,
            )],
            "amd64",
            &["/bin/x"],
        )
        .unwrap();
    w2.index(vec![linked], "linked", false).unwrap();
    c.ok(&["load", "-i", w2.dir.to_str().unwrap()]);

    let st = Store::open(c.root.path()).unwrap();
    let opts = rootfs::CreateOptions::task_root();
    let root_of = |image: &str, n: &str| {
        let rec = st.resolve(image).unwrap();
        let dir = c.root.path().join("rootfs").join(n);
        fs::create_dir_all(&dir).unwrap();
        let r = st
            .create_rootfs(&rec, &dir, rootfs::Backend::Overlay, &opts)
            .unwrap();
        (rec, dir, r)
    };
    let (rec, d1, first) = root_of("localhost/plain:plain", "a1");
    let init = c
        .root
        .path()
        .join(store::INIT_LAYERS)
        .join(&rec.id["sha256:".len()..]);
    let mut made: Vec<String> = walk(&init);
    made.sort();
    assert_eq!(
        made,
        [
            "dev",
            "etc",
            "etc/hostname",
            "etc/hosts",
            "etc/resolv.conf",
            "mnt",
            "mnt/sandbox",
            "proc",
            "sys"
        ],
        "init layer of the plain image"
    );
    // The first root went without (it was the model); the second has it.
    assert!(!first.path.join("proc").exists());
    let (_, d2, second) = root_of("localhost/plain:plain", "a2");
    for p in ["proc", "dev", "sys", "mnt/sandbox"] {
        assert!(second.path.join(p).is_dir(), "{p} in the second root");
    }
    assert!(second.path.join("etc/resolv.conf").is_file());
    assert_eq!(fs::read(second.path.join("bin/x")).unwrap(), b"x");
    assert!(
        walk(second.upper.as_ref().unwrap()).is_empty(),
        "nothing made in the upper dir"
    );

    let (rec2, d3, _) = root_of("localhost/linked:linked", "b1");
    let init2 = c
        .root
        .path()
        .join(store::INIT_LAYERS)
        .join(&rec2.id["sha256:".len()..]);
    let mut made2 = walk(&init2);
    made2.sort();
    assert_eq!(made2, ["dev", "mnt", "mnt/sandbox", "proc", "sys"]);
    let (_, d4, linked_root) = root_of("localhost/linked:linked", "b2");
    assert!(fs::symlink_metadata(linked_root.path.join("etc"))
        .unwrap()
        .file_type()
        .is_symlink());

    for d in [d1, d2, d3, d4] {
        rootfs::remove(&d).unwrap();
    }
    c.ok(&["rmi", "localhost/plain:plain"]);
    assert!(!init.exists(), "init layer removed with its image");
    assert!(init2.exists(), "the other image's stays");
    c.ok(&["rmi", "localhost/linked:linked"]);
    assert!(!init2.exists());
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// gzip, zstd and uncompressed layers in one image, loaded from a layout and pulled from a
/// real registry.
#[test]
fn gzip_zstd_and_plain_layers() {
    if !tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = LayoutWriter::new(&tmp.path().join("mixed")).unwrap();
    let m = w
        .image_with(
            &[
                (
                    RawTar::new().dir("d").file("d/gz", b"gzip layer").finish(),
                    Compression::Gzip,
                ),
                (
                    RawTar::new().file("d/zst", b"zstd layer").finish(),
                    Compression::Zstd,
                ),
                (
                    RawTar::new().file("d/plain", b"plain layer").finish(),
                    Compression::None,
                ),
            ],
            "amd64",
            &["/x"],
        )
        .unwrap();
    w.index(vec![m], "mixed", false).unwrap();
    // From the layout as written (skopeo recompresses a plain layer when it pushes)...
    let c = Caisson::new();
    c.ok(&["load", "-i", w.dir.to_str().unwrap()]);
    let loaded = "localhost/mixed:mixed".to_string();
    let layers = c.inspect(&loaded)["Layers"].clone();
    let types: Vec<&str> = layers
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["media_type"].as_str().unwrap())
        .collect();
    assert!(
        types[1].ends_with("+zstd") && types[2].ends_with(".tar"),
        "{types:?}"
    );
    // ...and through a registry.
    let reg = Registry::start().unwrap();
    reg.push(
        &format!("oci:{}:mixed", w.dir.display()),
        "t/mixed:1",
        "oci",
        None,
    )
    .unwrap();
    let c2 = Caisson::new();
    let pulled = format!("{}/t/mixed:1", reg.addr);
    c2.ok(&["pull", &pulled]);
    let files = [
        ("d/gz", "gzip layer"),
        ("d/zst", "zstd layer"),
        ("d/plain", "plain layer"),
    ];
    for (c, name) in [(&c, &loaded), (&c2, &pulled)] {
        for (i, (f, want)) in files.iter().enumerate() {
            assert_eq!(
                fs::read_to_string(c.layer_dir(name, i).join(f)).unwrap(),
                *want
            );
        }
    }
}
