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
        if let Some((registry, repository, tag)) = quick_parts(s) {
            return Ok(ImageRef {
                inner: Reference::with_tag(registry, repository, tag),
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

/// Docker's normalization of a plain `name[:tag]` without the full grammar: the regex behind
/// oci-spec's parser costs tens of milliseconds to build, a large part of a small pull or a
/// `run` of a stored image. Accepts only a strict subset of valid references (lowercase
/// components, no digests); everything else returns `None` and goes through the real parser.
fn quick_parts(s: &str) -> Option<(String, String, String)> {
    fn alnum(c: char) -> bool {
        c.is_ascii_lowercase() || c.is_ascii_digit()
    }
    // [a-z0-9]+([._-][a-z0-9]+)*
    fn component(c: &str) -> bool {
        !c.is_empty()
            && c.starts_with(alnum)
            && c.ends_with(alnum)
            && c.chars().all(|ch| alnum(ch) || "._-".contains(ch))
            && !c.contains("..")
            && !c.contains("--")
            && !c.contains("__")
    }
    fn host(h: &str) -> bool {
        let (name, port) = match h.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (h, None),
        };
        let labels_ok = name
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| alnum(c) || c == '-'));
        labels_ok && port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    }
    let (name, tag) = match s.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (s, "latest"),
    };
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.starts_with(|c: char| alnum(c) || c == '_')
        && tag.chars().all(|c| alnum(c) || "_.-".contains(c));
    if !tag_ok || name.contains('@') {
        return None;
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let first = parts[0];
    let registry = if parts.len() > 1
        && (first.contains('.') || first.contains(':') || first == "localhost")
    {
        if !host(first) {
            return None;
        }
        parts.remove(0);
        first.to_string()
    } else {
        "docker.io".to_string()
    };
    if parts.is_empty() || !parts.iter().all(|p| component(p)) {
        return None;
    }
    let mut repository = parts.join("/");
    if registry == "docker.io" && parts.len() == 1 {
        repository = format!("library/{repository}");
    }
    Some((registry, repository, tag.to_string()))
}

/// `registry/repository:tag` for a plain name, without the regex (see [`quick_parts`]).
pub fn quick_tagged_name(s: &str) -> Option<String> {
    quick_parts(s).map(|(r, n, t)| format!("{r}/{n}:{t}"))
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
            let slow: Reference = s.parse().unwrap();
            let quick = ImageRef::parse(s).unwrap();
            assert_eq!(quick.registry(), slow.registry(), "{s}");
            assert_eq!(quick.repository(), slow.repository(), "{s}");
            assert_eq!(quick.tag(), slow.tag().or(Some("latest")), "{s}");
            assert_eq!(quick.to_string(), slow.whole(), "{s}");
        }
        for s in [
            "A",
            "a@sha256:00",
            "",
            "/a",
            "a//b",
            "a--b",
            "-a",
            "a:",
            "h.io:/x",
        ] {
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
