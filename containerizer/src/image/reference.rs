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

/// Docker's normalization of a plain `name[:tag]` without the full grammar (the regex behind
/// [`ImageRef::parse`] costs milliseconds to build, which `caisson run` should not pay for an
/// image already in the store). `None` for anything that needs the real parser (digests,
/// odd characters); callers fall back to [`ImageRef::parse`].
pub fn quick_tagged_name(s: &str) -> Option<String> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c);
    if s.is_empty() || !s.chars().all(ok) || s.contains("//") || s.starts_with('/') {
        return None;
    }
    let (name, tag) = match s.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (s, "latest"),
    };
    if name.is_empty() || tag.is_empty() || name.contains(':') && !name.contains('/') {
        return None;
    }
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) => (f, Some(r)),
        None => (name, None),
    };
    let full = match rest {
        Some(r) if first.contains('.') || first.contains(':') || first == "localhost" => {
            format!("{first}/{r}")
        }
        Some(_) => format!("docker.io/{name}"),
        None => format!("docker.io/library/{name}"),
    };
    Some(format!("{full}:{tag}"))
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
    fn quick_normalization_agrees_with_the_parser() {
        for s in [
            "busybox",
            "busybox:1.36",
            "user/app",
            "quay.io/a/b:c",
            "localhost/x",
            "127.0.0.1:5000/t/run:1",
            "localhost:5000/a",
            "registry.example.com:443/deep/path/name:v1.2-rc",
        ] {
            let slow = ImageRef::parse(s).unwrap().tagged_name();
            assert_eq!(quick_tagged_name(s), slow, "{s}");
        }
        for s in ["A", "a@sha256:00", "", "/a", "a//b"] {
            assert_eq!(quick_tagged_name(s), None, "{s}");
        }
    }

    #[test]
    fn bad_references() {
        for bad in ["", "UPPER/case", "a@sha256:zz", " busybox", "a:b:c"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?}");
        }
    }
}
