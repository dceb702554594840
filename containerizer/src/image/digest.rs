//! Content digests (`sha256:<hex>`) and a reader that verifies one while bytes stream through.
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};

/// A validated `sha256:<64 hex>` digest. Other algorithms are refused: every registry and
/// tool we meet writes sha256, and a digest we cannot check is worse than none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, String> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(format!(
                "unsupported digest {s:?} (only sha256 is supported)"
            ));
        };
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!("malformed digest {s:?}"));
        }
        Ok(Digest(s.to_string()))
    }

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, as docker shows image ids.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hashes and counts what is read through it, and fails the read as soon as more than
/// `limit` bytes arrive, so an oversized or lying blob cannot run on forever.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: Option<u64>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, limit: Option<u64>) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
        }
    }

    /// Reads whatever is left (so the digest covers the whole blob) and returns digest and size.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        let hex = hex::encode(self.hasher.finalize());
        Ok((Digest(format!("sha256:{hex}")), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if let Some(limit) = self.limit {
            if self.count > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("blob is larger than its declared size of {limit} bytes"),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_validates() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.as_str(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse("md5:900150983cd24fb0d6963f7d28e17f72").is_err());
        assert!(Digest::parse(&d.as_str().to_uppercase()).is_err());
        assert_eq!(d.short(), "ba7816bf8f01");
    }

    #[test]
    fn hashing_reader_limits_and_hashes() {
        let r = HashingReader::new(&b"abc"[..], Some(3));
        let (d, n) = r.finish().unwrap();
        assert_eq!((d, n), (Digest::of(b"abc"), 3));
        let r = HashingReader::new(&b"abcd"[..], Some(3));
        assert!(r.finish().is_err());
    }
}
