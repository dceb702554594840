//! Where a Wasm program comes from: a file, bytes, an unpacked `wasi/wasm` image, or an OCI Wasm
//! artifact layer; and how to tell what kind of Wasm some bytes are.
use super::{Error, Result};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// OCI layer media types whose blob is the Wasm module itself (the containerd/runwasi convention
/// and the CNCF Wasm artifact layout).
pub const WASM_LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/wasm",
];
/// Config media type of a CNCF Wasm OCI artifact.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";

/// A program to load: a `.wasm` or `.wat` file, or bytes (binary or text) with a name for
/// messages.
#[derive(Debug, Clone)]
pub enum Source {
    Path(PathBuf),
    Bytes { name: String, bytes: Arc<[u8]> },
}

impl Source {
    pub fn path(p: impl Into<PathBuf>) -> Self {
        Source::Path(p.into())
    }
    pub fn bytes(name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Self {
        Source::Bytes {
            name: name.into(),
            bytes: bytes.into(),
        }
    }
    /// The name used in messages.
    pub fn name(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Bytes { name, .. } => name.clone(),
        }
    }
}

/// What some bytes are, judged from their header only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    /// A core module (`\0asm`, version 1).
    Module,
    /// A component (`\0asm`, layer 1).
    Component,
    /// WebAssembly text (`.wat`): a module or component, decided after parsing.
    Text,
}

/// Classifies `bytes` by their first bytes (8 are enough), or `None` if they are not Wasm.
/// Cheap enough to decide whether `caisson run FILE` is a Wasm task.
pub fn sniff(bytes: &[u8]) -> Option<WasmKind> {
    if bytes.starts_with(b"\0asm") {
        return match bytes.get(4..8) {
            Some([1, 0, 0, 0]) => Some(WasmKind::Module),
            Some([_, _, 1, 0]) => Some(WasmKind::Component),
            // Some other binary version: still Wasm, `load` explains what is wrong.
            _ => Some(WasmKind::Module),
        };
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
    let mut rest = text.trim_start();
    // Skip line comments before the first form.
    while let Some(r) = rest.strip_prefix(";;") {
        rest = r.split_once('\n').map_or("", |(_, r)| r).trim_start();
    }
    (rest.starts_with("(module") || rest.starts_with("(component") || rest.starts_with("(;"))
        .then_some(WasmKind::Text)
}

/// Whether an image platform is Wasm (`wasi/wasm`, as podman/crun and Docker label them).
pub fn is_wasm_platform(os: &str, arch: &str) -> bool {
    os == "wasi" && matches!(arch, "wasm" | "wasm32" | "wasm64")
}

/// Whether an OCI layer media type carries a raw Wasm module.
pub fn is_wasm_layer_media_type(media_type: &str) -> bool {
    WASM_LAYER_MEDIA_TYPES.contains(&media_type)
}

/// The program carried by an OCI Wasm artifact layer (`application/vnd.wasm.content.layer.v1+wasm`
/// or `application/wasm`): the blob is the module. `name` is used in messages (e.g. the image
/// reference).
pub fn module_from_layer(name: &str, media_type: &str, bytes: Vec<u8>) -> Result<Source> {
    if !is_wasm_layer_media_type(media_type) {
        return Err(Error::Image(format!(
            "{name}: layer media type {media_type} is not a Wasm layer (expected one of {})",
            WASM_LAYER_MEDIA_TYPES.join(", ")
        )));
    }
    match sniff(&bytes) {
        Some(WasmKind::Module | WasmKind::Component) => Ok(Source::bytes(name, bytes)),
        _ => Err(Error::NotWasm {
            name: name.to_string(),
            reason: format!("the {media_type} layer does not start with the Wasm magic"),
        }),
    }
}

/// The program of a `wasi/wasm` image unpacked at `rootfs`: the first entrypoint element names the
/// module (podman/crun convention), resolved inside the rootfs (symlinks included, never
/// escaping it). Returns the source and the task's argv (the whole entrypoint + cmd, argv[0]
/// being the module path as written in the image).
pub fn module_from_rootfs(rootfs: &Path, entrypoint: &[String]) -> Result<(Source, Vec<String>)> {
    let first = entrypoint.first().ok_or_else(|| {
        Error::Image(format!(
            "{}: the image has no entrypoint or command naming its Wasm module",
            rootfs.display()
        ))
    })?;
    let path = resolve_in_root(rootfs, Path::new(first))?;
    let mut head = [0u8; 8];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        f.read(&mut head).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?
    };
    if sniff(&head[..n]).is_none() && path.extension().is_none_or(|e| e != "wat") {
        return Err(Error::NotWasm {
            name: first.clone(),
            reason: "the image entrypoint does not name a Wasm module".into(),
        });
    }
    Ok((Source::Path(path), entrypoint.to_vec()))
}

/// Resolves `path` (absolute or relative, as written in an image) inside `root`, following
/// symlinks as if `root` were `/`.
fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf> {
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut links = 0;
    while let Some(p) = pending.pop() {
        let mut comps: Vec<Component> = p.components().collect();
        comps.reverse();
        while let Some(c) = comps.pop() {
            match c {
                Component::RootDir => stack.clear(),
                Component::Prefix(_) | Component::CurDir => {}
                Component::ParentDir => {
                    stack.pop();
                }
                Component::Normal(name) => {
                    let mut here: PathBuf = root.to_path_buf();
                    here.extend(&stack);
                    here.push(name);
                    match std::fs::symlink_metadata(&here) {
                        Ok(m) if m.file_type().is_symlink() => {
                            links += 1;
                            if links > 40 {
                                return Err(Error::Image(format!(
                                    "{}: too many symlinks",
                                    path.display()
                                )));
                            }
                            let target = std::fs::read_link(&here).map_err(|source| Error::Io {
                                path: here.clone(),
                                source,
                            })?;
                            // Continue with the link target, then what was left of this path.
                            let rest: PathBuf = comps.iter().rev().collect();
                            pending.push(rest);
                            pending.push(target);
                            comps.clear();
                        }
                        _ => stack.push(name.to_os_string()),
                    }
                }
            }
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&stack);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_kinds() {
        assert_eq!(sniff(b"\0asm\x01\0\0\0"), Some(WasmKind::Module));
        assert_eq!(sniff(b"\0asm\x0d\0\x01\0"), Some(WasmKind::Component));
        assert_eq!(sniff(b"  ;; hi\n(module)"), Some(WasmKind::Text));
        assert_eq!(sniff(b"(component)"), Some(WasmKind::Text));
        assert_eq!(sniff(b"\x7fELF"), None);
        assert_eq!(sniff(b""), None);
    }

    #[test]
    fn rootfs_entrypoint_resolves_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("app")).unwrap();
        std::fs::write(root.join("app/hello.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::os::unix::fs::symlink("/app/hello.wasm", root.join("link.wasm")).unwrap();
        std::os::unix::fs::symlink("../../../app", root.join("up")).unwrap();
        let ep = |s: &str| vec![s.to_string(), "x".to_string()];
        let (src, argv) = module_from_rootfs(root, &ep("/app/hello.wasm")).unwrap();
        assert!(matches!(src, Source::Path(p) if p == root.join("app/hello.wasm")));
        assert_eq!(argv, ep("/app/hello.wasm"));
        let (src, _) = module_from_rootfs(root, &ep("/link.wasm")).unwrap();
        assert!(matches!(src, Source::Path(p) if p == root.join("app/hello.wasm")));
        // A link climbing above `/` stays inside the root.
        let (src, _) = module_from_rootfs(root, &ep("/up/hello.wasm")).unwrap();
        assert!(matches!(src, Source::Path(p) if p == root.join("app/hello.wasm")));
        let (src, _) = module_from_rootfs(root, &ep("../../app/hello.wasm")).unwrap();
        assert!(matches!(src, Source::Path(p) if p == root.join("app/hello.wasm")));
        assert!(module_from_rootfs(root, &[]).is_err());
        std::fs::write(root.join("sh"), b"#!/bin/sh\n").unwrap();
        assert!(matches!(
            module_from_rootfs(root, &ep("/sh")),
            Err(Error::NotWasm { .. })
        ));
    }

    #[test]
    fn layers() {
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        assert!(module_from_layer("img", "application/wasm", wasm.clone()).is_ok());
        assert!(
            module_from_layer("img", "application/vnd.wasm.content.layer.v1+wasm", wasm).is_ok()
        );
        assert!(matches!(
            module_from_layer("img", "application/wasm", b"nope".to_vec()),
            Err(Error::NotWasm { .. })
        ));
        assert!(matches!(
            module_from_layer("img", "application/vnd.oci.image.layer.v1.tar+gzip", vec![]),
            Err(Error::Image(_))
        ));
        assert!(is_wasm_platform("wasi", "wasm"));
        assert!(!is_wasm_platform("linux", "amd64"));
    }
}
