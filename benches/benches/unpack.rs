//! Layer unpack throughput against the gzip decoder alone on the same bytes (issue target:
//! unpack at least 70% of decode-only throughput). Run: `cargo bench -p caisson-benches --bench unpack`
//! (`CAISSON_BENCH_DIR=/dev/shm` unpacks into tmpfs, separating our CPU cost from the disk's).
use containerizer::image::unpack::{unpack_layer, UnpackOptions};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io::{Read, Write};

/// A ~64 MB layer of 2,000 files with mixed, partly compressible content.
fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut x = 0x243f6a8885a308d3u64;
    for i in 0..2000u32 {
        let len = 8 * 1024 + (i as usize * 97 % 56) * 1024;
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Half random, half text-like, so gzip has real work both ways.
            if (x >> 60) < 8 {
                data.extend_from_slice(&x.to_le_bytes());
            } else {
                data.extend_from_slice(b"caisson ");
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("d{}/f{i}", i % 50), &data[..])
            .expect("append");
    }
    b.into_inner().expect("tar")
}

fn bench(c: &mut Criterion) {
    let tar = layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let mut g = c.benchmark_group("layer");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.bench_function("gzip_decode_only", |b| {
        b.iter(|| {
            let mut d = flate2::read::GzDecoder::new(&gz[..]);
            let mut buf = vec![0u8; 256 * 1024];
            while d.read(&mut buf).expect("decode") > 0 {}
        })
    });
    // CAISSON_BENCH_DIR=/dev/shm separates our CPU cost from the filesystem's.
    let base = match std::env::var_os("CAISSON_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).expect("tmp"),
        None => tempfile::tempdir().expect("tmp"),
    };
    let mut n = 0;
    g.bench_function("unpack_gzip_layer", |b| {
        // Only the unpack is timed: creating the empty dest and deleting the tree are not.
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let dest = base.path().join(n.to_string());
                std::fs::create_dir(&dest).expect("dest");
                let t = std::time::Instant::now();
                unpack_layer(
                    &gz[..],
                    &dest,
                    &UnpackOptions {
                        max_size: 1 << 40,
                        preserve_ownership: false,
                    },
                )
                .expect("unpack");
                total += t.elapsed();
                std::fs::remove_dir_all(&dest).expect("cleanup");
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
