//! Root filesystems: overlay and copy backends (see issue 2).
