//! A real FUSE mount (in-process, over in-memory sites) driven by real tools: cp, cat, ls and
//! samtools on Debian's htslib-test CRAM files.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qgenome::config::HomeConfig;
use qgenome::control;
use qgenome::fs::mount::{start, Mounted};
use qgenome::sites::{MemSite, ShareSite};
use serde_json::json;

mod common;

struct Rig {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    mounted: Option<Mounted>,
    sites: Vec<Arc<MemSite>>,
    cfg: HomeConfig,
}

impl Rig {
    fn new(consent_wait_secs: u64) -> Self {
        Self::in_dir(tempfile::tempdir().unwrap(), consent_wait_secs, |_| {})
    }

    /// The rig with its catalog and mountpoint in `dir`, and `before` run on its catalog
    /// before the mount.
    fn in_dir(
        dir: tempfile::TempDir,
        consent_wait_secs: u64,
        before: impl FnOnce(&qgenome::catalog::Catalog),
    ) -> Self {
        Self::configured(dir, consent_wait_secs, "", before)
    }

    /// [`Rig::in_dir`] with `extra` lines at the top of the configuration.
    fn configured(
        dir: tempfile::TempDir,
        consent_wait_secs: u64,
        extra: &str,
        before: impl FnOnce(&qgenome::catalog::Catalog),
    ) -> Self {
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let text = format!(
            r#"
mountpoint = "{mnt}"
state_dir = "{state}"
chunk_size = "64K"
consent_wait_secs = {consent_wait_secs}
{extra}
[scheme]
k = 2
n = 3
[[site]]
name = "home"
socket = "/unused/home.sock"
[[site]]
name = "lsa"
address = "127.0.0.1:1"
link = "home-lsa"
keys = "/unused"
end = "a"
[[site]]
name = "cloud"
address = "127.0.0.1:2"
link = "home-cloud"
keys = "/unused"
end = "a"
"#,
            mnt = mnt.display(),
            state = dir.path().join("state").display()
        );
        let cfg = HomeConfig::parse(&text, &dir.path().join("qgenome.toml")).unwrap();
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        before(&qgenome::catalog::Catalog::open(&cfg.catalog_path()).unwrap());
        let sites: Vec<Arc<MemSite>> = cfg
            .sites
            .iter()
            .map(|s| Arc::new(MemSite::new(&s.name)))
            .collect();
        let dyn_sites: Vec<Arc<dyn ShareSite>> = sites
            .iter()
            .map(|s| s.clone() as Arc<dyn ShareSite>)
            .collect();
        // The catalog `before` had open is let go by sled's flusher thread a moment after
        // its drop: until then its lock makes the mount's open fail (WouldBlock).
        let mut tries = 0;
        let mounted = loop {
            match start(&cfg, &mnt, dyn_sites.clone(), vec![]) {
                Err(e) if tries < 50 && format!("{e:#}").contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r.unwrap(),
            }
        };
        Rig {
            dir,
            mnt,
            mounted: Some(mounted),
            sites,
            cfg,
        }
    }

    fn grant(&self, patient: &str) {
        control::request(
            &self.cfg.control_socket(),
            &json!({"cmd": "consent-grant", "patient": patient, "minutes": 5}),
        )
        .unwrap();
    }

    fn stat(&self, key: &str) -> u64 {
        let r = control::request(&self.cfg.control_socket(), &json!({"cmd": "status"})).unwrap();
        r["stats"][key].as_u64().unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            m.unmount().unwrap();
        }
    }
}

#[test]
fn every_htslib_cram_round_trips_through_the_mount_under_consent() {
    let rig = Rig::new(60);
    let patient = rig.mnt.join("P0001");
    std::fs::create_dir(&patient).unwrap();
    rig.grant("P0001");
    common::every_cram_round_trips(&patient, rig.dir.path());
    common::a_multi_chunk_cram_round_trips(
        &patient,
        rig.dir.path(),
        rig.cfg.chunk_bytes().unwrap(),
    );
}

#[test]
fn a_read_blocks_until_consent_while_listings_and_other_writes_go_on() {
    let rig = Rig::new(60);
    for p in ["P1", "P2"] {
        std::fs::create_dir(rig.mnt.join(p)).unwrap();
    }
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(rig.mnt.join("P1/a.cram"), &data).unwrap();
    let path = rig.mnt.join("P1/a.cram");
    let reader = std::thread::spawn(move || std::fs::read(path));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!reader.is_finished(), "the read returned before consent");
    // Meanwhile the filesystem keeps serving everything else: a listing, another patient's
    // write, a stat of the file being read. On a thread, so that one stuck behind the blocked
    // read fails the test rather than hangs it.
    let (tx, rx) = std::sync::mpsc::channel();
    let (mnt, head) = (rig.mnt.clone(), data[..1000].to_vec());
    std::thread::spawn(move || {
        let listing: Vec<_> = std::fs::read_dir(mnt.join("P1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        std::fs::write(mnt.join("P2/b.cram"), &head).unwrap();
        let len = std::fs::metadata(mnt.join("P1/a.cram")).unwrap().len();
        tx.send((listing, len)).unwrap();
    });
    let (listing, len) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a listing, a write or a stat stalled (or failed) behind the blocked read");
    assert_eq!(listing, ["a.cram"]);
    assert_eq!(len, data.len() as u64);
    assert!(!reader.is_finished());
    rig.grant("P1");
    assert_eq!(reader.join().unwrap().unwrap(), data);
}

/// Opens waiting for one patient's consent, more of them than the mount has workers, hold up
/// no other patient's reads.
#[test]
fn many_reads_waiting_for_consent_hold_up_no_other_patients_reads() {
    let rig = Rig::new(60);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 241) as u8).collect();
    for (p, f) in [("W1", "a.cram"), ("W2", "b.cram")] {
        std::fs::create_dir(rig.mnt.join(p)).unwrap();
        std::fs::write(rig.mnt.join(p).join(f), &data).unwrap();
    }
    rig.grant("W2");
    // The mount answers opens and reads on 16 workers.
    let waiting: Vec<_> = (0..24)
        .map(|_| {
            let path = rig.mnt.join("W1/a.cram");
            std::thread::spawn(move || std::fs::read(path))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "a read returned before consent"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let path = rig.mnt.join("W2/b.cram");
    std::thread::spawn(move || tx.send(std::fs::read(path)));
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a read under consent stalled behind reads waiting for another patient's");
    assert_eq!(got.unwrap(), data);
    rig.grant("W1");
    for w in waiting {
        assert_eq!(w.join().unwrap().unwrap(), data);
    }
}

/// A grant for longer than the mount allows is refused with a reason, and the control socket
/// goes on serving (an overflowing deadline used to panic its thread).
#[test]
fn an_absurd_grant_is_refused_by_name_and_the_mount_goes_on() {
    let rig = Rig::new(1);
    std::fs::create_dir(rig.mnt.join("G1")).unwrap();
    let e = control::request(
        &rig.cfg.control_socket(),
        &json!({"cmd": "consent-grant", "patient": "G1", "minutes": u64::MAX}),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("minutes") && e.contains("7 days"), "{e}");
    // A wrong type is an error naming the argument, not its default; a patient that does not
    // exist is named, for a revoke as for a grant.
    let ask = |req: serde_json::Value| {
        control::request(&rig.cfg.control_socket(), &req).map_err(|e| e.to_string())
    };
    let e = ask(json!({"cmd": "consent-grant", "patient": "G1", "minutes": "60"})).unwrap_err();
    assert!(
        e.contains("\"minutes\"") && e.contains("whole number"),
        "{e}"
    );
    let e = ask(json!({"cmd": "audit", "last": -1})).unwrap_err();
    assert!(e.contains("\"last\""), "{e}");
    let e = ask(json!({"cmd": "consent-revoke", "patient": "G0"})).unwrap_err();
    assert!(e.contains("patient G0 does not exist"), "{e}");
    // A consent outlives its patient's folder: its revoke still ends it.
    std::fs::create_dir(rig.mnt.join("G2")).unwrap();
    rig.grant("G2");
    std::fs::remove_dir(rig.mnt.join("G2")).unwrap();
    let r = ask(json!({"cmd": "consent-revoke", "patient": "G2"})).unwrap();
    assert_eq!(r["ended"], json!(true), "{r}");
    let list = ask(json!({"cmd": "consent-list"})).unwrap();
    assert!(!list.to_string().contains("G2"), "{list}");
    // A revoke is audited with its caller, as a grant is.
    rig.grant("G1");
    ask(json!({"cmd": "consent-revoke", "patient": "G1"})).unwrap();
    let log = ask(json!({"cmd": "audit", "last": 5})).unwrap();
    let end = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["event"] == "consent-end")
        .expect("the revoke's consent-end")
        .clone();
    let me = nix::unistd::geteuid().as_raw();
    assert!(
        end["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("revoked by admin (uid {me}, pid ")),
        "{end}"
    );
    // A revoke that ends nothing, and every refused grant, are audited too, with the caller.
    ask(json!({"cmd": "consent-revoke", "patient": "G1"})).unwrap();
    let log = ask(json!({"cmd": "audit", "last": 50})).unwrap();
    let entries = log["entries"].as_array().unwrap();
    let audited = |event: &str, patient: &str, says: &str| {
        entries.iter().any(|e| {
            e["event"] == event
                && e["patient"] == patient
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains(says) && d.contains(&format!("(uid {me}, pid ")))
        })
    };
    assert!(
        audited("consent-revoke", "G1", "no consent was active"),
        "{log}"
    );
    assert!(audited("consent-revoke", "G0", "no such patient"), "{log}");
    assert!(audited("consent-refused", "G1", "7 days"), "{log}");
    assert!(audited("consent-refused", "G1", "whole number"), "{log}");
    rig.grant("G1");
    std::fs::write(rig.mnt.join("G1/x"), b"still served").unwrap();
    assert_eq!(
        std::fs::read(rig.mnt.join("G1/x")).unwrap(),
        b"still served"
    );
}

#[test]
fn past_the_wait_limit_a_read_fails_with_eacces() {
    let rig = Rig::new(1);
    std::fs::create_dir(rig.mnt.join("P3")).unwrap();
    std::fs::write(rig.mnt.join("P3/c.cram"), b"not for you").unwrap();
    let t = Instant::now();
    let err = std::fs::read(rig.mnt.join("P3/c.cram")).unwrap_err();
    let waited = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    // After the configured wait, not at once nor long after.
    let limit = Duration::from_secs(rig.cfg.consent_wait_secs);
    assert!(
        waited + Duration::from_millis(100) >= limit && waited < 10 * limit,
        "EACCES after {waited:?}, the limit being {limit:?}"
    );
    // The refused open left no read handle behind (the kernel sends no RELEASE for it).
    let open = || {
        let r = control::request(&rig.cfg.control_socket(), &json!({"cmd": "status"})).unwrap();
        r["open_for_reading"].as_u64().unwrap()
    };
    assert_eq!(open(), 0);
    rig.grant("P3");
    let f = std::fs::File::open(rig.mnt.join("P3/c.cram")).unwrap();
    assert_eq!(open(), 1);
    drop(f);
    wait_for("the RELEASE", || open() == 0);
}

#[test]
fn sites_down_and_damaged_shares_are_routed_around_or_reported() {
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P4")).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    for name in ["a", "b", "c"] {
        std::fs::write(rig.mnt.join("P4").join(name), &data).unwrap();
    }
    rig.grant("P4");
    rig.sites[1].set_down(true);
    assert_eq!(std::fs::read(rig.mnt.join("P4/a")).unwrap(), data);
    rig.sites[1].set_down(false);
    rig.sites[0].set_corrupt(true);
    assert_eq!(std::fs::read(rig.mnt.join("P4/b")).unwrap(), data);
    assert!(
        rig.stat("bad_rebuilds") > 0,
        "the damaged share went unnoticed"
    );
    rig.sites[0].set_corrupt(false);
    rig.sites[0].set_down(true);
    rig.sites[2].set_down(true);
    let err = std::fs::read(rig.mnt.join("P4/c")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(rig.stat("failed_reads") > 0);
}

#[test]
fn concurrent_writers_for_different_patients() {
    let rig = Rig::new(60);
    let writers: Vec<_> = (0..4)
        .map(|p| {
            let dir = rig.mnt.join(format!("C{p}"));
            std::thread::spawn(move || {
                std::fs::create_dir(&dir).unwrap();
                let data: Vec<u8> = (0..500_000u32)
                    .map(|i| (i.wrapping_mul(p + 7) >> 3) as u8)
                    .collect();
                std::fs::write(dir.join("run.cram"), &data).unwrap();
                data
            })
        })
        .collect();
    let written: Vec<Vec<u8>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for (p, data) in written.iter().enumerate() {
        rig.grant(&format!("C{p}"));
        assert_eq!(
            &std::fs::read(rig.mnt.join(format!("C{p}/run.cram"))).unwrap(),
            data
        );
    }
}

/// A file closed moments after the unmount starts (as a forked child holds a descriptor until
/// it execs) does not make the unmount fail with EBUSY: it waits for the close.
#[test]
fn unmount_waits_for_a_file_closed_moments_later() {
    let mut rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("U1")).unwrap();
    let f = std::fs::File::create(rig.mnt.join("U1/late.cram")).unwrap();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(f);
    });
    let t = std::time::Instant::now();
    rig.mounted.take().unwrap().unmount().unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    closer.join().unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(rig.mnt.to_str().unwrap()), "{mounts}");
}

#[test]
fn rewriting_in_place_is_refused_and_replacing_is_atomic() {
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P5")).unwrap();
    let f = rig.mnt.join("P5/x.cram");
    std::fs::write(&f, vec![1u8; 100_000]).unwrap();
    // Opening without O_TRUNC for writing would rewrite shared data.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    // O_TRUNC replaces the whole file; rename over an existing one replaces it.
    std::fs::write(&f, vec![2u8; 1000]).unwrap();
    std::fs::write(rig.mnt.join("P5/y.tmp"), vec![3u8; 5000]).unwrap();
    std::fs::rename(rig.mnt.join("P5/y.tmp"), &f).unwrap();
    // Not into another patient's directory: a read there waits for that patient's consent
    // only. EXDEV makes `mv` copy instead, and the copy's read waits for P5's card.
    std::fs::create_dir(rig.mnt.join("P6")).unwrap();
    rig.grant("P6");
    let err = std::fs::rename(&f, rig.mnt.join("P6/x.cram")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
    assert!(!rig.mnt.join("P6/x.cram").exists());
    std::fs::remove_dir(rig.mnt.join("P6")).unwrap();
    rig.grant("P5");
    assert_eq!(std::fs::read(&f).unwrap(), vec![3u8; 5000]);
    let names: Vec<_> = std::fs::read_dir(rig.mnt.join("P5"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["x.cram"]);
    // Only the live version's shares remain at the sites: 1 chunk x 1 share per site, plus
    // the version's manifest share (the old versions' go just after the replacing calls).
    wait_for("old versions' shares to be deleted", || {
        rig.sites.iter().all(|s| s.len() == 1 + 1)
    });
    std::fs::remove_file(&f).unwrap();
    std::fs::remove_dir(rig.mnt.join("P5")).unwrap();
    // The kernel sends the read's RELEASE after close() returns; the shares go with it.
    wait_for("the unlinked file's shares to go", || {
        rig.sites.iter().all(|s| s.is_empty())
    });
}

/// Poll `done` for up to 5 s.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "waited 5 s for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The size `stat` gives `f`, if it exists.
fn size_of(f: &Path) -> Option<u64> {
    std::fs::metadata(f).map(|m| m.len()).ok()
}

/// A `dd` writing zeros to `f` in 64 KiB blocks until killed, once it has written 1 MiB.
fn dd_writing_1_mib(f: &Path) -> std::process::Child {
    let dd = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", f.display()))
        .args(["bs=64k", "count=1000000"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("dd to write 1 MiB", || {
        size_of(f).is_some_and(|s| s >= 1 << 20)
    });
    dd
}

/// A file replaced or unlinked while open for reading stays readable through that
/// descriptor, as on any Unix filesystem; its shares go when the reader closes it.
#[test]
fn a_reader_keeps_reading_a_version_replaced_or_unlinked_under_it() {
    use std::io::Read;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P7")).unwrap();
    // 24 chunks of 64K: more than the readahead fetches during the first read.
    let old: Vec<u8> = (0..24 * 65_536u32).map(|i| (i * 7 % 251) as u8).collect();
    rig.grant("P7");
    for (name, replace) in [("r1", true), ("r2", false)] {
        let f = rig.mnt.join("P7").join(name);
        std::fs::write(&f, &old).unwrap();
        let mut reader = std::fs::File::open(&f).unwrap();
        let mut got = vec![0u8; 65_536];
        reader.read_exact(&mut got).unwrap();
        if replace {
            std::fs::write(rig.mnt.join("P7/new.tmp"), b"the new version").unwrap();
            std::fs::rename(rig.mnt.join("P7/new.tmp"), &f).unwrap();
            assert_eq!(std::fs::read(&f).unwrap(), b"the new version");
        } else {
            std::fs::remove_file(&f).unwrap();
            assert!(!f.exists());
        }
        reader.read_to_end(&mut got).unwrap();
        assert!(got == old, "{name}: the open reader saw other bytes");
        // Its number names nothing now: opened again through /proc (no lookup), ENOENT.
        use std::os::fd::AsRawFd;
        let again = std::fs::File::open(format!("/proc/self/fd/{}", reader.as_raw_fd()));
        assert_eq!(
            again.map(|_| ()).unwrap_err().raw_os_error(),
            Some(libc::ENOENT),
            "{name}"
        );
        drop(reader);
    }
    // Left: r1's new version, one chunk and its manifest, one share of each per site.
    wait_for("the old versions' shares to go", || {
        rig.sites.iter().all(|s| s.len() == 2)
    });
}

#[test]
fn a_forked_childs_close_does_not_commit_a_file_still_being_written() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P6")).unwrap();
    let mut f = std::fs::File::create(rig.mnt.join("P6/w.cram")).unwrap();
    f.write_all(&[9u8; 300_000]).unwrap();
    // fork + exec closes the child's (close-on-exec) copy of the descriptor: a FLUSH.
    assert!(Command::new("true").status().unwrap().success());
    let engine = &rig.mounted.as_ref().unwrap().engine;
    assert!(
        engine.catalog.file("P6", "w.cram").unwrap().is_none(),
        "a child's close committed the half-written file"
    );
    drop(f);
    let rec = engine
        .catalog
        .file("P6", "w.cram")
        .unwrap()
        .expect("committed at the writer's close");
    assert_eq!(rec.size, 300_000);
}

#[test]
fn a_reader_killed_while_waiting_for_consent_is_released_long_before_the_limit() {
    let rig = Rig::new(120);
    std::fs::create_dir(rig.mnt.join("P7")).unwrap();
    std::fs::write(rig.mnt.join("P7/k.cram"), vec![1u8; 1000]).unwrap();
    let mut cat = Command::new("cat")
        .arg(rig.mnt.join("P7/k.cram"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        cat.try_wait().unwrap().is_none(),
        "cat returned without consent"
    );
    cat.kill().unwrap();
    let start = Instant::now();
    while cat.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the killed reader stayed stuck in the consent wait"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `MAP_PRIVATE` mapping is served through the page cache even for a direct-I/O file:
/// pages mapped while the patient's consent held must not stay readable once it ends.
#[test]
fn pages_mapped_under_consent_are_dropped_when_it_ends() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P8")).unwrap();
    let f = rig.mnt.join("P8/m.cram");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(&f, &data).unwrap();
    rig.grant("P8");
    // Touches every page under consent, then reads 16 bytes when told to.
    let script = r#"
import mmap, sys
f = open(sys.argv[1], 'rb')
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
sum(m[i] for i in range(0, len(m), 4096))
print('mapped', flush=True)
sys.stdin.readline()
print(m[100000:100016].hex(), flush=True)
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&f)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(30)).unwrap(),
        "mapped"
    );
    control::request(
        &rig.cfg.control_socket(),
        &json!({"cmd": "consent-revoke", "patient": "P8"}),
    )
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\n").unwrap();
    stdin.flush().unwrap();
    // The touch now faults into a read that waits for consent (before the fix the page
    // cache answered it at once).
    assert!(
        lines.recv_timeout(Duration::from_secs(3)).is_err(),
        "a page mapped under consent was read after the consent ended"
    );
    rig.grant("P8");
    let want: String = data[100_000..100_016]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(lines.recv_timeout(Duration::from_secs(30)).unwrap(), want);
    assert!(child.wait().unwrap().success());
}

/// A file unlinked while still being written, after an fsync made it visible: like a Unix
/// file without a name it takes further writes, its close succeeds, it never comes back under
/// its name, and none of its shares stay at the sites.
#[test]
fn a_file_unlinked_while_written_closes_cleanly_and_leaves_no_shares() {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P9")).unwrap();
    let f = rig.mnt.join("P9/u.cram");
    let before: Vec<usize> = rig.sites.iter().map(|s| s.len()).collect();
    let mut w = std::fs::File::create(&f).unwrap();
    w.write_all(&vec![7u8; 150_000]).unwrap();
    w.sync_all().unwrap();
    assert!(f.exists(), "committed by the fsync");
    std::fs::remove_file(&f).unwrap();
    w.write_all(&vec![8u8; 150_000]).unwrap();
    w.sync_all().unwrap();
    // close(2)'s own result, which dropping a File ignores.
    nix::unistd::close(w.into_raw_fd()).expect("close of an unlinked file being written");
    assert!(!f.exists(), "an unlinked file came back at its close");
    // Its shares go at RELEASE, which the kernel sends after close(2) has returned.
    wait_for("the unlinked file's shares deleted at the sites", || {
        rig.sites.iter().map(|s| s.len()).collect::<Vec<_>>() == before
    });
    std::fs::remove_dir(rig.mnt.join("P9")).unwrap();
}

/// A patient's folder whose only file is still being written is not empty (`ls` shows the
/// file): rmdir fails with ENOTEMPTY, and the file commits at its close, listed.
#[test]
fn rmdir_of_a_folder_whose_file_is_being_written_is_refused() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P13")).unwrap();
    let f = rig.mnt.join("P13/w.cram");
    let mut w = std::fs::File::create(&f).unwrap();
    w.write_all(&vec![5u8; 100_000]).unwrap();
    let err =
        std::fs::remove_dir(rig.mnt.join("P13")).expect_err("rmdir of a folder being written");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "{err}");
    w.write_all(&vec![6u8; 100_000]).unwrap();
    drop(w);
    let names: Vec<_> = std::fs::read_dir(rig.mnt.join("P13"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["w.cram"]);
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 200_000);
}

/// A file unlinked before anything of it was committed: the unlink succeeds (`ls` listed the
/// file), the writer keeps writing, and at its close the file does not come back and its
/// shares are gone from every site.
#[test]
fn a_file_unlinked_before_its_first_commit_never_comes_back() {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P12")).unwrap();
    let f = rig.mnt.join("P12/gone.cram");
    let before: Vec<usize> = rig.sites.iter().map(|s| s.len()).collect();
    let mut w = std::fs::File::create(&f).unwrap();
    // Two whole 64K chunks uploaded and a tail in the buffer, none of it committed.
    w.write_all(&vec![4u8; 150_000]).unwrap();
    assert!(f.exists(), "listed while written");
    std::fs::remove_file(&f).expect("unlink of a file being written");
    assert!(!f.exists(), "still listed after its unlink");
    w.write_all(&vec![5u8; 150_000]).unwrap();
    nix::unistd::close(w.into_raw_fd()).expect("close of an unlinked file being written");
    assert!(!f.exists(), "an unlinked file came back at its close");
    let listed = std::fs::read_dir(rig.mnt.join("P12")).unwrap().count();
    assert_eq!(listed, 0, "the directory is not empty");
    wait_for("the unlinked file's shares deleted at the sites", || {
        rig.sites.iter().map(|s| s.len()).collect::<Vec<_>>() == before
    });
    // The name is free for a new file, which is kept.
    std::fs::write(&f, b"again").unwrap();
    rig.grant("P12");
    assert_eq!(std::fs::read(&f).unwrap(), b"again");
    std::fs::remove_file(&f).unwrap();
    std::fs::remove_dir(rig.mnt.join("P12")).unwrap();
}

/// A file renamed while its writer is open, before and after a commit (the write, rename,
/// close pattern of tools that publish a finished file), ends up whole under its last name;
/// no earlier name is left behind.
#[test]
fn a_file_renamed_while_written_is_committed_under_its_new_name() {
    use std::io::Write;
    let rig = Rig::new(60);
    let dir = rig.mnt.join("P13");
    std::fs::create_dir(&dir).unwrap();
    rig.grant("P13");
    let mut w = std::fs::File::create(dir.join("a.tmp")).unwrap();
    w.write_all(&vec![1u8; 100_000]).unwrap();
    // Nothing committed yet: only the writer has the name.
    std::fs::rename(dir.join("a.tmp"), dir.join("b.tmp")).expect("rename before any commit");
    assert!(!dir.join("a.tmp").exists());
    assert!(dir.join("b.tmp").exists(), "the new name is not listed");
    assert_eq!(std::fs::metadata(dir.join("b.tmp")).unwrap().len(), 100_000);
    w.write_all(&vec![2u8; 100_000]).unwrap();
    w.sync_all().unwrap();
    assert_eq!(std::fs::read(dir.join("b.tmp")).unwrap().len(), 200_000);
    // Committed once: the catalog's version moves, and the writer with it.
    std::fs::rename(dir.join("b.tmp"), dir.join("c.cram")).expect("rename after a commit");
    w.write_all(&vec![3u8; 100_000]).unwrap();
    drop(w);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["c.cram"]);
    let got = std::fs::read(dir.join("c.cram")).unwrap();
    let mut want = vec![1u8; 100_000];
    want.extend(vec![2u8; 100_000]);
    want.extend(vec![3u8; 100_000]);
    assert!(
        got == want,
        "c.cram holds {} bytes, not the 300000 written",
        got.len()
    );
    std::fs::remove_file(dir.join("c.cram")).unwrap();
}

/// `mv a b` while `b` is open for writing: `b` is now `a`'s file, and the writer of the old `b`
/// loses its name, as at unlink: its close neither takes `b` back nor deletes `a`'s shares.
#[test]
fn a_rename_over_a_file_being_written_keeps_the_renamed_file() {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let rig = Rig::new(60);
    let dir = rig.mnt.join("P15");
    std::fs::create_dir(&dir).unwrap();
    rig.grant("P15");
    let a = vec![6u8; 150_000];
    std::fs::write(dir.join("a.cram"), &a).unwrap();
    let mut w = std::fs::File::create(dir.join("b.cram")).unwrap();
    w.write_all(&[9u8; 150_000]).unwrap();
    std::fs::rename(dir.join("a.cram"), dir.join("b.cram")).unwrap();
    w.write_all(&[9u8; 1000]).unwrap();
    nix::unistd::close(w.into_raw_fd()).expect("close of a writer whose name was taken");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["b.cram"]);
    let got = std::fs::read(dir.join("b.cram")).unwrap();
    assert!(
        got == a,
        "b.cram holds {} bytes, not a.cram's 150000",
        got.len()
    );
    std::fs::remove_file(dir.join("b.cram")).unwrap();
    // Only the renamed file's shares were ever kept: none is left.
    wait_for("every share deleted", || {
        rig.sites.iter().all(|s| s.is_empty())
    });
}

/// A writer's commit waits for a slow site while holding the writer; `stat` of that file (as
/// `ls -l` does) must not wait with it, or a few of them hold every FUSE request thread.
#[test]
fn stat_of_a_file_being_committed_to_a_slow_site_answers_at_once() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P10")).unwrap();
    let f = rig.mnt.join("P10/slow.cram");
    let mut w = std::fs::File::create(&f).unwrap();
    w.write_all(&vec![5u8; 100_000]).unwrap();
    rig.sites[1].set_put_delay(Duration::from_secs(4));
    let committing = std::thread::spawn(move || {
        // 100 000 bytes: one whole 64K chunk and a tail, both through the slow site.
        w.sync_all().unwrap();
        w
    });
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let size = std::fs::metadata(&f).unwrap().len();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stat waited {:?} for the commit",
        t.elapsed()
    );
    assert_eq!(size, 100_000);
    assert!(!committing.is_finished(), "the commit was not slowed");
    rig.sites[1].set_put_delay(Duration::ZERO);
    drop(committing.join().unwrap());
    std::fs::remove_file(&f).unwrap();
}

/// Commits wait for every site; more of them than the mount has request threads, all held by
/// a slow site, must leave the mount answering everything else (here: `stat`, `readdir`, and
/// a new file created and written).
#[test]
fn commits_held_by_a_slow_site_leave_the_request_threads_free() {
    use std::io::Write;
    let rig = Rig::new(60);
    // One file per directory: the kernel holds a directory's lock through an unlink in it, so
    // unlinks in one directory reach the mount one at a time, and a listing of it waits for
    // them whatever the mount does. The checks run in yet another directory.
    let file = |i: usize| rig.mnt.join(format!("P14-{i}")).join("w.cram");
    for i in 0..5 {
        std::fs::create_dir(file(i).parent().unwrap()).unwrap();
    }
    let elsewhere = rig.mnt.join("P14b");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("done.cram"), [9u8; 1000]).unwrap();
    // One more than the mount's four request threads.
    let mut writers: Vec<std::fs::File> = (0..5)
        .map(|i| {
            let mut w = std::fs::File::create(file(i)).unwrap();
            w.write_all(&[i as u8; 5000]).unwrap();
            w
        })
        .collect();
    rig.sites[1].set_put_delay(Duration::from_secs(4));
    let committing: Vec<_> = writers
        .drain(..)
        .map(|w| {
            std::thread::spawn(move || {
                w.sync_all().unwrap();
                w
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Unlinks of the files being committed wait for their commits: off the request loops too.
    let removing: Vec<_> = (0..5)
        .map(|i| {
            let f = file(i);
            std::thread::spawn(move || std::fs::remove_file(f))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    assert_eq!(
        std::fs::metadata(elsewhere.join("done.cram"))
            .unwrap()
            .len(),
        1000
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 1);
    let mut other = std::fs::File::create(elsewhere.join("other.cram")).unwrap();
    other.write_all(b"small").unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the mount waited {:?} behind the commits and unlinks",
        t.elapsed()
    );
    assert!(
        committing.iter().all(|c| !c.is_finished()),
        "the commits were not slowed"
    );
    rig.sites[1].set_put_delay(Duration::ZERO);
    for c in committing {
        drop(c.join().unwrap());
    }
    for r in removing {
        r.join()
            .unwrap()
            .expect("unlink of a file that was being committed");
    }
    drop(other);
    for i in 0..5 {
        assert!(!file(i).exists());
    }
    for e in std::fs::read_dir(&elsewhere).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
}

/// A file listed because its writer is open, with nothing committed yet, is refused for
/// reading with EBUSY (not ENOENT, which `ls` contradicts), and reads once committed.
#[test]
fn a_file_not_yet_committed_is_busy_for_readers_then_readable() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P11")).unwrap();
    rig.grant("P11");
    let f = rig.mnt.join("P11/w.cram");
    let mut w = std::fs::File::create(&f).unwrap();
    w.write_all(&[3u8; 5000]).unwrap();
    assert!(f.exists(), "listed while written");
    let err = std::fs::File::open(&f).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    drop(w);
    assert_eq!(std::fs::read(&f).unwrap(), vec![3u8; 5000]);
    std::fs::remove_file(&f).unwrap();
}

/// A write through a descriptor opened O_DSYNC (or O_SYNC) is committed when it returns, as
/// after an fsync: a reader then finds it while the writer is still open. It used to return
/// with the bytes only buffered in the mount.
#[test]
fn a_write_through_an_o_dsync_descriptor_is_committed_when_it_returns() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P13")).unwrap();
    rig.grant("P13");
    for (name, flag) in [("d.cram", libc::O_DSYNC), ("s.cram", libc::O_SYNC)] {
        let f = rig.mnt.join("P13").join(name);
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(flag)
            .open(&f)
            .unwrap();
        w.write_all(&[5u8; 5000]).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), vec![5u8; 5000], "{name}");
        w.write_all(&[6u8; 70_000]).unwrap();
        let mut want = vec![5u8; 5000];
        want.extend_from_slice(&[6u8; 70_000]);
        assert_eq!(std::fs::read(&f).unwrap(), want, "{name}");
        drop(w);
        std::fs::remove_file(&f).unwrap();
    }
}

/// A synchronous write whose commit fails (a site down) fails, and fails its writer: later
/// writes and the close fail too, and the file stays what it was (nothing the failed write
/// took is published by a later commit).
#[test]
fn a_synchronous_write_that_cannot_commit_fails_its_writer() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P14")).unwrap();
    rig.grant("P14");
    let f = rig.mnt.join("P14/f.cram");
    std::fs::write(&f, [1u8; 4000]).unwrap();
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(&f)
        .unwrap();
    rig.sites[1].set_down(true);
    w.write_all(&[2u8; 3000])
        .expect_err("a synchronous write that cannot be made durable");
    rig.sites[1].set_down(false);
    assert!(w.write_all(&[3u8; 10]).is_err(), "a write after it");
    let closed = unsafe { libc::close(std::os::unix::io::IntoRawFd::into_raw_fd(w)) };
    assert_eq!(closed, -1, "its close");
    assert_eq!(std::fs::read(&f).unwrap(), vec![1u8; 4000]);
    std::fs::remove_file(&f).unwrap();
}

/// `lseek(SEEK_END)` of a file open for reading ends at the version it reads while another
/// handle replaces it (O_TRUNC), and `stat` of the name gives the replacement's size so
/// far: a reader seeking to the end (`samtools quickcheck`) used to get the writer's size
/// against the old version's bytes. (`fstat` reaches the filesystem without the handle, so
/// it gives the name's size, as `stat` does.)
#[test]
fn seek_to_end_of_a_reader_ends_at_the_version_it_reads_while_the_name_is_replaced() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P12")).unwrap();
    rig.grant("P12");
    let f = rig.mnt.join("P12/x.cram");
    let old: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&f, &old).unwrap();
    let mut r = std::fs::File::open(&f).unwrap();
    let mut w = std::fs::File::create(&f).unwrap();
    w.write_all(&[9u8; 3000]).unwrap();
    assert_eq!(
        std::fs::metadata(&f).unwrap().len(),
        3000,
        "stat of the name"
    );
    assert_eq!(r.seek(SeekFrom::End(-10)).unwrap(), 99_990);
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, old[99_990..]);
    drop(w);
    assert_eq!(r.seek(SeekFrom::End(0)).unwrap(), 100_000, "once replaced");
    drop(r);
    assert_eq!(std::fs::read(&f).unwrap(), vec![9u8; 3000]);
    std::fs::remove_file(&f).unwrap();
}

/// `renameat2` with RENAME_EXCHANGE is refused (taken as a plain rename, it deleted the
/// target's version); RENAME_NOREPLACE keeps an existing target and renames onto a free name.
#[test]
fn a_rename_exchange_is_refused_and_noreplace_keeps_the_target() {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P8")).unwrap();
    let (a, b, c) = (
        rig.mnt.join("P8/a.cram"),
        rig.mnt.join("P8/b.cram"),
        rig.mnt.join("P8/c.cram"),
    );
    std::fs::write(&a, vec![1u8; 70_000]).unwrap();
    std::fs::write(&b, vec![2u8; 3_000]).unwrap();
    let rename2 = |from: &Path, to: &Path, flags: libc::c_uint| -> Result<(), i32> {
        let (f, t) = (
            CString::new(from.as_os_str().as_bytes()).unwrap(),
            CString::new(to.as_os_str().as_bytes()).unwrap(),
        );
        // SAFETY: two valid NUL-terminated paths.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                flags,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap())
        }
    };
    assert_eq!(rename2(&a, &b, libc::RENAME_EXCHANGE), Err(libc::EINVAL));
    assert_eq!(rename2(&a, &b, libc::RENAME_NOREPLACE), Err(libc::EEXIST));
    rename2(&a, &c, libc::RENAME_NOREPLACE).unwrap();
    rig.grant("P8");
    assert!(!a.exists());
    assert_eq!(std::fs::read(&b).unwrap(), vec![2u8; 3_000]);
    assert_eq!(std::fs::read(&c).unwrap(), vec![1u8; 70_000]);
}

/// A process that wrote and is killed before closing leaves the file as its last commit did:
/// an O_TRUNC replacement keeps the old version, and a new file never appears. An exit
/// without a close commits, as close would, whatever the exit status.
#[test]
fn a_writer_that_dies_before_closing_leaves_the_previous_version() {
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P9")).unwrap();
    let (x, y) = (rig.mnt.join("P9/x.cram"), rig.mnt.join("P9/y.cram"));
    std::fs::write(&x, vec![5u8; 100_000]).unwrap();
    let size = size_of;
    for (f, before) in [(&x, Some(100_000)), (&y, None)] {
        let mut dd = dd_writing_1_mib(f);
        dd.kill().unwrap();
        dd.wait().unwrap();
        wait_for("the killed writer's release", || size(f) == before);
    }
    // A process that writes and is killed by a signal without closing: nothing appears.
    // One that exits, with a failure status, without closing: its file is committed, as on
    // any filesystem (a failing step's log is what its user needs).
    let z = rig.mnt.join("P9/z.txt");
    let python = |end: &str| {
        let script = format!(
            "import os; fd = os.open({:?}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC); os.write(fd, b'partial'); {end}",
            z.display().to_string()
        );
        Command::new("python3")
            .args(["-c", &script])
            .status()
            .unwrap()
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(python("os.kill(os.getpid(), 9)").signal(), Some(9));
    wait_for("the killed writer's release", || size(&z).is_none());
    assert!(!z.exists(), "a killed writer published its file");
    assert_eq!(python("os._exit(3)").code(), Some(3));
    wait_for("the writer's release", || size(&z) == Some(7));
    // A process killed after its O_TRUNC open and before any write (the OOM killer while a
    // step loads its index): the file it was to replace stays, and a new one does not appear
    // (both were published empty, and the replaced version's shares deleted).
    let w = rig.mnt.join("P9/w.txt");
    for f in [&x, &w] {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3>'{}'; kill -9 $$", f.display()))
            .status()
            .unwrap();
        assert_eq!(st.signal(), Some(9));
    }
    wait_for("the killed opener's release", || {
        size(&x) == Some(100_000) && size(&w).is_none()
    });
    // A parent sharing the descriptor of a child that wrote and was killed: its close is
    // told the file is not committed (EIO), and nothing appears.
    let shared = rig.mnt.join("P9/shared.txt");
    let script = format!(
        "import os\nfd = os.open({:?}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)\npid = os.fork()\nif pid == 0:\n    os.write(fd, b'x' * 100000)\n    os.kill(os.getpid(), 9)\nos.waitpid(pid, 0)\ntry:\n    os.close(fd)\n    print('closed')\nexcept OSError as e:\n    print('errno', e.errno)\n",
        shared.display().to_string()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("errno {}", libc::EIO),
        "{out:?}"
    );
    wait_for("the shared handle's release", || size(&shared).is_none());
    rig.grant("P9");
    assert_eq!(std::fs::read(&x).unwrap(), vec![5u8; 100_000]);
    assert_eq!(std::fs::read(&z).unwrap(), b"partial");
    let names: Vec<_> = std::fs::read_dir(rig.mnt.join("P9"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // Only x's two chunks and z's one, and their manifests, have shares left.
    wait_for("the abandoned versions' shares to go", || {
        rig.sites.iter().all(|s| s.len() == 3 + 2)
    });
}

/// A site out of space fails the write with ENOSPC ("No space left on device"), not EIO, and
/// the file is not committed.
#[test]
fn a_full_site_fails_the_write_with_enospc() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P10")).unwrap();
    rig.sites[1].set_capacity(4);
    let f = rig.mnt.join("P10/big.cram");
    let err = (|| -> std::io::Result<()> {
        let mut w = std::fs::File::create(&f)?;
        for _ in 0..16 {
            w.write_all(&[7u8; 65_536])?;
        }
        w.sync_all()
    })()
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    wait_for("the failed writer's release", || !f.exists());
    rig.sites[1].set_capacity(0);
}

/// Two handles writing one name: the last opener has it. The earlier one's commit fails with
/// EBUSY and publishes nothing, so it can neither replace the later file nor bring back a
/// name unlinked meanwhile.
#[test]
fn of_two_writers_on_one_name_the_last_opener_has_it() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P11")).unwrap();
    let x = rig.mnt.join("P11/x.cram");
    let mut a = std::fs::File::create(&x).unwrap();
    a.write_all(&[1u8; 100_000]).unwrap();
    // A touch does not take the name from its writer: its open (without O_TRUNC) is
    // refused, and touch sets the times instead.
    let touch = Command::new("touch").arg(&x).output().unwrap();
    assert!(touch.status.success(), "{touch:?}");
    a.sync_all().unwrap();
    let mut b = std::fs::File::create(&x).unwrap();
    b.write_all(&[2u8; 50_000]).unwrap();
    a.write_all(&[1u8; 1000]).unwrap();
    let err = a.sync_all().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    drop(a);
    drop(b);
    rig.grant("P11");
    wait_for("the writers' release", || {
        std::fs::metadata(&x).is_ok_and(|m| m.len() == 50_000)
    });
    assert_eq!(std::fs::read(&x).unwrap(), vec![2u8; 50_000]);
    // An unlink while both are open: neither close brings the name back.
    let mut a = std::fs::File::create(&x).unwrap();
    a.write_all(&[3u8; 10]).unwrap();
    let mut b = std::fs::File::create(&x).unwrap();
    b.write_all(&[4u8; 10]).unwrap();
    std::fs::remove_file(&x).unwrap();
    drop(b);
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !x.exists(),
        "a writer's close brought an unlinked name back"
    );
    wait_for("the versions' shares to go", || {
        rig.sites.iter().all(|s| s.is_empty())
    });
}

/// `truncate -s 0` of a name another handle is writing is refused (EBUSY), and the writer's
/// data all lands: before, the truncation replaced the version the writer had fsynced, and
/// the writer's later writes went nowhere while its close returned 0.
#[test]
fn truncating_a_file_another_handle_writes_is_refused_and_loses_nothing() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P12")).unwrap();
    let x = rig.mnt.join("P12/t.cram");
    let mut a = std::fs::File::create(&x).unwrap();
    a.write_all(&[1u8; 100_000]).unwrap();
    a.sync_all().unwrap();
    // truncate(2) by path (the truncate tool opens the file for writing without O_TRUNC,
    // which is refused whatever the state).
    let truncate = |p: &std::path::Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::truncate(c.as_ptr(), 0) };
        (rc == 0)
            .then_some(())
            .ok_or_else(std::io::Error::last_os_error)
    };
    let err = truncate(&x).expect_err("truncate went through");
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    a.write_all(&[2u8; 50_000]).unwrap();
    a.sync_all().unwrap();
    drop(a);
    rig.grant("P12");
    wait_for("the writer's release", || {
        std::fs::metadata(&x).is_ok_and(|m| m.len() == 150_000)
    });
    let got = std::fs::read(&x).unwrap();
    assert_eq!(got.len(), 150_000);
    assert!(got[..100_000].iter().all(|&b| b == 1) && got[100_000..].iter().all(|&b| b == 2));
    // Closed, it truncates.
    truncate(&x).unwrap();
    assert_eq!(std::fs::metadata(&x).unwrap().len(), 0);
}

/// A second writer opening a name while the first one's commit waits for a slow site waits
/// for that commit: an unlink after the second open then removes the name for good (the
/// first commit used to land after it and bring the name back).
#[test]
fn a_commit_under_way_lands_before_a_second_writer_takes_the_name() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P12")).unwrap();
    let x = rig.mnt.join("P12/x.cram");
    let mut a = std::fs::File::create(&x).unwrap();
    a.write_all(&[1u8; 100_000]).unwrap();
    rig.sites[2].set_put_delay(Duration::from_secs(2));
    std::thread::scope(|s| {
        // A close (FLUSH) commits without the inode lock an fsync holds, which would make
        // the second open wait in the kernel already.
        let committing = s.spawn(move || drop(a));
        std::thread::sleep(Duration::from_millis(500));
        let b = std::fs::File::create(&x).unwrap();
        std::fs::remove_file(&x).unwrap();
        drop(b);
        committing.join().unwrap();
    });
    rig.sites[2].set_put_delay(Duration::ZERO);
    // Asked of the catalog: the kernel keeps the unlinked name as a negative entry a while.
    let engine = &rig.mounted.as_ref().unwrap().engine;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        engine.catalog.file("P12", "x.cram").unwrap().is_none(),
        "the first writer's commit brought an unlinked name back"
    );
}

/// The mount keeps an inode number only while the kernel holds a lookup of it: when the
/// kernel drops its cached inodes (memory pressure; here `drop_caches`), its FORGETs empty
/// the table, so a mount that lives for months does not grow with every name it ever saw.
/// The files are all still there, under new numbers.
#[test]
fn inode_numbers_the_kernel_forgets_are_dropped_and_the_files_stay() {
    use std::os::unix::fs::MetadataExt;
    let rig = Rig::new(60);
    let mounted = rig.mounted.as_ref().unwrap();
    std::fs::create_dir(rig.mnt.join("P12")).unwrap();
    rig.grant("P12");
    let files: Vec<PathBuf> = (0..300)
        .map(|i| rig.mnt.join(format!("P12/f{i}.cram")))
        .collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(f, format!("file {i}")).unwrap();
    }
    let inos: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().ino())
        .collect();
    assert!(
        mounted.inodes_held() >= 302,
        "every file, the patient and the root are known: {}",
        mounted.inodes_held()
    );
    // Free the kernel's unused dentries and inodes: each evicted inode sends a FORGET.
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    wait_for("the kernel's forgets", || mounted.inodes_held() <= 2);
    let listed = std::fs::read_dir(rig.mnt.join("P12")).unwrap().count();
    assert_eq!(listed, files.len());
    for (i, f) in files.iter().enumerate() {
        let md = std::fs::metadata(f).unwrap();
        assert_ne!(
            md.ino(),
            inos[i],
            "{}: a forgotten number is not reused",
            f.display()
        );
        assert_eq!(std::fs::read_to_string(f).unwrap(), format!("file {i}"));
    }
}

/// A patient directory removed while a process holds it (a shell's working directory) and
/// made again is a new directory: it gets a new inode number, not the dead one's, which the
/// kernel still holds and would attach the new name to.
#[test]
fn a_patient_directory_made_again_while_the_old_one_is_held_is_a_new_directory() {
    use std::os::unix::fs::MetadataExt;
    let rig = Rig::new(60);
    let p = rig.mnt.join("P13");
    std::fs::create_dir(&p).unwrap();
    let held = std::fs::File::open(&p).unwrap();
    let old = held.metadata().unwrap().ino();
    std::fs::remove_dir(&p).unwrap();
    std::fs::create_dir(&p).unwrap();
    assert_ne!(std::fs::metadata(&p).unwrap().ino(), old);
    std::fs::write(p.join("x.cram"), b"new").unwrap();
    let names: Vec<_> = std::fs::read_dir(&p)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["x.cram"]);
    // The same for a file unlinked while open and created again.
    let f = p.join("x.cram");
    rig.grant("P13");
    let open = std::fs::File::open(&f).unwrap();
    let open_ino = open.metadata().unwrap().ino();
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&f, b"again").unwrap();
    assert_ne!(std::fs::metadata(&f).unwrap().ino(), open_ino);
    assert_eq!(std::fs::read(&f).unwrap(), b"again");
    drop((held, open));
}

/// A directory of thousands of names (the root of a cohort's mount: a directory per patient)
/// is read in many READDIR calls, a page of names each. Each name is listed once, even when a
/// patient is made in the middle of the listing, and under the number `stat` then gives it,
/// though the inode table passes its sweep floor while the listing is read and no name of it
/// is held by the kernel.
#[test]
fn a_root_of_thousands_of_patients_lists_each_once_under_the_number_stat_gives() {
    use std::collections::HashSet;
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let names: Vec<String> = (0..5000).map(|i| format!("P{i:05}")).collect();
    // Made before the mount, so that the kernel holds none of them (no lookup yet); on
    // tmpfs, as each one flushes the catalog.
    let rig = Rig::in_dir(tempfile::tempdir_in("/dev/shm").unwrap(), 60, |cat| {
        for n in &names {
            cat.add_patient(n).unwrap();
        }
    });
    let mut dir = std::fs::read_dir(&rig.mnt).unwrap();
    let first = dir.next().unwrap().unwrap();
    // Sorts before every name: a listing made again for each READDIR would shift them all.
    std::fs::create_dir(rig.mnt.join("A0")).unwrap();
    let listed: Vec<(String, u64)> = std::iter::once(first)
        .chain(dir.map(|e| e.unwrap()))
        .map(|e| (e.file_name().into_string().unwrap(), e.ino()))
        .collect();
    let mut seen = HashSet::new();
    for (name, _) in &listed {
        assert!(seen.insert(name.clone()), "{name} listed twice");
    }
    let missing: Vec<&String> = names.iter().filter(|n| !seen.contains(*n)).collect();
    assert!(missing.is_empty(), "not listed: {missing:?}");
    for (name, ino) in &listed {
        let st = std::fs::metadata(rig.mnt.join(name)).unwrap().ino();
        assert_eq!(st, *ino, "{name}: listed as {ino}, stat gives {st}");
    }
    // Listed again from the start (a new open): the patient made meanwhile is there.
    let again = std::fs::read_dir(&rig.mnt).unwrap().count();
    assert_eq!(again, names.len() + 1);
}

/// Deleting a file's shares takes a delete per share, a quarter of a million for a whole
/// genome: `rm`, and a `mv` over a file, answer once the name has changed, and the shares go
/// after, without holding a request loop. An unmount waits for them.
#[test]
fn an_rm_answers_before_the_shares_are_deleted_and_the_mount_goes_on() {
    let mut rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P17")).unwrap();
    // 20 chunks of 64 KiB and a manifest: 21 deletes at each site, 100 ms each.
    let (a, b) = (rig.mnt.join("P17/a.cram"), rig.mnt.join("P17/b.cram"));
    std::fs::write(&a, vec![5u8; 20 << 16]).unwrap();
    std::fs::write(&b, vec![6u8; 20 << 16]).unwrap();
    std::fs::write(rig.mnt.join("P17/c.tmp"), b"new").unwrap();
    for s in &rig.sites {
        s.set_delete_delay(Duration::from_millis(100));
    }
    std::fs::remove_file(&a).unwrap();
    std::fs::rename(rig.mnt.join("P17/c.tmp"), &b).unwrap();
    // Each site held 44 shares (a's and b's 21, c's 2); had either reply waited for its 21
    // deletes, at most 23 would be left. They are still there when rm and mv have answered,
    // but for the few the discarder got to meanwhile (one per 100 ms).
    for s in &rig.sites {
        assert!(
            s.len() > 23,
            "site {}: {} shares left when rm and mv answered: the deletes came first",
            s.name(),
            s.len()
        );
    }
    // Meanwhile the mount serves: a listing, a new file, a read.
    let names: Vec<_> = std::fs::read_dir(rig.mnt.join("P17"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["b.cram"]);
    std::fs::write(rig.mnt.join("P17/d.cram"), b"more").unwrap();
    rig.grant("P17");
    assert_eq!(std::fs::read(&b).unwrap(), b"new");
    // The unmount waits for the deletions: only b's and d's shares (a chunk and a manifest
    // each) are left at every site.
    rig.mounted.take().unwrap().unmount().unwrap();
    for s in &rig.sites {
        assert_eq!(s.len(), 4, "site {}", s.name());
    }
}

/// A reader waiting for consent that blocks a signal sent to it (a program taking its signals
/// with `sigwait`), or that is stopped and continued (SIGSTOP; the kernel discards a SIGTSTP
/// sent to a process of an orphaned process group, as a test harness's children may be), is
/// not taken for one being killed: its read goes on waiting, and returns the data once
/// consent comes.
#[test]
fn a_reader_stopped_or_blocking_signals_while_waiting_for_consent_keeps_waiting() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::process::Stdio;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P18")).unwrap();
    let f = rig.mnt.join("P18/s.cram");
    std::fs::write(&f, b"the data").unwrap();
    let spawn = |cmd: &mut Command| {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let cat = spawn(Command::new("cat").arg(&f));
    // perl's open, unlike Python's, does not retry after EINTR.
    let mut perl = spawn(
        Command::new("perl")
            .arg("-e")
            .arg(
                "use POSIX; sigprocmask(SIG_BLOCK, POSIX::SigSet->new(SIGTERM)) or die; \
         open(F, '<', $ARGV[0]) or die \"open: $!\"; print <F>;",
            )
            .arg(&f),
    );
    // Both opens registered, so both wait (perl's comes after its sigprocmask).
    let waiting = || {
        control::request(&rig.cfg.control_socket(), &json!({"cmd": "status"})).unwrap()
            ["open_for_reading"]
            .as_u64()
            .unwrap()
    };
    let until = Instant::now() + Duration::from_secs(20);
    while waiting() < 2 {
        assert!(Instant::now() < until, "the two readers never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(Pid::from_raw(cat.id() as i32), Signal::SIGSTOP).unwrap();
    kill(Pid::from_raw(perl.id() as i32), Signal::SIGTERM).unwrap();
    // The mount looks at a waiting reader's signals every 250 ms. (A stopped child does not
    // show in try_wait: cat's part is its success below, as it would fail with EINTR.)
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        perl.try_wait().unwrap().is_none(),
        "a reader blocking the signal sent to it had its wait ended"
    );
    rig.grant("P18");
    kill(Pid::from_raw(cat.id() as i32), Signal::SIGCONT).unwrap();
    for (what, child) in [("cat", cat), ("perl", perl)] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"the data", "{what}");
    }
}

/// Run `script` with `sh -c` as the unprivileged user nobody (65534); its exit status and
/// what it printed on stderr.
fn as_nobody(script: &str) -> (bool, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With `allow_other`, other users reach the mount, and the kernel holds them to the owners
/// and modes it reports (`default_permissions`): files and patient folders belong to whoever
/// made them (kept in the catalog), a user cannot delete, replace or read what the modes
/// keep from them, and `chown` gives a folder to a pipeline's user. Before, every file was
/// the mount's and nothing was checked: any local user could `rm` any patient's file.
#[test]
fn other_users_are_held_to_owners_and_modes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    // nobody must reach the mountpoint through the test's directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let rig = Rig::configured(dir, 60, "allow_other = true", |_| {});
    let p = rig.mnt.join("P20");
    std::fs::create_dir(&p).unwrap();
    std::fs::write(p.join("root.cram"), b"the root's genome").unwrap();
    std::fs::set_permissions(p.join("root.cram"), std::fs::Permissions::from_mode(0o600)).unwrap();
    rig.grant("P20");
    let at = |name: &str| p.join(name).display().to_string();
    for script in [
        format!("rm -f {}", at("root.cram")),
        format!("echo x > {}", at("new.cram")),
        format!("cat {}", at("root.cram")),
        format!("mv {} {}", at("root.cram"), at("moved.cram")),
    ] {
        let (ok, err) = as_nobody(&script);
        assert!(
            !ok && err.contains("Permission denied"),
            "{script}: {ok} {err}"
        );
    }
    assert_eq!(
        std::fs::read(p.join("root.cram")).unwrap(),
        b"the root's genome"
    );
    assert!(!p.join("new.cram").exists());
    // The folder given to nobody: they write there, and own what they write.
    std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    let (ok, err) = as_nobody(&format!("printf abc > {}", at("mine.cram")));
    assert!(ok, "{err}");
    let meta = std::fs::metadata(p.join("mine.cram")).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.len()), (65534, 65534, 3));
    let (ok, err) = as_nobody(&format!("chown 0 {}", at("mine.cram")));
    assert!(!ok && err.contains("not permitted"), "{err}");
    // The closed file's and the folder's attributes come from their catalog records.
    assert_eq!(std::fs::metadata(&p).unwrap().uid(), 65534);
    assert_eq!(std::fs::metadata(p.join("root.cram")).unwrap().uid(), 0);
}

/// `touch f`, `: > f`: a handle nothing was written through is committed at its RELEASE,
/// which the kernel sends after close(2) has returned (a FLUSH cannot tell the last close from
/// that of a copy dup2 made, as `dd` does). A failure there, with every site down, is audited
/// beside its log line, and the file does not appear.
#[test]
fn an_empty_file_not_committed_at_release_is_audited() {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P21")).unwrap();
    for s in &rig.sites {
        s.set_down(true);
    }
    let fd = open(
        &rig.mnt.join("P21/late.flag"),
        OFlag::O_CREAT | OFlag::O_WRONLY,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    nix::unistd::close(fd).unwrap();
    wait_for("the writer released", || {
        !rig.mnt.join("P21/late.flag").exists()
    });
    for s in &rig.sites {
        s.set_down(false);
    }
    let audit = control::request(
        &rig.cfg.control_socket(),
        &json!({"cmd": "audit", "last": 20}),
    )
    .unwrap();
    let entries = audit["entries"].as_array().expect("audit entries");
    assert!(
        entries.iter().any(|e| e["event"] == "write-failed"
            && e["patient"] == "P21"
            && e["file"] == "late.flag"),
        "{audit}"
    );
    // A file an fsync committed, then written to, then closed with every site down: its
    // audit says the fsync's bytes stay and the rest was not committed (it said "kept: the
    // catalog names it, but could not make that durable", as if all of it were named).
    use std::io::Write;
    let mut f = std::fs::File::create(rig.mnt.join("P21/part.cram")).unwrap();
    f.write_all(&[3u8; 100_000]).unwrap();
    f.sync_all().unwrap();
    for s in &rig.sites {
        s.set_down(true);
    }
    let _ = f.write_all(&[4u8; 100_000]);
    drop(f);
    let stayed = |e: &serde_json::Value| {
        e["event"] == "write-failed"
            && e["file"] == "part.cram"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("the 100000 bytes its last fsync committed stay"))
    };
    wait_for("the partial file's release audited", || {
        control::request(
            &rig.cfg.control_socket(),
            &json!({"cmd": "audit", "last": 20}),
        )
        .is_ok_and(|a| {
            a["entries"]
                .as_array()
                .is_some_and(|v| v.iter().any(stayed))
        })
    });
    for s in &rig.sites {
        s.set_down(false);
    }
    assert_eq!(size_of(&rig.mnt.join("P21/part.cram")), Some(100_000));
}

/// `cp -p`, `install -m 0444`: the mode and mtime set on a file before its close are the
/// ones it keeps (they went to the old version, or nowhere, and the commit stamped "now").
/// A write after a utimes makes the mtime the commit's again, as on a local filesystem.
#[test]
fn mode_and_mtime_set_while_writing_are_kept_at_the_commit() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P22")).unwrap();
    let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    let f = rig.mnt.join("P22/kept.cram");
    let mut w = std::fs::File::create(&f).unwrap();
    w.write_all(&vec![3u8; 100_000]).unwrap();
    w.set_permissions(std::fs::Permissions::from_mode(0o444))
        .unwrap();
    w.set_modified(then).unwrap();
    nix::unistd::close(std::os::fd::IntoRawFd::into_raw_fd(w)).unwrap();
    let meta = std::fs::metadata(&f).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert_eq!(meta.modified().unwrap(), then);
    assert_eq!(meta.len(), 100_000);
    // Set, then written to: the commit's time.
    let g = rig.mnt.join("P22/touched.cram");
    let mut w = std::fs::File::create(&g).unwrap();
    w.set_modified(then).unwrap();
    w.write_all(b"later").unwrap();
    nix::unistd::close(std::os::fd::IntoRawFd::into_raw_fd(w)).unwrap();
    let age = SystemTime::now().duration_since(std::fs::metadata(&g).unwrap().modified().unwrap());
    assert!(
        age.as_ref().is_ok_and(|a| *a < Duration::from_secs(60)),
        "{age:?}"
    );
}

/// Writers waiting for a slow site do not hold the mount's request loops: with four of them
/// blocked (a site taking 6 s per put, each writer past its chunks in flight), `ls` and
/// `stat` of another patient still answer at once. Before, each waiting write held one of the
/// four FUSE threads, and everything else on the mount waited with them.
#[test]
fn writers_waiting_for_a_slow_site_leave_the_mount_answering() {
    use std::io::Write;
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P23")).unwrap();
    std::fs::write(rig.mnt.join("P23/other.cram"), b"another patient's").unwrap();
    // Long enough that a machine pausing this test for seconds cannot make the check fail.
    rig.sites[1].set_put_delay(Duration::from_secs(6));
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let dir = rig.mnt.join(format!("W{i}"));
            std::thread::spawn(move || {
                std::fs::create_dir(&dir).unwrap();
                let mut f = std::fs::File::create(dir.join("slow.cram")).unwrap();
                // 12 chunks of 64 KiB: past the 8 a file may have in flight.
                f.write_all(&vec![i as u8; 12 << 16]).unwrap();
            })
        })
        .collect();
    // Every writer has filled its chunks in flight and waits for the slow site.
    std::thread::sleep(Duration::from_millis(700));
    let start = Instant::now();
    let meta = std::fs::metadata(rig.mnt.join("P23/other.cram")).unwrap();
    let names = std::fs::read_dir(rig.mnt.join("P23")).unwrap().count();
    let took = start.elapsed();
    rig.sites[1].set_put_delay(Duration::ZERO);
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!((meta.len(), names), (17, 1));
    // Behind the writers they would wait for a put, at least 5.3 s from here.
    assert!(
        took < Duration::from_millis(4000),
        "stat and ls took {took:?} behind the writers"
    );
    for i in 0..4 {
        let len = std::fs::metadata(rig.mnt.join(format!("W{i}/slow.cram")))
            .unwrap()
            .len();
        assert_eq!(len, 12 << 16);
    }
}

/// An O_TRUNC open of a name that is only being written so far (a retried step reopening its
/// output before the first attempt closed it) keeps that version's mode, as a replacement of a
/// stored file keeps its own: not 0644, readable by every user.
#[test]
fn a_replacement_of_a_file_still_being_written_keeps_its_mode() {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P24")).unwrap();
    let f = rig.mnt.join("P24/private.cram");
    let mut first = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&f)
        .unwrap();
    first.write_all(b"first attempt").unwrap();
    let mut second = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&f)
        .unwrap();
    second.write_all(b"second attempt").unwrap();
    drop(second);
    drop(first);
    let meta = std::fs::metadata(&f).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 14);
}

/// A name longer than NAME_MAX (255 bytes) is `ENAMETOOLONG`, as on a local filesystem (it
/// was ENOENT at lookup and EINVAL at create); an unlink's audit entry names its caller.
#[test]
fn long_names_are_enametoolong_and_unlinks_are_audited_with_their_caller() {
    let rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P26")).unwrap();
    let long = rig.mnt.join("P26").join("x".repeat(300));
    let err = std::fs::write(&long, b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG), "{err}");
    let err = std::fs::metadata(&long).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG), "{err}");
    let ok = rig.mnt.join("P26").join("y".repeat(255));
    std::fs::write(&ok, b"y").unwrap();
    std::fs::remove_file(&ok).unwrap();
    let audit = control::request(
        &rig.cfg.control_socket(),
        &json!({"cmd": "audit", "last": 20}),
    )
    .unwrap();
    let me = format!("uid {}, pid ", nix::unistd::geteuid().as_raw());
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "unlink"
                && e["patient"] == "P26"
                && e["detail"].as_str().is_some_and(|d| d.starts_with(&me))),
        "{audit}"
    );
}

/// A writer killed mid-file leaves a version whose shares must all go: tens of thousands at
/// each site for a whole genome. Its RELEASE answers once the version is dropped, and the
/// shares go after, on the discarder: deleted in the RELEASE, they held a FUSE request thread
/// (and the file's writer lock, which a retried step's reopen waits for) for as long as that
/// took. An unmount waits for them.
#[test]
fn a_killed_writers_shares_are_deleted_after_its_release_answers() {
    let mut rig = Rig::new(60);
    std::fs::create_dir(rig.mnt.join("P19")).unwrap();
    let f = rig.mnt.join("P19/killed.cram");
    let size = size_of;
    // Exactly 2 MiB, then dd waits on its open pipe for more: killed mid-file, with 32 chunks
    // of 64 KiB at each of the 3 sites, at 100 ms a delete about 3 s a site. (A dd from
    // /dev/zero wrote on until killed: as the write path got faster, more chunks than the
    // unmount's 30 s wait for deletions could take.)
    let mut dd = Command::new("dd")
        .arg(format!("of={}", f.display()))
        .args(["bs=64k", "iflag=fullblock"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut input = dd.stdin.take().unwrap();
    std::io::Write::write_all(&mut input, &vec![0u8; 2 << 20]).unwrap();
    wait_for("dd to write 2 MiB", || {
        size(&f).is_some_and(|s| s >= 2 << 20)
    });
    for s in &rig.sites {
        s.set_delete_delay(Duration::from_millis(100));
    }
    dd.kill().unwrap();
    dd.wait().unwrap();
    drop(input);
    let killed = Instant::now();
    while size(&f).is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the killed writer's release took over 2 s (its shares deleted in it)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        rig.sites.iter().all(|s| s.len() >= 10),
        "the shares went before the release answered"
    );
    rig.mounted.take().unwrap().unmount().unwrap();
    for s in &rig.sites {
        assert_eq!(
            s.len(),
            0,
            "site {}: shares of the killed writer left",
            s.name()
        );
    }
}

/// A `chmod`, `touch -m` or `mv` of a committed file is done in the catalog at once; its
/// manifest is rewritten at every site after the reply. Rewritten in the request, each held
/// a FUSE request thread for as long as the slowest site took: rsync does all three per file,
/// and five of them took the mount's four threads.
#[test]
fn attribute_changes_and_renames_answer_before_a_slow_site_has_their_manifests() {
    use std::os::unix::fs::PermissionsExt;
    let mut rig = Rig::new(60);
    let dir = |i: usize| rig.mnt.join(format!("P21-{i}"));
    for i in 0..5 {
        std::fs::create_dir(dir(i)).unwrap();
        std::fs::write(dir(i).join("f.tmp"), [i as u8; 3000]).unwrap();
    }
    // In the requests, each thread's chmod and rename would take 6 s at least.
    rig.sites[1].set_put_delay(Duration::from_secs(3));
    let t = Instant::now();
    let changing: Vec<_> = (0..5)
        .map(|i| {
            let d = dir(i);
            std::thread::spawn(move || {
                std::fs::set_permissions(d.join("f.tmp"), std::fs::Permissions::from_mode(0o600))
                    .unwrap();
                std::fs::rename(d.join("f.tmp"), d.join("f.cram")).unwrap();
            })
        })
        .collect();
    for c in changing {
        c.join().unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_millis(4000),
        "5 chmods and renames took {:?} behind a slow site",
        t.elapsed()
    );
    // The rewrites not yet at the slow site go at once (the unmount below waits for them).
    rig.sites[1].set_put_delay(Duration::ZERO);
    for i in 0..5 {
        let m = std::fs::metadata(dir(i).join("f.cram")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }
    // The unmount waits for the rewrites.
    rig.mounted.take().unwrap().unmount().unwrap();
}
