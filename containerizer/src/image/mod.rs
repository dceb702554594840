//! Images: references, registry pulls, local archives, the content-addressed store, layer unpack
//! and root filesystems.
pub mod rootfs;
pub mod unpack;
