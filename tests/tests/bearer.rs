//! Bearer-token auth (the Docker Hub scheme) end to end: a real `docker-registry` (distribution
//! 2.8) configured with `auth: token`, a token server written here, and the real `caisson pull`.
//!
//! The flow: the registry answers 401 with `WWW-Authenticate: Bearer realm=..,service=..,scope=..`;
//! the client asks the realm for a token (with Basic credentials, or anonymously), then retries
//! with `Authorization: Bearer <token>`.
//!
//! What distribution 2.8 checks in a token (`registry/auth/token/token.go`):
//! - `iss` is the configured issuer, `aud` the configured service (one string), `nbf` and `exp`
//!   hold now (with 60 s of leeway), and the signature is not empty;
//! - the signing key comes from the JWT header: an `x5c` chain that verifies against the
//!   `rootcertbundle`, or a `kid` equal to the libtrust key id of the public key of one of the
//!   bundle's certificates. This server uses `kid`;
//! - the signature verifies with that key (ES256 here: JWS wants the raw 64-byte r||s, not DER);
//! - every action the request needs is in `access` for that repository, else 401 with
//!   `error="insufficient_scope"`.
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use caisson_tests::*;
use rcgen::PublicKeyData as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USER: &str = "bob";
const PASS: &str = "hunter2";
const ISSUER: &str = "caisson-test-token-issuer";
const SERVICE: &str = "caisson-test-registry";

/// RFC 4648 base32 (standard alphabet), without padding.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// libtrust's key id of a public key given as DER SubjectPublicKeyInfo (what Go's
/// `x509.MarshalPKIXPublicKey` writes): SHA-256, truncated to 240 bits, base32 without padding,
/// in groups of four joined by ':' (12 groups).
fn libtrust_key_id(spki_der: &[u8]) -> String {
    let b32 = base32(&Sha256::digest(spki_der)[..30]);
    assert_eq!(b32.len(), 48);
    b32.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An ES256 signer whose self-signed certificate is the registry's `rootcertbundle`.
struct Signer {
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
}

impl Signer {
    /// A fresh P-256 key; returns the signer and the PEM certificate for the registry.
    fn generate() -> (Signer, String) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["caisson-token-issuer".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let rng = SystemRandom::new();
        // rcgen signs certificates with ASN.1 (DER) ECDSA signatures; a JWS wants fixed r||s.
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, kp.serialized_der(), &rng)
                .unwrap();
        let kid = libtrust_key_id(&kp.subject_public_key_info());
        (Signer { key, kid, rng }, cert.pem())
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
        );
        let sig = self.key.sign(&self.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// One request the token server answered.
#[derive(Debug, Clone)]
struct TokenRequest {
    /// The user named in the Basic credentials; `None` for an anonymous request.
    user: Option<String>,
    /// 200 (token issued), 401 (wrong credentials), 400 (wrong service), 404 (wrong path).
    status: u16,
    /// The `scope` parameters, split on spaces (e.g. `repository:private/bb:pull`).
    scopes: Vec<String>,
    /// What the token grants, one `name:action` each (e.g. `private/bb:pull`).
    granted: Vec<String>,
}

/// A token server on a free loopback port, in a thread of this test: `GET /token?service=..&
/// scope=..` gives `bob:hunter2` the pull and push actions it asks for, refuses other
/// credentials with 401, and gives anonymous callers a valid token that grants nothing.
struct TokenServer {
    realm: String,
    log: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    fn start(signer: Signer) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let signer = Arc::new(signer);
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (signer, log) = (signer.clone(), log.clone());
                    std::thread::spawn(move || {
                        if let Err(e) = serve(stream, &signer, &log) {
                            eprintln!("token server: {e}");
                        }
                    });
                }
            })
        };
        TokenServer {
            realm,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// The requests answered since the last call.
    fn take(&self) -> Vec<TokenRequest> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let addr = self.realm["http://".len()..].trim_end_matches("/token");
        let _ = TcpStream::connect(addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Decodes a query component (`%XX` escapes, `+` for space).
fn url_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = match b.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match (escaped, b[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(out: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn serve(
    mut stream: TcpStream,
    signer: &Signer,
    log: &Mutex<Vec<TokenRequest>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(()); // the wake-up connection from Drop
    }
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (url_decode(k), url_decode(v))
        })
        .collect();
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let service = params
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.as_str());
    let creds = authorization
        .as_deref()
        .and_then(|a| a.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .and_then(|(_, b64)| STANDARD.decode(b64.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let mut req = TokenRequest {
        user: creds.as_ref().map(|(u, _)| u.clone()),
        status: 200,
        scopes,
        granted: Vec::new(),
    };
    let refusal = if method != "GET" || path != "/token" {
        Some((404, r#"{"details":"not found"}"#))
    } else if service != Some(SERVICE) {
        Some((400, r#"{"details":"unknown service"}"#))
    } else {
        match &creds {
            Some((u, p)) if u == USER && p == PASS => None,
            Some(_) => Some((401, r#"{"details":"invalid username or password"}"#)),
            None => None,
        }
    };
    if let Some((status, body)) = refusal {
        req.status = status;
        log.lock().unwrap().push(req);
        return respond(&mut stream, status, body);
    }
    // Anonymous callers get a valid token that grants nothing: the registry then answers
    // 401 insufficient_scope, as Docker Hub does for a private repository.
    let mut access = Vec::new();
    if creds.is_some() {
        for scope in &req.scopes {
            // type:name:actions; a name never holds ':' (a host:port is not part of it).
            let (Some((kind, rest)), Some((_, actions))) =
                (scope.split_once(':'), scope.rsplit_once(':'))
            else {
                continue;
            };
            let Some((name, _)) = rest.rsplit_once(':') else {
                continue;
            };
            if kind != "repository" {
                continue;
            }
            let actions: Vec<&str> = actions
                .split(',')
                .filter(|a| *a == "pull" || *a == "push")
                .collect();
            req.granted
                .extend(actions.iter().map(|a| format!("{name}:{a}")));
            access
                .push(serde_json::json!({"type": "repository", "name": name, "actions": actions}));
        }
    }
    let now = unix_now();
    let jti = {
        let mut l = log.lock().unwrap();
        l.push(req.clone());
        format!("caisson-test-{}-{}", now, l.len())
    };
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": req.user.clone().unwrap_or_default(),
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": jti,
        "access": access,
    });
    let token = signer.sign(&claims);
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
    respond(&mut stream, 200, &body.to_string())
}

/// A real `docker-registry` in token-auth mode, logging to a file for failure messages.
struct TokenRegistry {
    addr: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl TokenRegistry {
    fn start(realm: &str, cert_pem: &str) -> anyhow::Result<TokenRegistry> {
        let dir = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let bundle = dir.path().join("token-root.pem");
        std::fs::write(&bundle, cert_pem)?;
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\nauth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n\
             \x20   issuer: {ISSUER}\n    rootcertbundle: {}\n",
            dir.path().join("data").display(),
            bundle.display()
        );
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut reg = TokenRegistry { addr, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&reg.addr).is_err() {
            if Instant::now() > deadline || reg.child.try_wait()?.is_some() {
                anyhow::bail!("docker-registry did not start:\n{}", reg.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(reg)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes with skopeo over plain HTTP with Basic credentials for the token server.
    fn push(&self, src: &str, repo_tag: &str, creds: &str) -> anyhow::Result<()> {
        run(Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--format",
                "oci",
            ])
            .args(["--dest-creds", creds])
            .arg(src)
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .stdin(Stdio::null()))?;
        Ok(())
    }
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare HTTP/1.1 GET; returns the status code and the lowercased response head.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let head = resp.split("\r\n\r\n").next().unwrap_or("").to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head)
}

#[test]
fn base32_and_libtrust_key_id_encoding() {
    // RFC 4648 test vectors, without their padding.
    for (input, want) in [
        ("", ""),
        ("f", "MY"),
        ("fo", "MZXQ"),
        ("foo", "MZXW6"),
        ("foob", "MZXW6YQ"),
        ("fooba", "MZXW6YTB"),
        ("foobar", "MZXW6YTBOI"),
    ] {
        assert_eq!(base32(input.as_bytes()), want, "{input:?}");
    }
    let id = libtrust_key_id(b"any key");
    assert_eq!(id.len(), 12 * 4 + 11, "{id}");
    assert!(id.split(':').all(|g| g.len() == 4), "{id}");
}

#[test]
fn bearer_token_registry_with_creds_anonymous_and_wrong_password() {
    if !["umoci", "skopeo", "docker-registry"]
        .iter()
        .all(|t| require_tool(t))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = busybox_layout(tmp.path(), "latest").unwrap();
    let (signer, cert_pem) = Signer::generate();
    let tokens = TokenServer::start(signer);
    let reg = TokenRegistry::start(&tokens.realm, &cert_pem).unwrap();

    // The registry really is in token mode: it sends clients to our realm.
    let (status, head) = http_get(&reg.addr, "/v2/");
    assert_eq!(status, 401, "{head}");
    let challenge = format!(
        "www-authenticate: bearer realm=\"{}\",service=\"{SERVICE}\"",
        tokens.realm
    );
    assert!(head.contains(&challenge), "{head}");

    reg.push(
        &format!("oci:{}:latest", layout.display()),
        "private/bb:1",
        &format!("{USER}:{PASS}"),
    )
    .unwrap_or_else(|e| panic!("{e:#}\nregistry log:\n{}", reg.log()));
    let seen = tokens.take();
    assert!(
        seen.iter().any(|r| r.status == 200
            && r.user.as_deref() == Some(USER)
            && r.granted.iter().any(|g| g == "private/bb:push")),
        "skopeo's push did not go through the token server: {seen:#?}"
    );
    let name = format!("{}/private/bb:1", reg.addr);

    // With the right credentials: a token for pull, and the image in the store.
    let c = Caisson::new();
    let (code, out, err) = c.run(&["pull", "--creds", &format!("{USER}:{PASS}"), &name]);
    assert_eq!(code, 0, "{out}{err}\nregistry log:\n{}", reg.log());
    let seen = tokens.take();
    // One token per pull: oci-client caches it for the manifest and every blob.
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(
        seen.iter().any(|r| r.status == 200
            && r.user.as_deref() == Some(USER)
            && r.scopes.iter().any(|s| s == "repository:private/bb:pull")
            && r.granted.iter().any(|g| g == "private/bb:pull")),
        "caisson did not get its token from the token server: {seen:#?}"
    );
    assert!(seen.iter().all(|r| r.status == 200), "{seen:#?}");
    let images = c.images_json();
    assert_eq!(images.len(), 1, "{images:?}");
    assert!(
        images[0]["Names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str() == Some(name.as_str())),
        "{images:?}"
    );
    assert!(c.layer_dir(&name, 0).join("bin/busybox").is_file());

    // --tls-verify=false first tries HTTPS, then falls back to HTTP: the token flow still works.
    let c3 = Caisson::new();
    let creds = format!("{USER}:{PASS}");
    let (code, out, err) = c3.run(&["pull", "--tls-verify=false", "--creds", &creds, &name]);
    assert_eq!(code, 0, "{out}{err}\nregistry log:\n{}", reg.log());
    let seen = tokens.take();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(
        seen.iter()
            .any(|r| r.status == 200 && r.granted.iter().any(|g| g == "private/bb:pull")),
        "{seen:#?}"
    );
    assert_eq!(c3.images_json().len(), 1);

    // Anonymous: the token server hands out a token that grants nothing, the registry says
    // insufficient_scope, and caisson fails with an auth error.
    let c2 = Caisson::new();
    let (code, _, err) = c2.run(&["pull", &name]);
    assert_eq!(code, 125, "{err}");
    assert!(err.to_lowercase().contains("auth"), "{err}");
    let seen = tokens.take();
    // One token request: no retries with the anonymous token.
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(
        seen.iter().any(|r| r.status == 200
            && r.user.is_none()
            && r.scopes.iter().any(|s| s == "repository:private/bb:pull")),
        "the anonymous pull did not ask for a token: {seen:#?}"
    );
    assert!(seen.iter().all(|r| r.granted.is_empty()), "{seen:#?}");
    assert!(c2.images_json().is_empty());

    // A wrong password: the token server refuses it, no token is issued, the pull fails and
    // says what the token server said (not "give --creds", as if none were given).
    let (code, _, err) = c2.run(&["pull", "--creds", &format!("{USER}:wrong"), &name]);
    assert_eq!(code, 125, "{err}");
    assert!(err.to_lowercase().contains("auth"), "{err}");
    assert!(err.contains("invalid username or password"), "{err}");
    let seen = tokens.take();
    // One token request: the refusal ends the pull at once.
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(
        seen.iter()
            .any(|r| r.status == 401 && r.user.as_deref() == Some(USER)),
        "the wrong password never reached the token server: {seen:#?}"
    );
    assert!(seen.iter().all(|r| r.status == 401), "{seen:#?}");
    assert!(c2.images_json().is_empty());
    assert!(c2.tmp_entries().is_empty(), "tmp: {:?}", c2.tmp_entries());
}
