//! Puts a hash of this crate's sources into the plugins' identity (see `src/identity.rs`), so
//! that a runtime runs a plugin binary's code in-process only when it links the very same code.
use std::hash::{Hash, Hasher};
use std::path::Path;

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            visit(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

fn main() {
    let mut files = vec![];
    visit(Path::new("src"), &mut files);
    files.push("Cargo.toml".into());
    files.sort();
    // SipHash with fixed keys: the same sources give the same value on every build.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    for f in &files {
        f.to_string_lossy().hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    println!(
        "cargo:rustc-env=CAISSON_CNI_SOURCE_HASH={:016x}",
        h.finish()
    );
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
}
