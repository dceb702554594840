//! Pulls from registries with oci-client: anonymous, basic and bearer-token auth, manifest
//! lists and indexes with platform selection, streaming layer fetches.
use super::import::{self, BlobOpener, LayerProgress, PullOptions, Resolved};
use super::manifest::{self, Descriptor, Parsed};
use super::platform::Platform;
use super::reference::ImageRef;
use super::store::{ImageRecord, Store};
use super::{auth, Error, Result};
use futures_util::TryStreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use oci_client::{Client, Reference};
use std::io::Read;
use std::sync::{Arc, Once};

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // reqwest is built without a default provider so that ring (not aws-lc) is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn client(opts: &PullOptions, plain_http: bool) -> Client {
    install_crypto_provider();
    let config = ClientConfig {
        protocol: if plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        // A plain-HTTP client never verifies anything in transit (content is checked by
        // digest), and skipping the verifier spares loading the system's CA store, which is
        // most of a small pull's start-up time.
        accept_invalid_certificates: plain_http || opts.tls_verify == Some(false),
        connect_timeout: Some(opts.timeout),
        read_timeout: Some(opts.timeout),
        ..Default::default()
    };
    Client::new(config)
}

/// Turns oci-client's errors into ours, naming the image and, for HTTP errors, what the
/// registry said.
fn map_err(image: &ImageRef, e: OciDistributionError) -> Error {
    let image_s = image.to_string();
    let registry = image.registry().to_string();
    match e {
        OciDistributionError::AuthenticationFailure(message) => Error::Unauthorized {
            image: image_s,
            registry,
            message: format!("the token server refused the credentials: {message}"),
        },
        OciDistributionError::UnauthorizedError { url } => Error::Unauthorized {
            image: image_s,
            registry,
            message: format!("401 Unauthorized for {url} (give --creds or log in via auth.json)"),
        },
        OciDistributionError::ImageManifestNotFoundError(message) => Error::NotFound {
            image: image_s,
            message,
        },
        OciDistributionError::ServerError { code, url, message } => match code {
            404 => Error::NotFound {
                image: image_s,
                message: format!("{url}: {message}"),
            },
            401 | 403 => Error::Unauthorized {
                image: image_s,
                registry,
                message: format!("HTTP {code} for {url}: {message}"),
            },
            _ => Error::Registry {
                image: image_s,
                message: format!("registry answered HTTP {code} for {url}: {message}"),
            },
        },
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}", e.code))
                .collect();
            let text = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            let has = |c: &str| codes.iter().any(|x| x.eq_ignore_ascii_case(c));
            if has("ManifestUnknown") || has("NameUnknown") || has("BlobUnknown") {
                Error::NotFound {
                    image: image_s,
                    message: format!("{url}: {text}"),
                }
            } else if has("Unauthorized") || has("Denied") {
                Error::Unauthorized {
                    image: image_s,
                    registry,
                    message: format!("{url}: {text}"),
                }
            } else {
                Error::Registry {
                    image: image_s,
                    message: format!("{url}: {text}"),
                }
            }
        }
        OciDistributionError::RequestError(e) => {
            let what = if e.is_timeout() {
                "the registry did not answer in time"
            } else if e.is_connect() {
                "cannot connect to the registry"
            } else {
                "request failed"
            };
            Error::Registry {
                image: image_s,
                message: format!("{what}: {}", error_chain(&e)),
            }
        }
        other => Error::Registry {
            image: image_s,
            message: error_chain(&other),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn oci_desc(d: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        ..Default::default()
    }
}

struct RegistryBlobs {
    client: Client,
    reference: Reference,
    image: ImageRef,
    handle: tokio::runtime::Handle,
}

impl BlobOpener for RegistryBlobs {
    fn open(&self, desc: &Descriptor) -> Result<Box<dyn Read + Send>> {
        let sized = self
            .handle
            .block_on(
                self.client
                    .pull_blob_stream(&self.reference, &oci_desc(desc)),
            )
            .map_err(|e| map_err(&self.image, e))?;
        let reader = tokio_util::io::StreamReader::new(sized.stream.map_err(std::io::Error::other));
        Ok(Box::new(tokio_util::io::SyncIoBridge::new_with_handle(
            reader,
            self.handle.clone(),
        )))
    }
}

/// Fetches the manifest `reference` names, first authenticating when there are credentials.
///
/// oci-client fetches bearer tokens lazily and ignores a failed token request (its
/// `get_auth_token` drops the error of `_auth`): the request then goes out without credentials
/// and a wrong password looks exactly like no credentials. Calling `auth` first surfaces the
/// token server's refusal (`AuthenticationFailure`) and caches the token (or, for a Basic
/// challenge, the credentials) for every later request of this pull.
async fn first_manifest(
    client: &Client,
    reference: &Reference,
    auth: &RegistryAuth,
) -> std::result::Result<(Vec<u8>, String), OciDistributionError> {
    if matches!(auth, RegistryAuth::Basic(..)) {
        client
            .auth(reference, auth, RegistryOperation::Pull)
            .await?;
    }
    let (bytes, digest) = client
        .pull_manifest_raw(reference, auth, manifest::ACCEPTED)
        .await?;
    Ok((bytes.to_vec(), digest))
}

/// Pulls `image` into `store` and returns its record.
pub async fn pull(
    store: &Store,
    image: &ImageRef,
    opts: &PullOptions,
    progress: Arc<dyn LayerProgress>,
) -> Result<ImageRecord> {
    let _guard = store.pull_guard()?;
    let creds = match &opts.credentials {
        Some(c) => Some(c.clone()),
        None => auth::lookup(image)?,
    };
    let auth = match creds {
        Some(c) => RegistryAuth::Basic(c.username, c.password),
        None => RegistryAuth::Anonymous,
    };
    let plain_http = opts.tls_verify.is_none() && image.is_loopback();
    let mut client = client(opts, plain_http);
    let reference = image.oci().clone();
    let first = first_manifest(&client, &reference, &auth).await;
    let (bytes, digest) = match first {
        // podman's --tls-verify=false also allows plain HTTP: fall back when TLS fails.
        Err(OciDistributionError::RequestError(e))
            if opts.tls_verify == Some(false)
                && !plain_http
                && (e.is_connect() || e.is_request()) =>
        {
            tracing::info!(%image, "TLS connection failed, retrying over plain HTTP");
            client = self::client(opts, true);
            first_manifest(&client, &reference, &auth)
                .await
                .map_err(|e| map_err(image, e))?
        }
        other => other.map_err(|e| map_err(image, e))?,
    };
    let image_s = image.to_string();
    let bad = |m: String| Error::Manifest {
        image: image_s.clone(),
        message: m,
    };
    let (manifest_bytes, manifest_digest, manifest) =
        match manifest::parse(&bytes, None).map_err(bad)? {
            Parsed::Image(m) => (bytes.to_vec(), digest, m),
            Parsed::Index(index) => {
                let wanted = opts.platform.clone().unwrap_or_else(Platform::host);
                // Without an explicit platform, an index offering only Wasm still runs here.
                let wasi = Platform {
                    os: "wasi".into(),
                    architecture: "wasm".into(),
                    variant: None,
                };
                let chosen = index
                    .select(&wanted)
                    .or_else(|e| match opts.platform {
                        None => index.select(&wasi).map_err(|_| e),
                        Some(_) => Err(e),
                    })
                    .map_err(|available| Error::NoMatchingPlatform {
                        image: image_s.clone(),
                        wanted: wanted.to_string(),
                        available,
                    })?;
                let by_digest = reference.clone_with_digest(chosen.digest.clone());
                let (b, d) = client
                    .pull_manifest_raw(&by_digest, &auth, manifest::ACCEPTED)
                    .await
                    .map_err(|e| map_err(image, e))?;
                match manifest::parse(&b, None).map_err(bad)? {
                    Parsed::Image(m) => (b.to_vec(), d, m),
                    Parsed::Index(_) => {
                        return Err(bad("an index inside an index is not supported".into()))
                    }
                }
            }
        };
    manifest.validate().map_err(bad)?;
    let mut config_bytes = Vec::new();
    client
        .pull_blob(&reference, &oci_desc(&manifest.config), &mut config_bytes)
        .await
        .map_err(|e| map_err(image, e))?;
    let resolved = Resolved {
        image: image_s.clone(),
        manifest_bytes,
        manifest,
        config_bytes,
        repo_digest: Some(format!("{}@{manifest_digest}", image.name())),
        tags: image.tagged_name().into_iter().collect(),
        blob_digests_known: true,
    };
    let opener = Arc::new(RegistryBlobs {
        client,
        reference,
        image: image.clone(),
        handle: tokio::runtime::Handle::current(),
    });
    import::import(store, resolved, opener, opts, progress).await
}
