//! Criterion benchmarks of the sharing engine: 1 MiB chunks, the chunk size the filesystem uses.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qgenome::sharing::{Drbg, RandomSource, Scheme};

const CHUNK: usize = 1 << 20;

fn sharing(c: &mut Criterion) {
    let mut secret = vec![0u8; CHUNK];
    let mut rng = Drbg::from_os().unwrap();
    rng.fill(&mut secret).unwrap();
    let mut group = c.benchmark_group("sharing");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    for (k, n) in [(2, 3), (3, 5)] {
        let scheme = Scheme::new(k, n).unwrap();
        let mut shares = vec![vec![0u8; scheme.share_len(CHUNK)]; n];
        group.bench_function(BenchmarkId::new("split", format!("{k}of{n}")), |b| {
            b.iter(|| {
                let mut refs: Vec<&mut [u8]> = shares.iter_mut().map(Vec::as_mut_slice).collect();
                scheme.split(&secret, &mut rng, &mut refs).unwrap();
            })
        });
        {
            // Untimed, so that the shares are a sharing of `secret` also when a filter skipped
            // the split bench.
            let mut refs: Vec<&mut [u8]> = shares.iter_mut().map(Vec::as_mut_slice).collect();
            scheme.split(&secret, &mut rng, &mut refs).unwrap();
        }
        let given: Vec<(usize, &[u8])> = (n - k..n).map(|i| (i, shares[i].as_slice())).collect();
        let mut out = vec![0u8; CHUNK];
        group.bench_function(BenchmarkId::new("combine", format!("{k}of{n}")), |b| {
            b.iter(|| scheme.combine(&given, CHUNK, &mut out).unwrap())
        });
        // Whether or not the combine bench ran: the shares rebuild the secret.
        scheme.combine(&given, CHUNK, &mut out).unwrap();
        assert_eq!(out, secret);
    }
    group.finish();
}

criterion_group!(benches, sharing);
criterion_main!(benches);
