//! Root filesystems: overlay and copy backends.
