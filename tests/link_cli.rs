//! `qgenome keys provision` and `qgenome keys status` end to end through the real binary.
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn qgenome(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qgenome"))
        .args(args)
        .env("QGENOME_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn provision_writes_matching_ends_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    let args = [
        "keys",
        "provision",
        "--link",
        "home-lsa",
        "--size",
        "1M",
        "--out-a",
        sa,
        "--out-b",
        sb,
    ];
    let out = qgenome(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: std::path::PathBuf| {
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600, "{}", p.display());
        assert_eq!(md.len(), 4096 + (1 << 20), "{}", p.display());
        std::fs::read(p).unwrap()
    };
    let mut keys = Vec::new();
    for d in ["a2b", "b2a"] {
        let pa = read(a.join(format!("home-lsa.{d}.pool")));
        let pb = read(b.join(format!("home-lsa.{d}.pool")));
        assert_eq!(&pa[..8], b"QGKPOOL\0");
        assert_eq!(pa[16..32], pb[16..32], "stream id shared by both ends");
        assert_eq!((pa[11], pb[11]), (0, 1), "end byte");
        assert_eq!(pa[4096..], pb[4096..], "same key at both ends of {d}");
        assert!(pa[4096..].iter().any(|&x| x != 0));
        keys.push(pa);
    }
    assert_ne!(
        keys[0][4096..4096 + 64],
        keys[1][4096..4096 + 64],
        "directions differ"
    );
    assert_ne!(keys[0][16..32], keys[1][16..32], "stream ids differ");

    let again = qgenome(&args);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("refusing to overwrite") && err.contains("home-lsa"),
        "{err}"
    );
    assert_eq!(
        read(a.join("home-lsa.a2b.pool")),
        keys[0],
        "existing pool untouched"
    );

    let status = qgenome(&[
        "keys", "status", "--link", "home-lsa", "--dir", sa, "--json",
    ]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v[0]["role"], "sender");
    // A new stream's first key block goes unused (destroyed before its ledger is made).
    assert_eq!(v[0]["remaining"], (1 << 20) - 4096);
    assert_eq!(v[0]["ledger"], 4096);
    assert_eq!(v[1]["role"], "receiver");

    // A pool cut short on its way to the far site is reported, not counted as full.
    let pool = a.join("home-lsa.a2b.pool");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pool)
        .unwrap()
        .set_len(500_000)
        .unwrap();
    let status = qgenome(&["keys", "status", "--link", "home-lsa", "--dir", sa]);
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success() && err.contains(&pool.display().to_string()),
        "a truncated pool was reported: {}{err}",
        String::from_utf8_lossy(&status.stdout)
    );
}

#[test]
fn provision_refuses_zero_and_absurd_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    for size in ["0", "900T", "12Q"] {
        let out = qgenome(&[
            "keys",
            "provision",
            "--link",
            "x",
            "--size",
            size,
            "--out-a",
            a.to_str().unwrap(),
            "--out-b",
            b.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "size {size} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("size"), "{size}: {err}");
        assert_eq!(std::fs::read_dir(&a).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(&b).unwrap().count(), 0);
    }
}
