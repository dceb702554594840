//! Mount syscalls (new mount API with fallback to mount(2)).
