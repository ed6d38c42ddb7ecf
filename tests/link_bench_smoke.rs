//! `bench_seal` runs end to end and reports a positive rate.
#[test]
fn bench_seal_reports_a_rate() {
    let dir = tempfile::tempdir().unwrap();
    let size = std::env::var("QGENOME_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8 << 20);
    let mbps = qgenome::link::bench_seal(size, dir.path()).unwrap();
    eprintln!("seal_mbps {mbps:.0}");
    assert!(mbps > 0.0, "{mbps}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "bench cleaned up"
    );
}
