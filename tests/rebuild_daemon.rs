//! `qgenome catalog rebuild` on a real deployment: three `qgenome-mountd` daemons (home over
//! its Unix socket, two remote over one-time-pad links), files written through the real
//! mount, the catalog deleted, rebuilt by the binary, remounted and read back under consent.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qgenome::deploy::{DeployOptions, Deployment};
use qgenome::sharing::{Drbg, RandomSource};
use serde_json::json;

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Drbg::from_os().unwrap().fill(&mut v).unwrap();
    v
}

fn rebuild(config: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qgenome"))
        .args(["catalog", "rebuild", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn the_rebuild_command_restores_a_deleted_catalog_on_real_daemons() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_qgenome"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        bin.join("qgenome-mountd").exists(),
        "qgenome-mountd is not built beside {} (run `cargo build --workspace` or `make test`)",
        bin.display()
    );
    let mut opts = DeployOptions::new(tmp.path());
    opts.volume_size = 64 << 20;
    // Every process that opens a link reserves (and at exit wastes) one 64 MiB key window
    // per direction: the mount, the two rebuilds and the mount again.
    opts.key_size = 320 << 20;
    opts.chunk_size = "64K".into();
    opts.consent_wait_secs = 60;
    opts.bin_dir = Some(bin);
    let mut d = Deployment::start_sites(opts).unwrap();
    d.mount().unwrap();
    let mnt = d.mountpoint.clone();
    for p in ["P1", "P2"] {
        std::fs::create_dir(mnt.join(p)).unwrap();
    }
    let a = random(200_001);
    std::fs::write(mnt.join("P1/a.cram"), &a).unwrap();
    std::fs::set_permissions(
        mnt.join("P1/a.cram"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let b = random(70_000);
    std::fs::write(mnt.join("P2/b.tmp"), &b).unwrap();
    std::fs::rename(mnt.join("P2/b.tmp"), mnt.join("P2/b.cram")).unwrap();
    std::fs::write(mnt.join("P1/c.cram"), random(1000)).unwrap();
    std::fs::remove_file(mnt.join("P1/c.cram")).unwrap();
    std::fs::write(mnt.join("P1/d.cram"), random(5000)).unwrap();
    let dd = random(9000);
    std::fs::write(mnt.join("P1/d.cram"), &dd).unwrap();
    let cram = std::fs::read("/usr/share/htslib-test/test/range.cram").unwrap();
    std::fs::write(mnt.join("P2/range.cram"), &cram).unwrap();

    // Refused while the mount runs.
    let o = rebuild(&d.home_config, &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("mount is running"), "{}", text(&o));
    d.stop_mount(false).unwrap();

    // Refused over a catalog that is not empty.
    let o = rebuild(&d.home_config, &[]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("not empty"), "{}", text(&o));

    // --into must name a new (or empty) directory.
    let o = rebuild(&d.home_config, &["--into", tmp.path().to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("not empty"), "{}", text(&o));

    // The catalog is lost, and both remote sites are down: seen from the home site alone
    // every version is unreadable (one manifest share, k = 2). --delete-orphans must delete
    // none of the home's shares, and the command must fail naming the sites.
    std::fs::remove_dir_all(d.cfg.catalog_path()).unwrap();
    d.stop_site(1);
    d.stop_site(2);
    let partial = tmp.path().join("partial");
    let o = rebuild(
        &d.home_config,
        &["--into", partial.to_str().unwrap(), "--delete-orphans"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let (s1, s2) = (&d.cfg.sites[1].name, &d.cfg.sites[2].name);
    for want in [
        format!("site(s) {s1}, {s2} could not be listed"),
        "no orphan share was deleted".to_string(),
    ] {
        assert!(text(&o).contains(&want), "{want}: {}", text(&o));
    }
    d.start_site(1).unwrap();
    d.start_site(2).unwrap();

    // The sites are back: the rebuild puts the catalog back where the mount looks for it,
    // every chunk with all n shares (the home's were kept).
    let o = rebuild(&d.home_config, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("unreachable"), "{}", text(&o));
    assert!(!out.contains("fewer than n shares"), "{}", text(&o));
    for f in ["P1/a.cram", "P1/d.cram", "P2/b.cram", "P2/range.cram"] {
        assert!(out.contains(&format!("restored {f}:")), "{f}: {}", text(&o));
    }
    assert!(
        out.contains("4 files restored, 0 orphan versions"),
        "{}",
        text(&o)
    );
    // Card bindings live in the catalog alone: the report says to enroll the cards again.
    assert!(
        out.contains("enroll each patient's card again (qgenome card enroll)"),
        "{}",
        text(&o)
    );

    d.mount().unwrap();
    assert_eq!(names(&mnt), ["P1", "P2"]);
    assert_eq!(names(&mnt.join("P1")), ["a.cram", "d.cram"]);
    assert_eq!(names(&mnt.join("P2")), ["b.cram", "range.cram"]);
    let meta = std::fs::metadata(mnt.join("P1/a.cram")).unwrap();
    assert_eq!(
        (meta.len(), meta.permissions().mode() & 0o777),
        (200_001, 0o600)
    );
    for p in ["P1", "P2"] {
        d.control(&json!({"cmd": "consent-grant", "patient": p, "minutes": 5}))
            .unwrap();
    }
    assert_eq!(std::fs::read(mnt.join("P1/a.cram")).unwrap(), a);
    assert_eq!(std::fs::read(mnt.join("P2/b.cram")).unwrap(), b);
    assert_eq!(std::fs::read(mnt.join("P1/d.cram")).unwrap(), dd);
    assert_eq!(std::fs::read(mnt.join("P2/range.cram")).unwrap(), cram);
    // And the restored catalog takes new writes.
    std::fs::write(mnt.join("P2/new.cram"), b"after the rebuild").unwrap();
    assert_eq!(
        std::fs::read(mnt.join("P2/new.cram")).unwrap(),
        b"after the rebuild"
    );
    d.stop_mount(false).unwrap();
}
