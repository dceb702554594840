//! `wasi:http/proxy` services: a component served over HTTP/1.1, one fresh instance per request
//! (as `wasmtime serve` does), instantiated from a pre-linked template with the pooling
//! allocator, so an instance costs microseconds and shares nothing with the previous one.
//!
//! The engine is separate from [`super::Engine`]: serving needs wasmtime's async support (a
//! request's guest runs on a fiber while hyper and tokio drive the sockets).
use super::task::{Interrupted, Limits, TaskLimiter};
use super::{Error, Result};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// How long one request's instance may run when [`ServiceConfig::request_timeout`] is not set.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Period of the epoch ticker while requests are in flight: how soon a guest that loops yields
/// to other requests, and the granularity of the request deadline.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Ticks without a request in flight before the ticker parks.
const IDLE_TICKS_BEFORE_PARKING: u32 = 50;

/// A worker thread without connections for this long ends.
const WORKER_IDLE_EXIT: Duration = Duration::from_secs(5);

/// How a service is hosted.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Compile cache directory (the same one [`super::Engine`] uses); `None` compiles in memory.
    pub cache_dir: Option<PathBuf>,
    /// Requests in flight at once (pooled instances and fiber stacks).
    pub max_concurrent: u32,
    /// Per-request limits (linear memory, tables): each request's instance gets them whole.
    pub limits: Limits,
    /// `KEY=VALUE` environment every instance sees.
    pub env: Vec<(String, String)>,
    /// Wall-clock limit of one request's instance, from instantiation to the end of its
    /// handler: past it the guest is stopped (even in an infinite loop, or blocked in a host
    /// call) and the request answered 504 if no response was sent yet.
    pub request_timeout: Duration,
    /// Threads serving connections at most, the one calling [`Service::serve_until`] included.
    /// The others are started only when connections overlap, and end after a few idle
    /// seconds, so an idle service, or one that sees one client at a time, has no extra thread.
    pub threads: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_concurrent: 128,
            limits: Limits::default(),
            env: vec![],
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            threads: 1,
        }
    }
}

struct RequestHost {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limits: TaskLimiter,
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
    ticker: Arc<Ticker>,
}

impl Drop for ServiceInner {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] while at least one request is in flight,
/// and sleeps (parked, no wake-ups) while the service is idle: an idle service costs no CPU.
/// A thread of its own, so it ticks even while a guest spins on the runtime's only thread.
struct Ticker {
    in_flight: AtomicUsize,
    stopped: AtomicBool,
    thread: std::thread::Thread,
}

impl Ticker {
    fn start(engine: wasmtime::Engine) -> Result<Arc<Self>> {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Ticker>>();
        let handle = std::thread::Builder::new()
            .name("wasm-epoch".into())
            // It only sleeps and bumps a counter.
            .stack_size(64 << 10)
            .spawn(move || {
                let Ok(t) = rx.recv() else { return };
                let t = Arc::downgrade(&t);
                let mut idle_ticks = 0;
                loop {
                    let Some(ticker) = t.upgrade() else { return };
                    if ticker.stopped.load(Ordering::Acquire) {
                        return;
                    }
                    let idle = ticker.in_flight.load(Ordering::Acquire) == 0;
                    drop(ticker);
                    // Park only after a quiet while: between the requests of a busy service,
                    // waking a parked thread would cost a syscall per request.
                    idle_ticks = if idle { idle_ticks + 1 } else { 0 };
                    if idle_ticks > IDLE_TICKS_BEFORE_PARKING {
                        // Going idle: what the requests freed need not stay resident.
                        crate::sys::wasm::release_free_heap();
                        std::thread::park();
                        idle_ticks = 0;
                    } else {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                }
            })
            .map_err(|e| Error::Engine(format!("epoch ticker thread: {e}")))?;
        let ticker = Arc::new(Ticker {
            in_flight: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            thread: handle.thread().clone(),
        });
        tx.send(ticker.clone())
            .map_err(|_| Error::Engine("epoch ticker thread ended".into()))?;
        Ok(ticker)
    }

    /// Marks a request in flight until the guard is dropped.
    fn enter(self: &Arc<Self>) -> InFlight {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        InFlight(self.clone())
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

struct InFlight(Arc<Ticker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Service {
    /// Loads the component at `path` (compiled once, cached on disk) and checks that it is a
    /// `wasi:http/proxy` whose imports are provided.
    pub fn load(path: &Path, config: ServiceConfig) -> Result<Self> {
        let name = path.display().to_string();
        let n = config.max_concurrent.max(1);
        let keep_resident = if PoolingAllocationConfig::is_pagemap_scan_available() {
            2 << 20
        } else {
            64 << 10
        };
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(n * 4)
            .total_component_instances(n)
            .total_memories(n * 4)
            .total_tables(n * 4)
            .total_stacks(n)
            .max_memory_size(1 << 30)
            // Reset only the pages a request dirtied (PAGEMAP_SCAN, Linux 6.7+), in place, up to
            // this much: no madvise, so no TLB shootdowns and no page faults on the next
            // request. Without PAGEMAP_SCAN this much is memset on every reset instead.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(keep_resident)
            .table_keep_resident(keep_resident);
        let mut cfg = Config::new();
        cfg.strategy(wasmtime::Strategy::Cranelift)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true)
            .epoch_interruption(true);
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
        let ticker = Ticker::start(engine)?;
        Ok(Self(Arc::new(ServiceInner {
            name,
            pre,
            config,
            ticker,
        })))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Serves connections from `listener` until the future is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        self.serve_until(listener, std::future::pending()).await
    }

    /// Serves connections from `listener` until `shutdown` completes, then shuts down
    /// gracefully: the listener is closed (new connections are refused), idle keep-alive
    /// connections are closed, and requests in flight are answered before this returns. A
    /// request cannot outlive [`ServiceConfig::request_timeout`], so neither can the drain.
    ///
    /// Connections are served on the calling thread's runtime and, up to
    /// [`ServiceConfig::threads`], on worker threads started only once connections overlap: a
    /// service that sees one client at a time never starts one.
    pub async fn serve_until(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        // Every connection task holds a receiver: when none is left, all are done.
        let (stop_tx, _) = tokio::sync::watch::channel(false);
        let mut threads = Threads::new(self.clone());
        tokio::pin!(shutdown);
        loop {
            let conn = tokio::select! {
                r = listener.accept() => r,
                () = &mut shutdown => break,
            };
            let conn = match conn {
                Ok((conn, _)) => conn,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: the service
                    // goes on (back off a little so a full fd table is not a busy loop).
                    tracing::warn!(service = %self.0.name, "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = conn.set_nodelay(true);
            threads.dispatch(conn, stop_tx.subscribe());
        }
        drop(listener);
        // Workers end once their channel is closed and their connections are done.
        drop(threads);
        let _ = stop_tx.send(true);
        let limit = self.0.config.request_timeout + Duration::from_secs(1);
        if tokio::time::timeout(limit, stop_tx.closed()).await.is_err() {
            tracing::warn!(service = %self.0.name, "connections still open after {limit:?}");
        }
        Ok(())
    }

    /// Serves one connection until the client closes it, or until `stop` says so (then
    /// gracefully: the request in flight is answered first).
    async fn serve_connection(
        self,
        conn: tokio::net::TcpStream,
        mut stop: tokio::sync::watch::Receiver<bool>,
        _live: LiveConnection,
    ) {
        let service = hyper::service::service_fn(move |req| {
            let svc = self.clone();
            async move { Ok::<_, std::convert::Infallible>(svc.handle(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(conn), service);
        tokio::pin!(conn);
        let res = tokio::select! {
            r = conn.as_mut() => r,
            () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = res {
            tracing::debug!("connection: {e}");
        }
    }

    /// One request: a fresh instance, its handler called, the response it sets, or an error
    /// response if it failed (trap, memory limit: 500; past its deadline: 504).
    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        let inner = &self.0;
        let in_flight = inner.ticker.enter();
        let timeout = inner.config.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut wasi = WasiCtx::builder();
        wasi.inherit_stdout()
            .inherit_stderr()
            .envs(&inner.config.env);
        let mut store = Store::new(
            inner.pre.engine(),
            RequestHost {
                wasi: wasi.build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                limits: TaskLimiter::new(&inner.config.limits),
            },
        );
        store.limiter(|h| &mut h.limits);
        // A guest that computes yields to the other requests at every tick, and is stopped
        // at its deadline.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                return Err(wasmtime::Error::new(Interrupted::Timeout));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let prepared = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)
            .and_then(|req| {
                let out = store.data_mut().http().new_response_outparam(sender)?;
                Ok((req, out))
            });
        let (req, out) = match prepared {
            Ok(v) => v,
            Err(e) => {
                return error_response(
                    hyper::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("request: {e:#}"),
                )
            }
        };
        let pre = inner.pre.clone();
        let run = async move {
            let _in_flight = in_flight;
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            };
            // The epoch stops a guest running Wasm code; this stops one blocked in a host call.
            let res = match tokio::time::timeout(timeout, run).await {
                Ok(r) => r,
                Err(_) => Err(wasmtime::Error::new(Interrupted::Timeout)),
            };
            res.map_err(|e| (e, store.data_mut().limits.hit.take()))
        };
        // The guest runs on this task (no spawn, no hop to another thread) until it has set its
        // response; usually it has written the whole body by then too and has ended, so hyper
        // sends head and body together. A guest still running (streaming, or blocked) goes on
        // in a task of its own while hyper sends what it has.
        let mut run = Box::pin(run);
        let mut receiver = receiver;
        let mut ended = None;
        let head = std::future::poll_fn(|cx| {
            if ended.is_none() {
                if let std::task::Poll::Ready(r) = run.as_mut().poll(cx) {
                    ended = Some(r);
                }
            }
            std::pin::Pin::new(&mut receiver).poll(cx)
        })
        .await;
        let has_head = head.is_ok();
        let ended = match (ended, has_head) {
            (Some(r), _) => r,
            (None, true) => {
                let name = inner.name.clone();
                tokio::spawn(async move {
                    if let Err((e, limit)) = run.await {
                        let why = failure(&e, limit, timeout).1;
                        eprintln!("caisson-wasm: {name}: request failed after its response: {why}");
                    }
                });
                return match head {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(e)) => error_response(
                        hyper::StatusCode::INTERNAL_SERVER_ERROR,
                        format!("the handler answered with an error: {e:?}"),
                    ),
                    Err(_) => unreachable!("matched Ok above"),
                };
            }
            // The sender is dropped only with the store, which `run` owns until it ends.
            (None, false) => run.await,
        };
        match (head, ended) {
            (Ok(Ok(resp)), Ok(())) => resp,
            (Ok(Ok(resp)), Err((e, limit))) => {
                // Failed after sending its head: the body is cut short; the client sees it.
                let why = failure(&e, limit, timeout).1;
                eprintln!(
                    "caisson-wasm: {}: request failed after its response: {why}",
                    inner.name
                );
                resp
            }
            (Ok(Err(e)), _) => error_response(
                hyper::StatusCode::INTERNAL_SERVER_ERROR,
                format!("the handler answered with an error: {e:?}"),
            ),
            (Err(_), ended) => {
                let (status, why) = match ended {
                    Ok(()) => (
                        hyper::StatusCode::INTERNAL_SERVER_ERROR,
                        "the guest set no response".to_string(),
                    ),
                    Err((e, limit)) => failure(&e, limit, timeout),
                };
                tracing::warn!(service = %inner.name, "request failed: {why}");
                eprintln!("caisson-wasm: {}: request failed: {why}", inner.name);
                error_response(status, why)
            }
        }
    }
}

/// One of a thread's live connections: the dispatcher gives a new connection to the thread
/// with the fewest.
struct LiveConnection(Arc<AtomicUsize>);

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection handed to a worker thread, with its stop signal.
type Handoff = (std::net::TcpStream, tokio::sync::watch::Receiver<bool>);

/// The threads serving a service's connections: the acceptor's own (its connections are tasks
/// on its runtime) and up to `threads - 1` workers, each a thread with a runtime of its own.
/// A connection stays on the thread it was given: hyper's state and the requests' instances
/// never move between threads.
struct Threads {
    service: Service,
    max_workers: usize,
    local: Arc<AtomicUsize>,
    workers: Vec<Worker>,
}

struct Worker {
    live: Arc<AtomicUsize>,
    tx: tokio::sync::mpsc::UnboundedSender<Handoff>,
}

impl Worker {
    /// A thread with a runtime of its own, serving the connections it is handed until the
    /// handing side is dropped or it has been idle for [`WORKER_IDLE_EXIT`], and its last
    /// connection has ended.
    fn start(service: Service) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
        let live = Arc::new(AtomicUsize::new(0));
        let counter = live.clone();
        std::thread::Builder::new()
            .name("wasm-http".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut conns = tokio::task::JoinSet::new();
                    loop {
                        tokio::select! {
                            handoff = rx.recv() => {
                                let Some((conn, stop)) = handoff else { break };
                                // Counted by the dispatcher; uncounted when it ends.
                                let live = LiveConnection(counter.clone());
                                match tokio::net::TcpStream::from_std(conn) {
                                    Ok(conn) => {
                                        conns.spawn(service.clone().serve_connection(conn, stop, live));
                                    }
                                    Err(e) => tracing::debug!("taking a connection over: {e}"),
                                }
                            }
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                            // Idle for a while: end, so that a service busy once does not
                            // keep the thread. Closing first means no connection is lost: any
                            // already handed over are still received (and served), any later
                            // are refused and the dispatcher serves them elsewhere.
                            () = tokio::time::sleep(WORKER_IDLE_EXIT), if conns.is_empty() => {
                                rx.close();
                            }
                        }
                    }
                    while conns.join_next().await.is_some() {}
                });
                drop(rt);
                // What this thread allocated need not stay resident in an idle service.
                crate::sys::wasm::release_free_heap();
            })?;
        Ok(Self { live, tx })
    }
}

impl Threads {
    fn new(service: Service) -> Self {
        let max_workers = service.0.config.threads.saturating_sub(1);
        Self {
            service,
            max_workers,
            local: Arc::new(AtomicUsize::new(0)),
            workers: Vec::new(),
        }
    }

    /// Serves `conn` on the thread with the fewest live connections, starting a worker first
    /// if every running thread has one.
    fn dispatch(&mut self, conn: tokio::net::TcpStream, stop: tokio::sync::watch::Receiver<bool>) {
        let (mut conn, mut stop) = (conn, stop);
        // A second round only if the chosen worker had just ended.
        for _ in 0..2 {
            let mut best = None;
            let mut fewest = self.local.load(Ordering::Acquire);
            for (i, w) in self.workers.iter().enumerate() {
                let n = w.live.load(Ordering::Acquire);
                if n < fewest {
                    (best, fewest) = (Some(i), n);
                }
            }
            if fewest > 0 && self.workers.len() < self.max_workers {
                match Worker::start(self.service.clone()) {
                    Ok(w) => {
                        self.workers.push(w);
                        best = Some(self.workers.len() - 1);
                    }
                    Err(e) => {
                        tracing::warn!(service = %self.service.0.name, "worker thread: {e}");
                        self.max_workers = self.workers.len();
                    }
                }
            }
            let Some(i) = best else { break };
            let w = &self.workers[i];
            // Off this runtime's reactor; the worker registers it with its own.
            let std_conn = match conn.into_std() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("handing a connection over: {e}");
                    return;
                }
            };
            w.live.fetch_add(1, Ordering::AcqRel);
            let Err(tokio::sync::mpsc::error::SendError((std_conn, s))) =
                w.tx.send((std_conn, stop))
            else {
                return;
            };
            // The worker has ended (idle, or its runtime failed): forget it, choose again.
            self.workers.swap_remove(i);
            stop = s;
            conn = match tokio::net::TcpStream::from_std(std_conn) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("taking a connection back: {e}");
                    return;
                }
            };
        }
        self.local.fetch_add(1, Ordering::AcqRel);
        let live = LiveConnection(self.local.clone());
        tokio::spawn(self.service.clone().serve_connection(conn, stop, live));
    }
}

/// The status and message for a request whose guest failed with `e` (`limit`: the memory limit
/// it hit, if that is why).
fn failure(
    e: &wasmtime::Error,
    limit: Option<String>,
    timeout: Duration,
) -> (hyper::StatusCode, String) {
    if e.downcast_ref::<Interrupted>().is_some() {
        return (
            hyper::StatusCode::GATEWAY_TIMEOUT,
            format!("timed out after {} ms", timeout.as_millis()),
        );
    }
    match limit {
        Some(limit) => (
            hyper::StatusCode::INTERNAL_SERVER_ERROR,
            format!("memory limit: {limit}"),
        ),
        None => (hyper::StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

fn error_response(status: hyper::StatusCode, why: String) -> hyper::Response<HyperOutgoingBody> {
    use http_body_util::BodyExt;
    let text = match status {
        hyper::StatusCode::GATEWAY_TIMEOUT => format!("the Wasm handler {why}\n"),
        _ => format!("internal error: the Wasm handler failed: {why}\n"),
    };
    let body = http_body_util::Full::new(hyper::body::Bytes::from(text))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = hyper::Response::new(body);
    *resp.status_mut() = status;
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
