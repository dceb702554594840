//! Registry credentials: `--creds user:pass`, `$REGISTRY_AUTH_FILE`, containers' `auth.json`
//! and docker's `config.json`, looked up the way podman does (most specific key first).
use super::reference::ImageRef;
use super::{Error, Result};
use base64::Engine as _;
use std::path::PathBuf;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// Parses `user:pass` (podman's `--creds`).
    pub fn parse(s: &str) -> Result<Credentials> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials {
                username: u.into(),
                password: p.into(),
            }),
            _ => Err(Error::Credentials(
                "--creds must be USERNAME:PASSWORD".into(),
            )),
        }
    }
}

/// The auth files to consult, in podman's order of precedence.
pub fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(p));
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(x).join("containers/auth.json"));
    } else {
        let uid = nix::unistd::Uid::current();
        files.push(PathBuf::from(format!("/run/containers/{uid}/auth.json")));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(h) = &home {
        files.push(h.join(".config/containers/auth.json"));
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        files.push(PathBuf::from(d).join("config.json"));
    } else if let Some(h) = &home {
        files.push(h.join(".docker/config.json"));
    }
    files
}

/// Credentials for `image` from the first auth file that has an entry for it.
pub fn lookup(image: &ImageRef) -> Result<Option<Credentials>> {
    for f in auth_files() {
        let bytes = match std::fs::read(&f) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::Credentials(format!("reading {}: {e}", f.display()))),
        };
        if let Some(c) = lookup_in(&bytes, image)
            .map_err(|e| Error::Credentials(format!("{}: {e}", f.display())))?
        {
            tracing::debug!(file = %f.display(), "using credentials");
            return Ok(Some(c));
        }
    }
    Ok(None)
}

fn normalize_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    // docker writes "https://index.docker.io/v1/" for Docker Hub.
    let k = k
        .strip_suffix("/v1/")
        .or(k.strip_suffix("/v2/"))
        .unwrap_or(k);
    let k = k.trim_end_matches('/');
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        other => other.to_string(),
    }
}

/// Looks `image` up in one auth file's JSON: `registry/ns/repo`, then `registry/ns`, ..., then
/// `registry`.
pub fn lookup_in(json: &[u8], image: &ImageRef) -> Result<Option<Credentials>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let entries: Vec<(String, &serde_json::Value)> =
        auths.iter().map(|(k, v)| (normalize_key(k), v)).collect();
    let full = image.name();
    let mut candidate = full.as_str();
    loop {
        if let Some((_, entry)) = entries.iter().find(|(k, _)| k == candidate) {
            return decode_entry(entry).map(Some);
        }
        match candidate.rsplit_once('/') {
            Some((head, _)) => candidate = head,
            None => return Ok(None),
        }
    }
}

fn decode_entry(entry: &serde_json::Value) -> Result<Credentials, String> {
    if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| format!("auth entry is not base64: {e}"))?;
        let s = String::from_utf8(raw).map_err(|_| "auth entry is not UTF-8".to_string())?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| "auth entry is not user:password".to_string())?;
        return Ok(Credentials {
            username: u.into(),
            password: p.into(),
        });
    }
    match (
        entry.get("username").and_then(|u| u.as_str()),
        entry.get("password").and_then(|p| p.as_str()),
    ) {
        (Some(u), Some(p)) => Ok(Credentials {
            username: u.into(),
            password: p.into(),
        }),
        _ => Err("entry has neither auth nor username/password".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn most_specific_entry_wins() {
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{}"}},
                "127.0.0.1:5000":{{"auth":"{}"}},
                "127.0.0.1:5000/team":{{"auth":"{}"}}}}}}"#,
            b64("hub:1"),
            b64("reg:2"),
            b64("team:3")
        );
        let get = |r: &str| {
            lookup_in(json.as_bytes(), &ImageRef::parse(r).unwrap())
                .unwrap()
                .map(|c| c.username)
        };
        assert_eq!(get("busybox").as_deref(), Some("hub"));
        assert_eq!(get("127.0.0.1:5000/other/x").as_deref(), Some("reg"));
        assert_eq!(get("127.0.0.1:5000/team/app:1").as_deref(), Some("team"));
        assert_eq!(get("quay.io/x"), None);
    }

    #[test]
    fn bad_entries_are_errors() {
        let r = ImageRef::parse("127.0.0.1:5000/a").unwrap();
        let bad = br#"{"auths":{"127.0.0.1:5000":{"auth":"!!"}}}"#;
        assert!(lookup_in(bad, &r).is_err());
        assert!(lookup_in(b"nope", &r).is_err());
        assert!(Credentials::parse("nocolon").is_err());
        assert_eq!(Credentials::parse("u:p:q").unwrap().password, "p:q");
    }
}
