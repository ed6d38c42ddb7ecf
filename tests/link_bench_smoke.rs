//! `bench_seal` runs end to end and reports a positive rate.
#[test]
fn bench_seal_reports_a_rate() {
    let dir = tempfile::tempdir().unwrap();
    let size = std::env::var("QGENOME_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8 << 20);
    let b = qgenome::link::bench_seal_detail(size, dir.path()).unwrap();
    eprintln!("seal_mbps wall {:.0} cpu {:.0}", b.wall_mbps, b.cpu_mbps);
    assert!(b.wall_mbps > 0.0 && b.cpu_mbps > 0.0, "{b:?}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "bench cleaned up"
    );
}
