//! TEMPORARY stub until the real rootfs lands (helper branch `unpack`).
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
