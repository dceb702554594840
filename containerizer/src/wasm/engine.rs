//! The wasmtime engine, its compile cache (disk) and template cache (memory), and running a task.
use super::source::{sniff, Source, WasmKind};
use super::task::{classify, ExitStatus, Host, Interrupted, TaskSpec};
use super::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker as ComponentLinker};
use wasmtime::{
    Config, InstanceAllocationStrategy, InstancePre, Linker, Module, ModuleExport,
    PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::p2::bindings::sync::CommandPre;

/// WASI 0.2 packages the component linker provides (`wasi:{pkg}/...@0.2.x`).
const P2_PACKAGES: &[&str] = &["cli", "clocks", "filesystem", "io", "random", "sockets"];

/// How the engine is built. The defaults suit an agent; a one-shot CLI may shrink the pool.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory of the on-disk compile cache; `None` compiles in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Period of the epoch ticker: the granularity of timeouts and kills.
    pub epoch_tick: Duration,
    /// Run a ticker thread (started by the first run in each process). Off: the caller
    /// advances the epoch ([`Engine::increment_epoch`]) when it wants a kill or a timeout
    /// noticed; a one-shot process does so only once it has one, and a guest that ends in
    /// microseconds never waits for a thread to start.
    pub epoch_ticker: bool,
    /// Instances (core instances, memories, tables, component instances) the pooling allocator
    /// holds at once: the number of tasks that can run concurrently in this process. With 1
    /// there is no pool (instances are allocated on demand).
    pub max_instances: u32,
    /// Largest size one linear memory may ever reach in this engine (the per-task limit is
    /// [`super::Limits`]); at most 4 GiB for 32-bit memories.
    pub max_memory_size: usize,
    /// Templates kept in memory; the oldest is dropped past this.
    pub max_templates: usize,
    /// Bytes of each linear memory reset with `memset` (kept resident) rather than `madvise`
    /// when an instance ends: cheaper for small guests, wasted work for big ones.
    pub memory_keep_resident: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            epoch_tick: Duration::from_millis(10),
            epoch_ticker: true,
            max_instances: 1000,
            max_memory_size: 4 << 30,
            max_templates: 256,
            memory_keep_resident: 64 << 10,
        }
    }
}

/// Where one [`Engine::run_timed`] spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunTimings {
    /// WASI context (stdio, preopens) and store.
    pub setup: Duration,
    /// Instantiating the template (pooling allocator slot, memory init).
    pub instantiate: Duration,
    /// The guest's entry point, to its return or exit.
    pub run: Duration,
    /// Dropping the store (the instance goes back to the pool).
    pub teardown: Duration,
}

/// What kind of program a [`Program`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// A core module exporting `_start`, importing `wasi_snapshot_preview1`.
    WasiP1Module,
    /// A component exporting `wasi:cli/run@0.2.x`.
    WasiP2Component,
}

/// Where [`Engine::load_with_origin`] found a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOrigin {
    /// A template already in memory.
    Memory,
    /// A compiled artifact mapped from the disk cache.
    Disk,
    /// Compiled now (and written to the disk cache, if there is one).
    Compiled,
}

/// A loaded, linked program: the template every run of it instantiates from. Cheap to clone.
#[derive(Clone)]
pub struct Program(Arc<ProgramInner>);

struct ProgramInner {
    name: String,
    digest: String,
    template: Template,
}

enum Template {
    Core {
        pre: InstancePre<Host>,
        start: ModuleExport,
    },
    Component {
        pre: CommandPre<Host>,
    },
}

impl Program {
    pub fn kind(&self) -> ProgramKind {
        match self.0.template {
            Template::Core { .. } => ProgramKind::WasiP1Module,
            Template::Component { .. } => ProgramKind::WasiP2Component,
        }
    }
    /// `sha256:<hex>` of the binary module (text sources are hashed after parsing).
    pub fn digest(&self) -> &str {
        &self.0.digest
    }
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("name", &self.0.name)
            .field("digest", &self.0.digest)
            .field("kind", &self.kind())
            .finish()
    }
}

/// The Wasm engine of a process: share it (it is cheap to clone) and load/run through it from
/// any thread.
#[derive(Clone)]
pub struct Engine(Arc<Inner>);

struct Inner {
    engine: wasmtime::Engine,
    core_linker: Linker<Host>,
    /// Built on the first component: a one-shot process running a core module never pays for
    /// defining the hundreds of WASI 0.2 functions.
    component_linker: std::sync::OnceLock<ComponentLinker<Host>>,
    /// `wasi_snapshot_preview1` functions the core linker defines, to name a missing one (built
    /// only when linking fails).
    p1_names: std::sync::OnceLock<HashSet<String>>,
    /// `<cache_dir>/<compatibility hash>`, created on first write.
    cache_dir: Option<PathBuf>,
    compat: String,
    max_templates: usize,
    templates: Mutex<Templates>,
    epoch_tick: Duration,
    auto_ticker: bool,
    /// The epoch ticker of this process (dropping the sender stops it), started by the first
    /// run: an engine that only loads (a launcher validating a module) starts no thread, and a
    /// child forked from the engine's process (which inherits the engine but not the thread)
    /// starts its own.
    ticker: Mutex<Option<mpsc::Sender<()>>>,
    /// The pid whose ticker runs (0: none yet).
    ticker_pid: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct Templates {
    by_digest: HashMap<String, Program>,
    order: std::collections::VecDeque<String>,
    /// A path whose identity (device, inode, size, mtime) is unchanged maps to the digest seen
    /// last time, so a repeated launch from a file skips reading and hashing it.
    by_path: HashMap<PathBuf, (FileId, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

fn engine_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Engine(format!("{context}: {e:#}"))
}

impl Engine {
    /// Builds the engine: Cranelift, pooling allocator (on demand for one instance) with
    /// copy-on-write memory images, epoch interruption with a ticker thread, WASI p1 and p2
    /// linkers.
    pub fn new(config: EngineConfig) -> Result<Self> {
        let n = config.max_instances.max(1);
        // One instance at a time (a one-shot launcher): nothing to pool, and building the pool
        // (its slots' reservations and per-CPU index sizing) is a fifth of such an engine's
        // start; instances are then mapped on demand, copy-on-write all the same.
        let strategy = if n == 1 {
            InstanceAllocationStrategy::OnDemand
        } else {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_core_instances(n)
                .total_component_instances(n)
                .total_memories(n)
                .total_tables(n)
                // Async is off: guests run on the caller's stack, no fiber stacks are needed.
                .total_stacks(1)
                .max_memory_size(config.max_memory_size)
                // Reset small memories with memset instead of madvise: a hello-world instance
                // is a few pages, and re-faulting them costs more than clearing them.
                .linear_memory_keep_resident(config.memory_keep_resident)
                .table_keep_resident(1 << 16);
            InstanceAllocationStrategy::Pooling(pool)
        };
        let mut cfg = Config::new();
        cfg.strategy(wasmtime::Strategy::Cranelift)
            .allocation_strategy(strategy)
            .memory_init_cow(true)
            .epoch_interruption(true)
            .parallel_compilation(true);
        let engine = wasmtime::Engine::new(&cfg).map_err(|e| engine_err("config", e))?;

        let mut core_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut core_linker, |h: &mut Host| &mut h.wasi)
            .map_err(|e| engine_err("WASI p1 linker", e))?;
        let compat = {
            let mut h = std::hash::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            format!("{:016x}", h.finish())
        };
        let cache_dir = config.cache_dir.map(|d| d.join(&compat));

        Ok(Self(Arc::new(Inner {
            engine,
            core_linker,
            component_linker: std::sync::OnceLock::new(),
            p1_names: std::sync::OnceLock::new(),
            cache_dir,
            compat,
            max_templates: config.max_templates.max(1),
            templates: Mutex::new(Templates::default()),
            epoch_tick: config.epoch_tick.max(Duration::from_millis(1)),
            auto_ticker: config.epoch_ticker,
            ticker: Mutex::new(None),
            ticker_pid: Default::default(),
        })))
    }

    /// Advances the epoch: running guests check their kill switch and deadline (with
    /// [`EngineConfig::epoch_ticker`] off; the ticker does it every [`Engine::epoch_tick`]).
    pub fn increment_epoch(&self) {
        self.0.engine.increment_epoch();
    }

    /// The ticker's period.
    pub fn epoch_tick(&self) -> Duration {
        self.0.epoch_tick
    }

    /// Starts this process's epoch ticker unless it runs: kills and timeouts are checked at its
    /// ticks. Called by every run (one atomic load once it runs).
    fn ensure_ticker(&self) -> Result<()> {
        let pid = std::process::id();
        if self.0.ticker_pid.load(Ordering::Acquire) == pid {
            return Ok(());
        }
        let mut slot = self.0.ticker.lock().unwrap_or_else(|p| p.into_inner());
        if self.0.ticker_pid.load(Ordering::Acquire) == pid {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel::<()>();
        let ticking = self.0.engine.clone();
        let tick = self.0.epoch_tick;
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                // Ends when the engine is dropped (sender gone).
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(tick) {
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| engine_err("epoch ticker thread", e))?;
        // A sender inherited through fork belongs to a thread this process does not have:
        // forget it rather than signal a channel no one here reads.
        if let Some(old) = slot.replace(tx) {
            std::mem::forget(old);
        }
        self.0.ticker_pid.store(pid, Ordering::Release);
        Ok(())
    }

    /// The engine's compatibility hash (hex), the second half of a disk cache key.
    pub fn compatibility_hash(&self) -> &str {
        &self.0.compat
    }

    /// The directory holding this engine's compiled artifacts, if caching on disk.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.0.cache_dir.as_deref()
    }

    /// Loads `source` into a runnable [`Program`] (from memory, the disk cache, or compiling it).
    pub fn load(&self, source: &Source) -> Result<Program> {
        self.load_with_origin(source).map(|(p, _)| p)
    }

    /// Same as [`Engine::load`], also telling which cache the program came from.
    pub fn load_with_origin(&self, source: &Source) -> Result<(Program, CacheOrigin)> {
        let name = source.name();
        let (bytes, file_id) = match source {
            Source::Path(path) => {
                let meta = std::fs::metadata(path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                let id = FileId::of(&meta);
                if let Some(p) = self.template_for_path(path, id) {
                    return Ok((p, CacheOrigin::Memory));
                }
                let bytes = std::fs::read(path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                (std::borrow::Cow::Owned(bytes), Some((path.clone(), id)))
            }
            Source::Bytes { bytes, .. } => (std::borrow::Cow::Borrowed(&bytes[..]), None),
        };
        let binary = to_binary(&name, bytes)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&binary)));

        let cached = self
            .0
            .templates
            .lock()
            .unwrap()
            .by_digest
            .get(&digest)
            .cloned();
        let (program, origin) = match cached {
            Some(p) => (p, CacheOrigin::Memory),
            None => {
                let (template, origin) = self.compile(&name, &digest, &binary)?;
                let program = Program(Arc::new(ProgramInner {
                    name: name.clone(),
                    digest: digest.clone(),
                    template,
                }));
                self.remember(&digest, &program);
                (program, origin)
            }
        };
        if let Some((path, id)) = file_id {
            let mut t = self.0.templates.lock().unwrap();
            t.by_path.insert(path, (id, digest));
        }
        tracing::debug!(program = %name, digest = %program.digest(), ?origin, "wasm program loaded");
        Ok((program, origin))
    }

    fn template_for_path(&self, path: &Path, id: FileId) -> Option<Program> {
        let t = self.0.templates.lock().unwrap();
        let (seen, digest) = t.by_path.get(path)?;
        (*seen == id).then(|| t.by_digest.get(digest).cloned())?
    }

    fn remember(&self, digest: &str, program: &Program) {
        let mut t = self.0.templates.lock().unwrap();
        if t.by_digest
            .insert(digest.to_string(), program.clone())
            .is_none()
        {
            t.order.push_back(digest.to_string());
        }
        while t.order.len() > self.0.max_templates {
            if let Some(old) = t.order.pop_front() {
                t.by_digest.remove(&old);
            }
        }
    }

    /// Gets the compiled artifact (disk cache or Cranelift) and links it into a template.
    fn compile(&self, name: &str, digest: &str, binary: &[u8]) -> Result<(Template, CacheOrigin)> {
        let kind = match sniff(binary) {
            Some(k @ (WasmKind::Module | WasmKind::Component)) => k,
            _ => {
                return Err(Error::NotWasm {
                    name: name.into(),
                    reason: "no Wasm magic number".into(),
                })
            }
        };
        let hex = digest.trim_start_matches("sha256:");
        match kind {
            WasmKind::Component => {
                let path = self.cache_path(hex, "component");
                let (component, origin) = match path
                    .as_deref()
                    .and_then(|p| self.map_cached(p, crate::sys::wasm::deserialize_component_file))
                {
                    Some(c) => (c, CacheOrigin::Disk),
                    None => {
                        let c = Component::from_binary(&self.0.engine, binary).map_err(|e| {
                            Error::Invalid {
                                name: name.into(),
                                message: format!("{e:#}"),
                            }
                        })?;
                        if let Some(p) = &path {
                            self.write_cached(p, c.serialize());
                        }
                        (c, CacheOrigin::Compiled)
                    }
                };
                Ok((self.link_component(name, &component)?, origin))
            }
            _ => {
                check_binary_version(name, binary)?;
                let path = self.cache_path(hex, "module");
                let (module, origin) = match path
                    .as_deref()
                    .and_then(|p| self.map_cached(p, crate::sys::wasm::deserialize_module_file))
                {
                    Some(m) => (m, CacheOrigin::Disk),
                    None => {
                        let m = Module::from_binary(&self.0.engine, binary).map_err(|e| {
                            Error::Invalid {
                                name: name.into(),
                                message: format!("{e:#}"),
                            }
                        })?;
                        if let Some(p) = &path {
                            self.write_cached(p, m.serialize());
                        }
                        (m, CacheOrigin::Compiled)
                    }
                };
                Ok((self.link_module(name, &module)?, origin))
            }
        }
    }

    fn cache_path(&self, hex: &str, kind: &str) -> Option<PathBuf> {
        self.0
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{hex}.{kind}.cwasm")))
    }

    /// Maps a cached artifact; any failure (absent, stale, corrupt) just means "compile again".
    fn map_cached<T>(
        &self,
        path: &Path,
        load: fn(&wasmtime::Engine, &Path) -> wasmtime::Result<T>,
    ) -> Option<T> {
        if !path.exists() {
            return None;
        }
        match load(&self.0.engine, path) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "ignoring unusable compile cache entry");
                None
            }
        }
    }

    /// Writes an artifact by rename, so a file that some process has mapped never changes.
    /// Failing to cache is not failing to run: it is logged and ignored.
    fn write_cached(&self, path: &Path, bytes: wasmtime::Result<Vec<u8>>) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let res = (|| -> std::result::Result<(), String> {
            let bytes = bytes.map_err(|e| format!("serialize: {e:#}"))?;
            let dir = path.parent().expect("cache path has a parent");
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let tmp = dir.join(format!(
                ".tmp.{}.{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            // Synced before it is named: its code is mapped and run as is, so a crash must not
            // leave a complete-looking file with blocks never written (a cut-short one is
            // refused at load and compiled again). Once per module and engine.
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &bytes)?;
                f.sync_all()
            };
            write().map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("{}: {e}", tmp.display())
            })?;
            std::fs::rename(&tmp, path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("{}: {e}", path.display())
            })
        })();
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not write the compile cache");
        }
    }

    /// Checks that a core module is a WASI p1 command whose imports we provide, and pre-links it.
    fn link_module(&self, name: &str, module: &Module) -> Result<Template> {
        for imp in module.imports() {
            let (m, n) = (imp.module(), imp.name());
            match m {
                // Checked by the linker below; named precisely if that fails.
                "wasi_snapshot_preview1" => {}
                "wasi_unstable" => {
                    return Err(Error::WrongWasiVersion {
                        name: name.into(),
                        found: "WASI preview 0 (imports `wasi_unstable`)".into(),
                    })
                }
                m if m.starts_with("wasi:") => {
                    return Err(Error::WrongWasiVersion {
                        name: name.into(),
                        found: format!(
                            "WASI 0.2 as a core module (imports `{m}`); make it a component \
                             (`wasm-tools component new`)"
                        ),
                    })
                }
                _ => {
                    return Err(Error::UnknownImport {
                        name: name.into(),
                        import: format!("{m}::{n}"),
                        hint: String::new(),
                    })
                }
            }
        }
        let start = match module.get_export("_start") {
            Some(wasmtime::ExternType::Func(f))
                if f.params().len() == 0 && f.results().len() == 0 =>
            {
                module.get_export_index("_start").expect("export exists")
            }
            Some(_) => {
                return Err(Error::NotCommand {
                    name: name.into(),
                    reason: "`_start` is not a function taking and returning nothing".into(),
                })
            }
            None if module.get_export("_initialize").is_some() => {
                return Err(Error::NotCommand {
                    name: name.into(),
                    reason: "it is a reactor (exports `_initialize`, no `_start`)".into(),
                })
            }
            None => {
                return Err(Error::NotCommand {
                    name: name.into(),
                    reason: "the module exports no `_start` function".into(),
                })
            }
        };
        let pre = self.0.core_linker.instantiate_pre(module).map_err(|e| {
            let defined = self.p1_names();
            match module
                .imports()
                .find(|i| i.module() == "wasi_snapshot_preview1" && !defined.contains(i.name()))
            {
                Some(i) => Error::UnknownImport {
                    name: name.into(),
                    import: format!("wasi_snapshot_preview1::{}", i.name()),
                    hint: " (not a WASI preview 1 function)".into(),
                },
                None => Error::Link {
                    name: name.into(),
                    message: format!("{e:#}"),
                },
            }
        })?;
        Ok(Template::Core { pre, start })
    }

    fn p1_names(&self) -> &HashSet<String> {
        self.0.p1_names.get_or_init(|| {
            let mut store = Store::new(&self.0.engine, Host::empty());
            self.0
                .core_linker
                .iter(&mut store)
                .filter(|(m, _, _)| *m == "wasi_snapshot_preview1")
                .map(|(_, n, _)| n.to_string())
                .collect()
        })
    }

    fn component_linker(&self) -> Result<&ComponentLinker<Host>> {
        if let Some(l) = self.0.component_linker.get() {
            return Ok(l);
        }
        let mut linker = ComponentLinker::new(&self.0.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| engine_err("WASI p2 linker", e))?;
        // A racing thread may have set it first; either linker is equivalent.
        Ok(self.0.component_linker.get_or_init(|| linker))
    }

    /// Checks that a component is a `wasi:cli/command` whose imports we provide, and pre-links it.
    fn link_component(&self, name: &str, component: &Component) -> Result<Template> {
        let engine = &self.0.engine;
        let ty = component.component_type();
        for (import, _) in ty.imports(engine) {
            let Some(rest) = import.strip_prefix("wasi:") else {
                return Err(Error::UnknownImport {
                    name: name.into(),
                    import: import.into(),
                    hint: String::new(),
                });
            };
            let (pkg, version) = match rest.split_once('/') {
                Some((pkg, iface)) => (pkg, iface.split_once('@').map(|(_, v)| v)),
                None => (rest, None),
            };
            if version.is_some_and(|v| !v.starts_with("0.2.")) {
                return Err(Error::WrongWasiVersion {
                    name: name.into(),
                    found: format!("WASI {} (imports `{import}`)", version.unwrap_or("?")),
                });
            }
            if !P2_PACKAGES.contains(&pkg) {
                let hint = if pkg == "http" {
                    " (wasi:http components are served, not run as commands)".into()
                } else {
                    String::new()
                };
                return Err(Error::UnknownImport {
                    name: name.into(),
                    import: import.into(),
                    hint,
                });
            }
        }
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        if !exports.iter().any(|e| e.starts_with("wasi:cli/run@0.2.")) {
            let reason = if exports
                .iter()
                .any(|e| e.starts_with("wasi:http/incoming-handler@"))
            {
                "it is a wasi:http/proxy component (exports wasi:http/incoming-handler), not a \
                 wasi:cli/command"
                    .to_string()
            } else {
                format!(
                    "it does not export wasi:cli/run@0.2.x (exports: {})",
                    if exports.is_empty() {
                        "none".to_string()
                    } else {
                        exports.join(", ")
                    }
                )
            };
            return Err(Error::NotCommand {
                name: name.into(),
                reason,
            });
        }
        let pre = self
            .component_linker()?
            .instantiate_pre(component)
            .map_err(|e| Error::Link {
                name: name.into(),
                message: format!("{e:#}"),
            })?;
        let pre = CommandPre::new(pre).map_err(|e| Error::NotCommand {
            name: name.into(),
            reason: format!("{e:#}"),
        })?;
        Ok(Template::Component { pre })
    }

    /// Runs one task of `program` to its end on the calling thread. `Err` only for setup problems
    /// (stdio files, preopens); how the guest ended is the [`ExitStatus`].
    pub fn run(&self, program: &Program, task: TaskSpec) -> Result<ExitStatus> {
        self.run_timed(program, task).map(|(status, _)| status)
    }

    /// [`Engine::run`], also saying where the time went (for `caisson bench launch`): a few
    /// clock reads, tens of nanoseconds on a task of microseconds.
    pub fn run_timed(
        &self,
        program: &Program,
        mut task: TaskSpec,
    ) -> Result<(ExitStatus, RunTimings)> {
        let t0 = Instant::now();
        if self.0.auto_ticker {
            self.ensure_ticker()?;
        }
        let host = Host::for_task(&mut task)?;
        let mut store = Store::new(&self.0.engine, host);
        store.limiter(|h| &mut h.limiter);
        // Check kill and timeout at every tick; the callback costs nothing between ticks.
        let deadline = task.timeout.map(|t| Instant::now() + t);
        let kill = task.kill.clone();
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if let Some(why) = kill.as_ref().and_then(|k| k.interruption()) {
                return Err(wasmtime::Error::new(why));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(wasmtime::Error::new(Interrupted::Timeout));
            }
            Ok(UpdateDeadline::Continue(1))
        });
        let t1 = Instant::now();
        // Set when instantiation is done; stays unset if it fails.
        let mut t2 = None;
        let result = match &program.0.template {
            Template::Core { pre, start } => (|| {
                let instance = pre.instantiate(&mut store)?;
                let func = instance
                    .get_module_export(&mut store, start)
                    .and_then(|e| e.into_func())
                    .ok_or_else(|| wasmtime::format_err!("`_start` is missing"))?;
                let func = func.typed::<(), ()>(&store)?;
                t2 = Some(Instant::now());
                func.call(&mut store, ())
            })(),
            Template::Component { pre } => (|| {
                let command = pre.instantiate(&mut store)?;
                t2 = Some(Instant::now());
                match command.wasi_cli_run().call_run(&mut store)? {
                    Ok(()) => Ok(()),
                    Err(()) => Err(wasmtime::Error::new(wasmtime_wasi::I32Exit(1))),
                }
            })(),
        };
        let t3 = Instant::now();
        let status = match result {
            Ok(()) => ExitStatus::Exited { code: 0 },
            Err(e) => classify(e, store.data(), task.timeout),
        };
        drop(store);
        let t4 = Instant::now();
        let t2 = t2.unwrap_or(t3);
        tracing::debug!(program = %program.name(), %status, "wasm task ended");
        Ok((
            status,
            RunTimings {
                setup: t1 - t0,
                instantiate: t2 - t1,
                run: t3 - t2,
                teardown: t4 - t3,
            },
        ))
    }

    /// Loads and runs in one call.
    pub fn run_source(&self, source: &Source, task: TaskSpec) -> Result<ExitStatus> {
        let program = self.load(source)?;
        self.run(&program, task)
    }
}

/// Parses WebAssembly text into binary; binary input passes through.
fn to_binary<'a>(
    name: &str,
    bytes: std::borrow::Cow<'a, [u8]>,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    match sniff(&bytes) {
        Some(WasmKind::Module | WasmKind::Component) => Ok(bytes),
        Some(WasmKind::Text) => wat::parse_bytes(&bytes)
            .map(|b| std::borrow::Cow::Owned(b.into_owned()))
            .map_err(|e| Error::Invalid {
                name: name.into(),
                message: e.to_string(),
            }),
        None => {
            // Maybe text after all (no leading form we recognise) if it is named .wat.
            if name.ends_with(".wat") {
                return wat::parse_bytes(&bytes)
                    .map(|b| std::borrow::Cow::Owned(b.into_owned()))
                    .map_err(|e| Error::Invalid {
                        name: name.into(),
                        message: e.to_string(),
                    });
            }
            let reason = if bytes.starts_with(b"\x7fELF") {
                "it is an ELF executable".to_string()
            } else if bytes.is_empty() {
                "the file is empty".to_string()
            } else {
                format!(
                    "no Wasm magic number (starts with {:02x?})",
                    &bytes[..bytes.len().min(4)]
                )
            };
            Err(Error::NotWasm {
                name: name.into(),
                reason,
            })
        }
    }
}

/// A core module must be binary version 1; anything else gets a clear message instead of a
/// parser error.
fn check_binary_version(name: &str, binary: &[u8]) -> Result<()> {
    match binary.get(4..8) {
        Some([1, 0, 0, 0]) => Ok(()),
        Some(v) => Err(Error::Invalid {
            name: name.into(),
            message: format!("unsupported Wasm binary version {v:02x?} (expected 1)"),
        }),
        None => Err(Error::NotWasm {
            name: name.into(),
            reason: "truncated header".into(),
        }),
    }
}
