//! TEMPORARY stub until the real unpacker lands (helper branch `unpack`).
use std::path::Path;
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
pub struct UnpackOptions {
    pub max_size: u64,
    pub preserve_ownership: bool,
}
pub struct UnpackStats {
    pub diff_id: String,
    pub size: u64,
    pub entries: u64,
}
pub fn unpack_layer<R: std::io::Read>(
    _reader: R,
    _dest: &Path,
    _opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    unimplemented!()
}
pub enum Compression {
    None,
    Gzip,
    Zstd,
}
impl Compression {
    pub fn detect(m: &[u8]) -> Compression {
        if m.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if m.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}
