//! The real thing: three `qgenome-mountd` processes (home on a Unix socket, two remote over
//! sealed loopback TCP), a `qgenome mount` process, files written and read with std::fs through
//! the kernel. Needs the workspace binaries built (`make test` builds them first).
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use qgenome::deploy::{DeployOptions, Deployment, Windows};
use qgenome::sharing::{Drbg, RandomSource};
use serde_json::json;

fn deployment(dir: &Path) -> Deployment {
    let mut opts = DeployOptions::new(dir);
    opts.volume_size = 96 << 20;
    opts.key_size = 24 << 20;
    // Each start of a process on a link reserves (and a kill -9 wastes) one window.
    opts.key_window = 1 << 20;
    opts.chunk_size = "256K".into();
    opts.consent_wait_secs = 30;
    let mut d = Deployment::start_sites(opts).unwrap();
    d.mount().unwrap();
    d
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Drbg::from_os().unwrap().fill(&mut v).unwrap();
    v
}

fn grant(d: &Deployment, patient: &str) {
    d.control(&json!({"cmd": "consent-grant", "patient": patient, "minutes": 10}))
        .unwrap();
}

/// Revoke and grant again: the plaintext cache is wiped, so the next read goes to the sites.
fn fresh_consent(d: &Deployment, patient: &str) {
    d.control(&json!({"cmd": "consent-revoke", "patient": patient}))
        .unwrap();
    grant(d, patient);
}

fn stat(d: &Deployment, key: &str) -> u64 {
    d.control(&json!({"cmd": "status"})).unwrap()["stats"][key]
        .as_u64()
        .unwrap()
}

fn mount_log(d: &Deployment) -> String {
    std::fs::read_to_string(&d.mount_log).unwrap_or_default()
}

#[test]
fn no_plaintext_at_rest_and_reads_survive_a_dead_remote_site() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("deploy");
    let d = deployment(&deploy);
    // Volumes side by side (any k rebuild the data): the deployment and every volume are for
    // this user alone, whatever the umask.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&deploy), 0o700);
    for site in ["home", "site1", "site2"] {
        assert_eq!(mode(&deploy.join(site).join("volume")), 0o600, "{site}");
    }
    reads_survive_dead_sites_and_nothing_at_rest_is_plaintext(d);
}

/// A file written, read back, read again with each remote site down in turn; then every file
/// at rest (volumes, share indexes, key pools and ledgers, catalog, logs) scanned for any
/// 64-byte window of it.
///
/// The scan is sound for windows at any offset of the plaintext, not only aligned ones: it
/// indexes the plaintext's 32-byte blocks at offsets divisible by 32 (a hash set of 98 304
/// of them for 3 MiB) and looks them up at every byte offset of each file, streamed
/// ([`Windows`]). A 64-byte window starting at any offset `o` holds the aligned block starting
/// at the next multiple of 32, at most `o + 31`, which ends by `o + 63`: so a file holding any
/// 64-byte window of the plaintext holds an indexed block, wherever in the file it sits. (A
/// random 32-byte block matching by chance, 2^-256 per offset, is no concern.) The cost is
/// that of indexing 64-byte windows: one filter probe per byte of the files.
fn reads_survive_dead_sites_and_nothing_at_rest_is_plaintext(mut d: Deployment) {
    std::fs::create_dir(d.mountpoint.join("P1")).unwrap();
    let data = random(3 << 20);
    std::fs::write(d.mountpoint.join("P1/a.cram"), &data).unwrap();
    grant(&d, "P1");
    assert_eq!(std::fs::read(d.mountpoint.join("P1/a.cram")).unwrap(), data);

    let chunks = data.len().div_ceil(d.cfg.chunk_bytes().unwrap()) as u64;
    for remote in [1, 2] {
        d.kill_site(remote);
        fresh_consent(&d, "P1");
        let before = stat(&d, "chunks_read");
        let got = std::fs::read(d.mountpoint.join("P1/a.cram"))
            .unwrap_or_else(|e| panic!("read with site {remote} down: {e}\n{}", mount_log(&d)));
        assert_eq!(got, data, "read with site {remote} down");
        // Rebuilt from shares fetched from the sites, not served from a cache.
        let read = stat(&d, "chunks_read") - before;
        assert!(
            read >= chunks,
            "{read} of the file's {chunks} chunks fetched with site {remote} down"
        );
        d.start_site(remote).unwrap();
    }

    d.stop_mount(false).unwrap();
    // Aligned 32-byte blocks: every 64-byte window of the plaintext contains one (above).
    let windows = Windows::new(&data, 32);
    let files = d.files_at_rest();
    assert!(
        files.iter().any(|f| f.ends_with("volume")),
        "no volume scanned: {files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "pool")),
        "no key pool scanned"
    );
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("catalog")),
        "no catalog file scanned"
    );
    for f in &files {
        assert!(
            !windows.in_file(f).unwrap(),
            "plaintext found in {}",
            f.display()
        );
    }
}

/// samtools on every htslib-test CRAM, and on a generated CRAM of many chunks, through a
/// mount over the three real daemons (the same checks fs_mount.rs makes over in-memory
/// sites), then writers for three patients at once, each file read back identical.
#[test]
fn every_htslib_cram_and_concurrent_patients_round_trip_through_real_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let d = deployment(dir.path());
    let patient = d.mountpoint.join("P1");
    std::fs::create_dir(&patient).unwrap();
    grant(&d, "P1");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    common::every_cram_round_trips(&patient, &scratch);
    common::a_multi_chunk_cram_round_trips(&patient, &scratch, d.cfg.chunk_bytes().unwrap());

    let files: Vec<(std::path::PathBuf, Vec<u8>)> = ["P2", "P3", "P4"]
        .iter()
        .map(|p| {
            std::fs::create_dir(d.mountpoint.join(p)).unwrap();
            (d.mountpoint.join(p).join("w.cram"), random(3 << 20))
        })
        .collect();
    std::thread::scope(|s| {
        for (f, data) in &files {
            s.spawn(move || {
                let mut w = std::fs::File::create(f).unwrap();
                // Small writes, so that the three interleave at the sites.
                for piece in data.chunks(100_000) {
                    w.write_all(piece).unwrap();
                }
                w.sync_all().unwrap();
            });
        }
    });
    for (p, (f, data)) in ["P2", "P3", "P4"].iter().zip(&files) {
        grant(&d, p);
        assert!(
            std::fs::read(f).unwrap() == *data,
            "{} differs",
            f.display()
        );
    }
}

#[test]
fn a_share_damaged_on_a_volume_is_routed_around_and_two_sites_down_is_eio() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = deployment(dir.path());
    std::fs::create_dir(d.mountpoint.join("P2")).unwrap();
    let data = random(2 << 20);
    std::fs::write(d.mountpoint.join("P2/b.cram"), &data).unwrap();

    // Damage the home site's volume behind its daemon's back: one byte every 64 KiB from
    // 64 KiB to 17 MiB (the superblock left whole), which hits every stored share, each
    // longer than 64 KiB and stored from the volume's second 4 KiB block on.
    d.kill_site(0);
    {
        use std::os::unix::fs::FileExt;
        let vol = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d.sites[0].volume)
            .unwrap();
        for off in (64u64 << 10..17 << 20).step_by(64 << 10) {
            let mut b = [0u8; 1];
            vol.read_exact_at(&mut b, off + 4097).unwrap();
            vol.write_all_at(&[b[0] ^ 0x5a], off + 4097).unwrap();
        }
        vol.sync_all().unwrap();
    }
    d.start_site(0).unwrap();
    grant(&d, "P2");
    assert_eq!(std::fs::read(d.mountpoint.join("P2/b.cram")).unwrap(), data);
    assert!(
        stat(&d, "share_failures") > 0,
        "the damaged shares went unnoticed"
    );
    let log = mount_log(&d);
    assert!(
        log.contains("P2/b.cram") && log.contains("routed around"),
        "no log line names the damage:\n{log}"
    );

    // A file stored after the damage: its home share is whole.
    std::fs::write(d.mountpoint.join("P2/c.cram"), &data[..1 << 20]).unwrap();

    d.kill_site(1);
    d.kill_site(2);
    fresh_consent(&d, "P2");
    // Fewer than k shares good: none of b's (home's damaged), one of c's (home's).
    let k = d.cfg.scheme.k;
    for (file, good) in [("P2/b.cram", 0), ("P2/c.cram", 1)] {
        let err = std::fs::read(d.mountpoint.join(file)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{file}: {err}");
        let log = mount_log(&d);
        let says = format!("only {good} of the {k} shares needed could be read");
        assert!(
            log.lines().any(|l| l.contains(file) && l.contains(&says)),
            "no error line names {file} with \"{says}\":\n{log}"
        );
    }
}

#[test]
fn kill_9_of_the_mount_during_a_write_keeps_committed_files_and_drops_the_partial_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = deployment(dir.path());
    std::fs::create_dir(d.mountpoint.join("P3")).unwrap();
    let done = random(1 << 20);
    std::fs::write(d.mountpoint.join("P3/done.cram"), &done).unwrap();

    let partial = d.mountpoint.join("P3/partial.cram");
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut f = std::fs::File::create(partial)?;
        let block = vec![7u8; 64 << 10];
        loop {
            f.write_all(&block)?;
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    std::thread::sleep(Duration::from_millis(800));
    d.stop_mount(true).unwrap();
    assert!(
        writer.join().unwrap().is_err(),
        "the write survived the mount's death"
    );

    d.mount().unwrap();
    let names: Vec<String> = std::fs::read_dir(d.mountpoint.join("P3"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["done.cram"],
        "the half-written file is visible after the crash:\n{}",
        mount_log(&d)
    );
    grant(&d, "P3");
    let got = std::fs::read(d.mountpoint.join("P3/done.cram")).unwrap_or_else(|e| {
        panic!(
            "reading the committed file after the crash: {e}\n{}",
            mount_log(&d)
        )
    });
    assert_eq!(got, done);
    let audit = d.control(&json!({"cmd": "audit", "last": 100})).unwrap();
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "discard-incomplete" && e["file"] == "partial.cram"),
        "recovery did not record discarding the partial file: {audit}"
    );
    // The admin grant names its caller (from the control socket's peer credentials), whatever
    // the request claimed.
    d.control(&json!({"cmd": "consent-grant", "patient": "P3", "minutes": 5, "peer": {"uid": 4242, "pid": 1}}))
        .unwrap();
    let audit = d.control(&json!({"cmd": "audit", "last": 10})).unwrap();
    let me = format!("admin (uid {}, pid ", nix::unistd::geteuid().as_raw());
    let entries = audit["entries"].as_array().unwrap();
    // The log is oldest first: the last grant is the one just asked for.
    let last = entries
        .iter()
        .rev()
        .find(|e| e["event"] == "consent-grant")
        .unwrap_or_else(|| panic!("no consent-grant: {audit}"));
    assert!(
        last["detail"].as_str().is_some_and(|d| d.starts_with(&me)),
        "the grant does not name {me}...: {last}"
    );
    assert!(
        entries
            .iter()
            .all(|e| !e["detail"].as_str().unwrap_or("").contains("uid 4242")),
        "the claimed peer reached the audit: {audit}"
    );
}

/// The same with everything on a tmpfs of huge pages, as the benchmarks and a deployment that
/// keeps pools in RAM run it: the mount and the sites seal and open straight from mapped pools
/// (docs/design.md, "Pools on huge pages are mapped").
#[test]
fn pools_on_huge_pages_are_used_in_place_by_the_mount_and_the_sites() {
    let dir = tempfile::tempdir().unwrap();
    let huge = qgenome::keys::tmpfs::HugeTmpfs::mount(dir.path(), 1 << 30)
        .expect("mount a huge-page tmpfs (tests run as root)");
    let d = deployment(huge.path());
    let pools: Vec<_> = d
        .files_at_rest()
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "pool"))
        .collect();
    assert!(!pools.is_empty());
    for p in &pools {
        let blksize = std::os::unix::fs::MetadataExt::blksize(&std::fs::metadata(p).unwrap());
        assert!(blksize >= 2 << 20, "{} is not on huge pages", p.display());
    }
    reads_survive_dead_sites_and_nothing_at_rest_is_plaintext(d);
}

/// A direction's pools moved elsewhere between a write and a read, as `qgenome bench e2e`
/// moves the restore direction's into RAM: the daemons restart on the copies (reached through
/// symlinks), the old files are gone, reads spend the moved pools, and writes go on.
#[test]
fn pools_relocated_between_a_write_and_a_read_serve_the_read() {
    use qgenome::keys::Direction;
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let mut d = deployment(dir.path());
    std::fs::create_dir(d.mountpoint.join("P1")).unwrap();
    let data = random(3 << 20);
    std::fs::write(d.mountpoint.join("P1/a.cram"), &data).unwrap();
    let reply_left = |d: &Deployment| -> Vec<u64> {
        let st = d.control(&json!({"cmd": "status"})).unwrap();
        st["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["reply_key_remaining"].as_u64())
            .collect()
    };

    d.relocate_pools(Direction::BtoA, elsewhere.path()).unwrap();
    let moved = d.pool_paths(Direction::BtoA);
    assert_eq!(moved.len(), 4, "two links, two ends");
    for p in &moved {
        let target = std::fs::read_link(p).unwrap();
        assert!(target.starts_with(elsewhere.path()), "{}", p.display());
    }
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 4);
    for p in d.pool_paths(Direction::AtoB) {
        assert!(!p.is_symlink(), "{} moved too", p.display());
    }

    let before = reply_left(&d);
    assert_eq!(before.len(), 2);
    grant(&d, "P1");
    let got = std::fs::read(d.mountpoint.join("P1/a.cram"))
        .unwrap_or_else(|e| panic!("read after the move: {e}\n{}", mount_log(&d)));
    assert_eq!(got, data);
    let after = reply_left(&d);
    let spent: u64 = before.iter().zip(&after).map(|(b, a)| b - a).sum();
    assert!(
        spent >= 3 << 20,
        "the read spent {spent} bytes of reply key"
    );
    std::fs::write(d.mountpoint.join("P1/b.cram"), &data[..1 << 20]).unwrap();
    fresh_consent(&d, "P1");
    assert_eq!(
        std::fs::read(d.mountpoint.join("P1/b.cram")).unwrap(),
        &data[..1 << 20]
    );
}

/// The room the sites report through `status` (the least of their volumes' sizes, and of their
/// free space and links' key left), as `statfs` should give it: `(total, free)`.
fn room_by_status(d: &Deployment) -> (u64, u64) {
    let st = d.control(&json!({"cmd": "status"})).unwrap();
    let sites = st["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 3, "{st}");
    let total = sites
        .iter()
        .map(|s| s["usage"]["capacity"].as_u64().unwrap())
        .min()
        .unwrap();
    // Key left counts in whole chunks' PUT frames (256 KiB chunks, on whole key blocks).
    let chunk = 256 << 10;
    let share = qgenome::sharing::Scheme::new(2, 3)
        .unwrap()
        .share_len(chunk);
    let per_chunk =
        qgenome::wire::frame::key_len_for((qgenome::wire::msg::PUT_HEAD_LEN + share) as u64)
            .unwrap();
    let free = sites
        .iter()
        .flat_map(|s| {
            let key = s["key_remaining"].as_u64();
            [
                s["usage"]["free"].as_u64(),
                key.map(|k| k / per_chunk * chunk as u64),
            ]
        })
        .flatten()
        .min()
        .unwrap();
    (total, free)
}

/// `df` on the mount tells how much more can be written: what the sites hold and have free,
/// and what their links have left of key (here the key, 24 MiB a link, is what runs out
/// first), no longer the fixed "ample room" it reported before. It falls as a file is stored,
/// and a site that is down leaves no room (a write would fail there).
#[test]
fn df_reports_the_room_the_sites_and_links_have_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = deployment(dir.path());
    let df = |d: &Deployment| {
        let v = nix::sys::statvfs::statvfs(&d.mountpoint).unwrap();
        let unit = v.fragment_size();
        (v.blocks() * unit, v.blocks_available() * unit)
    };
    // Within a chunk: each STAT of a remote site spends a key block, statfs's included,
    // and key left counts in whole chunks.
    let near = |a: u64, b: u64| a.abs_diff(b) <= 256 << 10;
    let (total, free) = df(&d);
    let (want_total, want_free) = room_by_status(&d);
    assert!(
        near(total, want_total),
        "df total {total}, sites {want_total}"
    );
    assert!(near(free, want_free), "df free {free}, sites {want_free}");
    assert!(free > 16 << 20 && free < total, "free {free} of {total}");
    // `qgenome status` prints each site's room beside its key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qgenome"))
        .arg("status")
        .arg("--config")
        .arg(&d.home_config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for s in &d.cfg.sites {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("site {} ", s.name)))
            .unwrap_or_else(|| panic!("no line for site {}: {text}", s.name));
        assert!(
            line.contains("MiB free") && line.contains("shares"),
            "{line}"
        );
    }

    std::fs::create_dir(d.mountpoint.join("P1")).unwrap();
    let mut w = std::fs::File::create(d.mountpoint.join("P1/w.cram")).unwrap();
    w.write_all(&random(4 << 20)).unwrap();
    w.sync_all().unwrap();
    drop(w);
    // Past the 2 s that statfs reuses the sites' answer for.
    std::thread::sleep(Duration::from_millis(2100));
    let (_, after) = df(&d);
    let (_, want_after) = room_by_status(&d);
    assert!(
        near(after, want_after),
        "df free {after}, sites {want_after}"
    );
    assert!(
        free.saturating_sub(after) >= 4 << 20,
        "4 MiB stored: free went from {free} to {after}"
    );

    // A site that took the connection and never answers (stopped): `df` waits for it at most
    // the engine's 3 s and shows no room, and the mount's other requests do not wait at all.
    let stopped = nix::unistd::Pid::from_raw(d.pids()[1] as i32);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let mnt = d.mountpoint.clone();
    let asked = std::thread::spawn(move || {
        let t = Instant::now();
        let v = nix::sys::statvfs::statvfs(&mnt).unwrap();
        (t.elapsed(), v.blocks_available(), Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    std::fs::metadata(d.mountpoint.join("P1/w.cram")).unwrap();
    let stat_done = Instant::now();
    let (df_took, avail, df_done) = asked.join().unwrap();
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(avail, 0, "a site that does not answer leaves no room");
    assert!(
        df_took < Duration::from_secs(10),
        "df waited {df_took:?} for a stopped site"
    );
    // The stat came back while df still waited for the stopped site (about 2.7 s before
    // it); a stat queued behind df would come back after it.
    assert!(
        df_done.saturating_duration_since(stat_done) > Duration::from_secs(1),
        "a stat waited for df, which waited {df_took:?} for a stopped site"
    );

    d.kill_site(2);
    std::thread::sleep(Duration::from_millis(2100));
    let (total, free) = df(&d);
    assert_eq!(free, 0, "a site down: nothing free");
    assert!(total > 0, "the sites that answer still give the size");
}

/// `/qgenome` never fails open. The mount says READY=1 only once it is mounted
/// (`Deployment::mount` checks, as systemd's `Type=notify` relies on); taken away under the
/// process (`umount`), it exits with an error naming the mountpoint instead of sleeping on
/// while pipelines write into a plain directory; and it refuses to mount over a directory that
/// holds anything (files written there in the clear, hidden by the mount).
#[test]
fn the_mount_fails_closed_when_unmounted_under_it_or_over_a_non_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = deployment(dir.path());
    let mp = d.mountpoint.clone();
    std::fs::create_dir(mp.join("P9")).unwrap();
    grant(&d, "P9");
    // Held open across the unmount: a lazy unmount of a busy mount detaches it from the
    // mountpoint while the kernel keeps its FUSE connection (and session) alive.
    let busy = std::fs::File::open(&mp).unwrap();
    let out = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child = d.mount_process().expect("the mount runs");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "qgenome mount still running 15 s after its mountpoint was unmounted:\n{}",
            mount_log(&d)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{status}");
    // Its consents ended on the way out (dropping pages cached under them, which the still
    // connected detached mount would go on serving to mappings).
    {
        let catalog =
            qgenome::catalog::Catalog::open(&dir.path().join("home-state/catalog")).unwrap();
        let ended = catalog.audit_log().unwrap().into_iter().any(|e| {
            e.event == "consent-end"
                && e.patient.as_deref() == Some("P9")
                && e.detail.contains("shutting down")
        });
        assert!(ended, "P9's consent did not end when the mount went away");
    }
    drop(busy);
    let log = mount_log(&d);
    assert!(
        log.contains("ended without a stop signal") && log.contains(&mp.display().to_string()),
        "{log}"
    );
    // A file written into the bare directory meanwhile: the next mount refuses to hide it.
    std::fs::write(mp.join("P0001.cram"), b"written while unmounted").unwrap();
    let err = d.mount().expect_err("mounted over a non-empty directory");
    let log = mount_log(&d);
    assert!(log.contains("is not empty (P0001.cram)"), "{err:#}\n{log}");
    std::fs::remove_file(mp.join("P0001.cram")).unwrap();
    d.mount().unwrap();
    std::fs::create_dir(mp.join("P0001")).unwrap();
    std::fs::write(mp.join("P0001/a.cram"), b"stored").unwrap();
    d.stop_mount(false).unwrap();
}
