//! `wasi:http/proxy` services: a component served over HTTP/1.1, one fresh instance per request
//! (as `wasmtime serve` does), instantiated from a pre-linked template with the pooling
//! allocator, so an instance costs microseconds and shares nothing with the previous one.
//!
//! The engine is separate from [`super::Engine`]: serving needs wasmtime's async support (a
//! request's guest runs on a fiber while hyper and tokio drive the sockets).
use super::task::Limits;
use super::{Error, Result};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// How a service is hosted.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Compile cache directory (the same one [`super::Engine`] uses); `None` compiles in memory.
    pub cache_dir: Option<PathBuf>,
    /// Requests in flight at once (pooled instances and fiber stacks).
    pub max_concurrent: u32,
    /// Per-request limits (linear memory, tables).
    pub limits: Limits,
    /// `KEY=VALUE` environment every instance sees.
    pub env: Vec<(String, String)>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_concurrent: 128,
            limits: Limits::default(),
            env: vec![],
        }
    }
}

struct RequestHost {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limits: StoreLimits,
}

impl WasiView for RequestHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RequestHost {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: Default::default(),
        }
    }
}

/// A loaded `wasi:http/proxy` component, ready to serve. Cheap to clone.
#[derive(Clone)]
pub struct Service(Arc<ServiceInner>);

struct ServiceInner {
    name: String,
    pre: ProxyPre<RequestHost>,
    config: ServiceConfig,
}

impl Service {
    /// Loads the component at `path` (compiled once, cached on disk) and checks that it is a
    /// `wasi:http/proxy` whose imports are provided.
    pub fn load(path: &Path, config: ServiceConfig) -> Result<Self> {
        let name = path.display().to_string();
        let n = config.max_concurrent.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(n * 4)
            .total_component_instances(n)
            .total_memories(n * 4)
            .total_tables(n * 4)
            .total_stacks(n)
            .max_memory_size(1 << 30)
            .linear_memory_keep_resident(64 << 10)
            .table_keep_resident(1 << 16);
        let mut cfg = Config::new();
        cfg.strategy(wasmtime::Strategy::Cranelift)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true);
        let engine =
            wasmtime::Engine::new(&cfg).map_err(|e| Error::Engine(format!("config: {e:#}")))?;
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let binary = match super::sniff(&bytes) {
            Some(super::WasmKind::Component) => bytes,
            Some(super::WasmKind::Text) => wat::parse_bytes(&bytes)
                .map_err(|e| Error::Invalid {
                    name: name.clone(),
                    message: e.to_string(),
                })?
                .into_owned(),
            Some(super::WasmKind::Module) => {
                return Err(Error::NotCommand {
                    name,
                    reason: "a core module cannot be a wasi:http/proxy service; it must be a \
                             component (wasm32-wasip2)"
                        .into(),
                })
            }
            None => {
                return Err(Error::NotWasm {
                    name,
                    reason: "no Wasm magic number".into(),
                })
            }
        };
        let component = compile(&engine, &name, &binary, config.cache_dir.as_deref())?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| Error::Engine(format!("WASI linker: {e:#}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| Error::Engine(format!("wasi:http linker: {e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| Error::Link {
                name: name.clone(),
                message: format!("{e:#}"),
            })?;
        let pre = ProxyPre::new(pre).map_err(|e| Error::NotCommand {
            name: name.clone(),
            reason: format!(
                "not a wasi:http/proxy component (no wasi:http/incoming-handler export): {e:#}"
            ),
        })?;
        Ok(Self(Arc::new(ServiceInner { name, pre, config })))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Serves connections from `listener` until the future is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        loop {
            let (conn, _) = listener.accept().await?;
            let _ = conn.set_nodelay(true);
            let svc = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let svc = svc.clone();
                    async move {
                        // A failed request (a trap, no response) is a 500 for that request
                        // only; the connection and the service go on.
                        Ok::<_, std::convert::Infallible>(match svc.handle(req).await {
                            Ok(resp) => resp,
                            Err(_) => internal_error(),
                        })
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(conn), service)
                    .await
                {
                    tracing::debug!("connection: {e}");
                }
            });
        }
    }

    /// One request: a fresh instance, its handler called, the response it sets.
    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> wasmtime::Result<hyper::Response<HyperOutgoingBody>> {
        let inner = &self.0;
        let mut wasi = WasiCtx::builder();
        wasi.inherit_stdout()
            .inherit_stderr()
            .envs(&inner.config.env);
        let mut limits = StoreLimitsBuilder::new().trap_on_grow_failure(true);
        if let Some(m) = inner.config.limits.memory_bytes {
            limits = limits.memory_size(usize::try_from(m).unwrap_or(usize::MAX));
        }
        if let Some(t) = inner.config.limits.table_elements {
            limits = limits.table_elements(usize::try_from(t).unwrap_or(usize::MAX));
        }
        let mut store = Store::new(
            inner.pre.engine(),
            RequestHost {
                wasi: wasi.build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                limits: limits.build(),
            },
        );
        store.limiter(|h| &mut h.limits);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let pre = inner.pre.clone();
        // The guest may keep running after it has sent the response head (streaming a body).
        let task = tokio::spawn(async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(store, req, out)
                .await
        });
        match receiver.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let e = match task.await {
                    Ok(Ok(())) => wasmtime::format_err!("the guest set no response"),
                    Ok(Err(e)) => e,
                    Err(e) => e.into(),
                };
                tracing::warn!(service = %inner.name, "request failed: {e:#}");
                eprintln!("caisson-wasm: {}: request failed: {e:#}", inner.name);
                Err(e)
            }
        }
    }
}

fn internal_error() -> hyper::Response<HyperOutgoingBody> {
    use http_body_util::BodyExt;
    let body = http_body_util::Full::new(hyper::body::Bytes::from_static(
        b"internal error: the Wasm handler failed\n",
    ))
    .map_err(|never| match never {})
    .boxed_unsync();
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
    resp
}

/// Compiles a component, or maps it from the disk cache (keyed by digest and this engine's
/// compatibility hash, like [`super::Engine`]'s).
fn compile(
    engine: &wasmtime::Engine,
    name: &str,
    binary: &[u8],
    cache_dir: Option<&Path>,
) -> Result<Component> {
    let hex = hex::encode(Sha256::digest(binary));
    let compat = {
        let mut h = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    };
    let path = cache_dir.map(|d| d.join(&compat).join(format!("{hex}.http.cwasm")));
    if let Some(p) = path.as_deref().filter(|p| p.exists()) {
        match crate::sys::wasm::deserialize_component_file(engine, p) {
            Ok(c) => return Ok(c),
            Err(e) => tracing::warn!(path = %p.display(), "ignoring cache entry: {e:#}"),
        }
    }
    let component = Component::from_binary(engine, binary).map_err(|e| Error::Invalid {
        name: name.into(),
        message: format!("{e:#}"),
    })?;
    if let (Some(p), Ok(bytes)) = (&path, component.serialize()) {
        let dir = p.parent().expect("cache path has a parent");
        let tmp = dir.join(format!(".tmp.{}.http", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, p));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("could not write the compile cache: {e}");
        }
    }
    Ok(component)
}
