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

/// `qgenome bench ceiling --json` times every required stage, counts its bytes for the (2,3)
/// deployment of `bench e2e`, and gives the ceiling as the cores over the summed cost.
#[test]
fn bench_ceiling_sums_every_stage_per_plaintext_mb() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qgenome"))
        .args([
            "bench", "ceiling", "--size", "8M", "--passes", "1", "--json",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stages = v["stages"].as_array().unwrap_or_else(|| panic!("{v}"));
    let names: Vec<&str> = stages.iter().filter_map(|s| s["stage"].as_str()).collect();
    assert_eq!(
        names,
        [
            "sha256",
            "split",
            "combine",
            "seal+open",
            "tcp",
            "unix",
            "vol-write",
            "vol-read",
            "fuse-copy"
        ]
    );
    let f = |s: &serde_json::Value, key: &str| {
        s[key].as_f64().unwrap_or_else(|| panic!("no {key} in {s}"))
    };
    let by = |name: &str| stages.iter().find(|s| s["stage"] == name).unwrap();
    for s in stages {
        assert!(f(s, "cpu_mbps") > 0.0, "{s}");
    }
    // (2,3): both remote shares sealed and sent on a store, one on a restore (the home share
    // is read first); three shares written, two read.
    assert_eq!(f(by("seal+open"), "store_bytes_per_byte"), 2.0);
    assert_eq!(f(by("seal+open"), "restore_bytes_per_byte"), 1.0);
    assert_eq!(f(by("tcp"), "store_bytes_per_byte"), 2.0);
    assert_eq!(f(by("unix"), "restore_bytes_per_byte"), 1.0);
    assert_eq!(f(by("vol-write"), "store_bytes_per_byte"), 3.0);
    assert_eq!(f(by("vol-read"), "restore_bytes_per_byte"), 2.0);
    assert_eq!(f(by("split"), "restore_bytes_per_byte"), 0.0);
    assert_eq!(f(by("combine"), "store_bytes_per_byte"), 0.0);
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    assert_eq!(v["cores"].as_f64(), Some(cores));
    for phase in ["store", "restore"] {
        let sum: f64 = stages
            .iter()
            .map(|s| f(s, &format!("{phase}_ms_per_mb")))
            .sum();
        let total = f(&v, &format!("{phase}_ms_per_mb"));
        assert!((sum - total).abs() < 0.05, "{phase}: {sum} vs {total}");
        let ceiling = f(&v, &format!("{phase}_ceiling_mbps"));
        let expect = cores * 1000.0 / total;
        assert!(
            (ceiling - expect).abs() / expect < 0.02,
            "{phase}: {ceiling} vs {expect}"
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "bench cleaned up"
    );
}
