//! Wasm task launch benchmarks: launch-to-exit of a hello-world WASI module inside a running
//! process (program already loaded: the template is instantiated, `_start` runs, one `fd_write`,
//! the store is dropped), and tasks per second on 1 and 2 threads.
//!
//! `cargo bench -p caisson-benches --bench wasm` first prints a percentile table from individual
//! timings, then runs the criterion benchmarks. The Rust guest (std, ~150 KB) and its wasip2
//! component are included when `target/wasm-guests` holds them (the tests build them).
use containerizer::wasm::{Engine, EngineConfig, Program, Source, Stdio, TaskSpec};
use criterion::{criterion_group, Criterion, Throughput};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn engine() -> Engine {
    Engine::new(EngineConfig::default()).unwrap()
}

/// The programs to time: (label, source, argv).
fn programs() -> Vec<(&'static str, Source, Vec<&'static str>)> {
    let ws = workspace();
    let mut v = vec![(
        "hello_wat",
        Source::path(ws.join("tests/guests/hello.wat")),
        vec!["hello"],
    )];
    for (label, target) in [
        ("rust_p1_module", "wasm32-wasip1"),
        ("rust_p2_component", "wasm32-wasip2"),
    ] {
        let p = ws.join(format!(
            "target/wasm-guests/{target}/release/caisson-guest.wasm"
        ));
        if p.exists() {
            v.push((label, Source::path(p), vec!["guest", "hello"]));
        }
    }
    v
}

/// One launch: stdout to /dev/null through a duplicated descriptor (a native task's log file is
/// an fd too), stderr discarded.
fn launch(engine: &Engine, program: &Program, devnull: &File, argv: &[&str]) {
    let task = TaskSpec {
        stdout: Stdio::File(devnull.try_clone().unwrap()),
        ..TaskSpec::new(argv.iter().copied())
    };
    let status = engine.run(program, task).unwrap();
    assert!(status.success(), "{status}");
}

/// Individual timings: median and tails, and throughput with 1 and 2 threads.
fn percentiles() {
    for keep in [0, 64 << 10, 1 << 20] {
        percentiles_with(keep);
    }
}

fn percentiles_with(keep_resident: usize) {
    let engine = Engine::new(EngineConfig {
        memory_keep_resident: keep_resident,
        ..EngineConfig::default()
    })
    .unwrap();
    let devnull = File::options().write(true).open("/dev/null").unwrap();
    println!(
        "\nwasm launch-to-exit, in process, from the template (individual timings), \
         memory_keep_resident = {} KiB",
        keep_resident >> 10
    );
    println!(
        "{:<20} {:>8} {:>8} {:>8} {:>8} {:>12} {:>12}",
        "program", "p50 µs", "p90 µs", "p99 µs", "min µs", "1 thr /s", "2 thr /s"
    );
    for (label, source, argv) in programs() {
        let program = engine.load(&source).unwrap();
        for _ in 0..2000 {
            launch(&engine, &program, &devnull, &argv);
        }
        let n = 20_000;
        let mut t: Vec<Duration> = (0..n)
            .map(|_| {
                let t0 = Instant::now();
                launch(&engine, &program, &devnull, &argv);
                t0.elapsed()
            })
            .collect();
        t.sort();
        let pct = |q: f64| t[((n as f64 * q) as usize).min(n - 1)].as_secs_f64() * 1e6;
        let rate = |threads: usize| {
            let per = 20_000 / threads;
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..per {
                            launch(&engine, &program, &devnull, &argv);
                        }
                    });
                }
            });
            (per * threads) as f64 / t0.elapsed().as_secs_f64()
        };
        println!(
            "{:<20} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>12.0} {:>12.0}",
            label,
            pct(0.5),
            pct(0.9),
            pct(0.99),
            t[0].as_secs_f64() * 1e6,
            rate(1),
            rate(2)
        );
    }
    println!();
}

fn bench(c: &mut Criterion) {
    let engine = engine();
    let devnull = File::options().write(true).open("/dev/null").unwrap();
    let mut g = c.benchmark_group("wasm_launch_to_exit");
    g.throughput(Throughput::Elements(1));
    for (label, source, argv) in programs() {
        let program = engine.load(&source).unwrap();
        g.bench_function(label, |b| {
            b.iter(|| launch(&engine, &program, &devnull, &argv))
        });
        // Two threads launching at once; time is per task, so elements/s is the total rate.
        g.bench_function(format!("{label}_2_threads"), |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(2);
                let t0 = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        s.spawn(|| {
                            for _ in 0..per {
                                launch(&engine, &program, &devnull, &argv);
                            }
                        });
                    }
                });
                t0.elapsed().mul_f64(iters as f64 / (2 * per) as f64)
            })
        });
    }
    g.finish();

    // Loading: from the in-memory template cache (path unchanged) and from the disk cache.
    let cache = tempfile::tempdir().unwrap();
    let hello = Source::path(workspace().join("tests/guests/hello.wat"));
    let cfg = || EngineConfig {
        cache_dir: Some(cache.path().into()),
        max_instances: 4,
        ..EngineConfig::default()
    };
    Engine::new(cfg()).unwrap().load(&hello).unwrap();
    let mut g = c.benchmark_group("wasm_load");
    g.bench_function("template_hit", |b| b.iter(|| engine.load(&hello).unwrap()));
    g.bench_function("new_engine_and_disk_cache_hit", |b| {
        b.iter(|| {
            let e = Engine::new(cfg()).unwrap();
            e.load(&hello).unwrap();
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = bench
}

fn main() {
    percentiles();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
