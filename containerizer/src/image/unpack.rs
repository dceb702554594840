//! Layer unpack (see issue 2).
