//! Image references with docker's normalization (`busybox` = `docker.io/library/busybox:latest`).
use super::{Error, Result};
use oci_spec::distribution::Reference;

/// A parsed, normalized reference. Wraps oci-spec's parser, which implements docker's grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef> {
        if s.is_empty() || s.trim() != s {
            return Err(Error::Reference {
                reference: s.to_string(),
                reason: "empty or surrounded by whitespace".into(),
            });
        }
        let inner: Reference = s.parse().map_err(|e| Error::Reference {
            reference: s.to_string(),
            reason: format!("{e}"),
        })?;
        if inner.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::Reference {
                reference: s.to_string(),
                reason: "repository name must be lowercase".into(),
            });
        }
        if let Some(d) = inner.digest() {
            super::digest::Digest::parse(d).map_err(|reason| Error::Reference {
                reference: s.to_string(),
                reason,
            })?;
        }
        Ok(ImageRef { inner })
    }

    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The host to contact (docker.io is served by index.docker.io / registry-1).
    pub fn resolved_registry(&self) -> &str {
        self.inner.resolve_registry()
    }

    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry(), self.repository())
    }

    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The name this reference gives an image in the store: `name:tag`, with `latest`
    /// when there is neither tag nor digest. `None` for a digest-only reference.
    pub fn tagged_name(&self) -> Option<String> {
        match (self.tag(), self.digest()) {
            (Some(t), _) => Some(format!("{}:{t}", self.name())),
            (None, None) => Some(format!("{}:latest", self.name())),
            (None, Some(_)) => None,
        }
    }

    pub fn oci(&self) -> &Reference {
        &self.inner
    }

    /// Registries on loopback addresses speak plain HTTP by default (docker's convention).
    pub fn is_loopback(&self) -> bool {
        let host = self.registry();
        let host = if let Some(rest) = host.strip_prefix('[') {
            rest.split(']').next().unwrap_or(rest)
        } else {
            host.rsplit_once(':').map_or(host, |(h, _)| h)
        };
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.inner.whole())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_normalization() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(r.tagged_name().unwrap(), "docker.io/library/busybox:latest");
        let r = ImageRef::parse("quay.io/foo/bar:1.2").unwrap();
        assert_eq!(r.tagged_name().unwrap(), "quay.io/foo/bar:1.2");
        let r = ImageRef::parse("user/app").unwrap();
        assert_eq!(r.name(), "docker.io/user/app");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("127.0.0.1:5000/x/y@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(r.tagged_name(), None);
        assert!(r.is_loopback());
        assert!(ImageRef::parse("localhost:5000/a").unwrap().is_loopback());
        assert!(!ImageRef::parse("example.com/a").unwrap().is_loopback());
    }

    #[test]
    fn bad_references() {
        for bad in ["", "UPPER/case", "a@sha256:zz", " busybox", "a:b:c"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }
}
