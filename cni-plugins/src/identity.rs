//! Which binaries are ours. Every plugin binary carries an ELF note (owner `caisson`, type 1)
//! naming this crate, its version, the on-disk formats it uses and a hash of its sources
//! ([`IDENTITY`]). A runtime or a
//! plugin that links this crate may then run such a binary's code in-process instead of
//! exec'ing it (see [`crate::plugins::by_type`]): the binary would run exactly this code, on the
//! same state files under the same locks, so only the fork+exec and the process start are saved.
//! Any other binary (another version of ours, the reference plugins, anything else) is exec'd as
//! the CNI specification says.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Crate, version, the version of our state formats (IPAM store, masquerade markers) and a hash
/// of the crate's sources (build.rs): equal identities mean the same code.
pub const IDENTITY: &str = concat!(
    "caisson-cni-plugins/",
    env!("CARGO_PKG_VERSION"),
    "/1/",
    env!("CAISSON_CNI_SOURCE_HASH")
);

const NOTE_NAME: &[u8] = b"caisson\0";
const NOTE_TYPE: u32 = 1;
const DESC_LEN: usize = IDENTITY.len().div_ceil(4) * 4;

/// The note's layout in the file (ELF note: sizes and type, then name and description, each
/// padded to 4 bytes).
#[repr(C)]
pub struct Note {
    namesz: u32,
    descsz: u32,
    ty: u32,
    name: [u8; 8],
    desc: [u8; DESC_LEN],
}

const fn desc() -> [u8; DESC_LEN] {
    let mut d = [0u8; DESC_LEN];
    let b = IDENTITY.as_bytes();
    let mut i = 0;
    while i < b.len() {
        d[i] = b[i];
        i += 1;
    }
    d
}

/// The note of this build; [`plugin_main!`](crate::plugin_main) places it in a binary.
pub const NOTE: Note = Note {
    namesz: NOTE_NAME.len() as u32,
    descsz: IDENTITY.len() as u32,
    ty: NOTE_TYPE,
    name: *b"caisson\0",
    desc: desc(),
};

/// A plugin binary's `main`: the identity note (a `.note.*` section, which the linker puts in
/// the PT_NOTE segment near the start of the file, kept by `strip`) and [`crate::run`].
#[macro_export]
macro_rules! plugin_main {
    ($main:expr) => {
        #[used]
        #[link_section = ".note.caisson-cni"]
        static CAISSON_CNI_NOTE: $crate::identity::Note = $crate::identity::NOTE;
        fn main() {
            $main
        }
    };
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// True if `path` is one of our plugin binaries built from the same sources (see the module
/// docs). Reads the ELF
/// header, the program headers and the PT_NOTE segments: a few small reads. Anything unexpected
/// (not ELF64 little-endian, unreadable, no note) means "not ours".
pub fn is_ours(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    notes_match(&f).unwrap_or(false)
}

fn notes_match(f: &File) -> Option<bool> {
    const PT_NOTE: u32 = 4;
    let mut head = [0u8; 4096];
    let n = f.read_at(&mut head, 0).ok()?;
    let head = &head[..n];
    // ELF64 (class 2), little-endian (data 1).
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return Some(false);
    }
    let phoff = u64_at(head, 0x20)? as usize;
    let phentsize = u16_at(head, 0x36)? as usize;
    let phnum = u16_at(head, 0x38)? as usize;
    if phentsize < 56 || phnum > 64 {
        return Some(false);
    }
    let mut phdrs = vec![0u8; phentsize * phnum];
    f.read_exact_at(&mut phdrs, phoff as u64).ok()?;
    for ph in phdrs.chunks(phentsize) {
        if u32_at(ph, 0)? != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(ph, 8)?, u64_at(ph, 32)? as usize);
        if size > 64 * 1024 {
            continue;
        }
        let mut seg = vec![0u8; size];
        f.read_exact_at(&mut seg, off).ok()?;
        let mut o = 0;
        while o + 12 <= seg.len() {
            let namesz = u32_at(&seg, o)? as usize;
            let descsz = u32_at(&seg, o + 4)? as usize;
            let ty = u32_at(&seg, o + 8)?;
            let name_at = o + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let next = desc_at + descsz.div_ceil(4) * 4;
            if next > seg.len() {
                break;
            }
            if ty == NOTE_TYPE
                && &seg[name_at..name_at + namesz] == NOTE_NAME
                && &seg[desc_at..desc_at + descsz] == IDENTITY.as_bytes()
            {
                return Some(true);
            }
            o = next;
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_files_are_not_ours() {
        assert!(!is_ours(Path::new("/bin/sh")));
        assert!(!is_ours(Path::new("/nonexistent/bridge")));
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, b"#!/bin/sh\nexit 0\n").unwrap();
        assert!(!is_ours(&p));
        // Another build's identity (same layout, other text) is not ours either.
        let mut elf = std::fs::read("/bin/sh").unwrap();
        elf.truncate(4096);
        std::fs::write(&p, &elf).unwrap();
        assert!(!is_ours(&p));
    }
}
