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

/// `qgenome bench split --json` reports every rate with the copy floor beside the split, and
/// the same again on every core when the machine has more than one.
#[test]
fn bench_split_reports_split_combine_seal_and_the_copy_floor() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qgenome"))
        .args([
            "bench",
            "split",
            "--size",
            "8M",
            "--passes",
            "1",
            "--no-baseline",
        ])
        .args(["--json", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let positive = |v: &serde_json::Value, key: &str| {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"));
        assert!(x > 0.0, "{key} = {x}");
    };
    for key in ["split_mbps", "combine_mbps", "seal_mbps", "copy_floor_mbps"] {
        positive(&v, key);
    }
    assert_eq!(v["threads"], 1);
    let cores = std::thread::available_parallelism().unwrap().get();
    if cores > 1 {
        assert_eq!(v["all_cores"]["threads"], cores);
        positive(&v["all_cores"], "split_mbps");
        positive(&v["all_cores"], "copy_floor_mbps");
    } else {
        assert!(v.get("all_cores").is_none());
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "bench cleaned up"
    );
}
