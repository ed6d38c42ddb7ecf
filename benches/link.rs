//! Seal/open throughput of 1 MiB frames with pools on tmpfs, and the two MAC candidates.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qgenome::keys::{pool, Direction};
use qgenome::link::polyval::Polyval;
use qgenome::link::{RecvStream, SendStream, StreamOptions};

const FRAME: usize = 1 << 20;

fn macs(c: &mut Criterion) {
    let data = vec![0x5au8; FRAME];
    let mut g = c.benchmark_group("mac_1MiB");
    g.throughput(Throughput::Bytes(FRAME as u64));
    g.bench_function("polyval_aggregated", |b| {
        b.iter(|| {
            let mut p = Polyval::new(&[7; 16]);
            p.update_blocks(&data);
            p.finalize()
        })
    });
    g.bench_function("polyval_crate", |b| {
        b.iter(|| {
            let mut p = Polyval::new_portable(&[7; 16]);
            p.update_blocks(&data);
            p.finalize()
        })
    });
    g.bench_function("poly1305_crate", |b| {
        use poly1305::universal_hash::{KeyInit, UniversalHash};
        b.iter(|| {
            let mut p = poly1305::Poly1305::new(&[7u8; 32].into());
            p.update_padded(&data);
            p.finalize()
        })
    });
    g.finish();
}

struct Link {
    _dir: tempfile::TempDir,
    tx: SendStream,
    rx: RecvStream,
}

/// A fresh link with 256 MiB per direction, pools on tmpfs when there is one.
fn fresh_link() -> Link {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    pool::provision("bench", 256 << 20, &a, &b).unwrap();
    let opts = StreamOptions::default();
    Link {
        tx: SendStream::from_dir(&a, "bench", Direction::AtoB, opts.clone()).unwrap(),
        rx: RecvStream::from_dir(&b, "bench", Direction::AtoB, opts).unwrap(),
        _dir: dir,
    }
}

fn seal_open(c: &mut Criterion) {
    let payload = vec![0x33u8; FRAME];
    let (mut frame, mut out) = (Vec::new(), Vec::new());
    let mut link = fresh_link();
    let mut g = c.benchmark_group("link_1MiB");
    g.throughput(Throughput::Bytes(FRAME as u64));
    g.sample_size(20);
    // Only seal + open are timed; running out of key re-provisions outside the timing.
    g.bench_function("seal_then_open", |bch| {
        bch.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                if link.tx.remaining() < FRAME as u64 + 32 {
                    link = fresh_link();
                }
                let t = std::time::Instant::now();
                link.tx.seal(&payload, &mut frame).unwrap();
                link.rx.open(&frame, &mut out).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, macs, seal_open);
criterion_main!(benches);
