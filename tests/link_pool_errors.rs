//! Bad pools and ledgers: each gives a clear error naming the link and the file, and leaves
//! every file in the directory unchanged (hashed before and after).
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use qgenome::keys::{pool, Direction, KeyError};
use qgenome::link::ledger::{Role, Slot, SLOT_STRIDE};
use qgenome::link::stream::ledger_path;
use qgenome::link::{LinkError, RecvStream, SendStream, StreamOptions};
use sha2::{Digest, Sha256};

const LINK: &str = "home-lsa";

struct Link {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

fn provision(size: u64) -> Link {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    pool::provision(LINK, size, &a, &b).unwrap();
    Link { _dir: dir, a, b }
}

/// name -> (mode, sha256 of content, allocated blocks)
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, [u8; 32], u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        let sum = Sha256::digest(std::fs::read(e.path()).unwrap()).into();
        m.insert(
            e.file_name().to_string_lossy().into_owned(),
            (md.permissions().mode(), sum, md.blocks()),
        );
    }
    m
}

fn opts() -> StreamOptions {
    StreamOptions { window: 4096 }
}

fn send(dir: &Path) -> Result<SendStream, LinkError> {
    SendStream::from_dir(dir, LINK, Direction::AtoB, opts())
}

/// Run `f` against `dir`, expecting an error mentioning the link and `file`, and no change.
fn refused<T: std::fmt::Debug>(
    dir: &Path,
    file: &str,
    f: impl FnOnce() -> Result<T, LinkError>,
) -> LinkError {
    let before = snapshot(dir);
    let e = f().expect_err("must be refused");
    let msg = e.to_string();
    assert!(msg.contains(LINK), "error does not name the link: {msg}");
    assert!(msg.contains(file), "error does not name {file}: {msg}");
    assert_eq!(
        snapshot(dir),
        before,
        "directory changed by a refused open: {msg}"
    );
    e
}

/// Use the a2b stream a bit so that the ledger exists and key is destroyed.
fn use_stream(dir: &Path, frames: usize) {
    let mut s = send(dir).unwrap();
    let mut f = Vec::new();
    for _ in 0..frames {
        s.seal(&[1; 500], &mut f).unwrap();
    }
}

#[test]
fn truncated_pool() {
    let l = provision(1 << 20);
    let p = l.a.join("home-lsa.a2b.pool");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len((1 << 20) + 4096 - 1).unwrap();
    let e = refused(&l.a, "home-lsa.a2b.pool", || send(&l.a));
    assert!(
        matches!(e, LinkError::Key(KeyError::Truncated { .. })),
        "{e}"
    );
    f.set_len(100).unwrap();
    refused(&l.a, "home-lsa.a2b.pool", || send(&l.a));
}

#[test]
fn foreign_pools_other_link_direction_and_end() {
    let l = provision(1 << 16);
    let other = tempfile::tempdir().unwrap();
    let e = pool::provision("elsewhere", 1 << 16, other.path(), other.path()).unwrap_err();
    assert!(matches!(e, KeyError::SameDirectory { .. }), "{e}");
    assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 0);
    let (oa, ob) = (other.path().join("a"), other.path().join("b"));
    std::fs::create_dir_all(&oa).unwrap();
    std::fs::create_dir_all(&ob).unwrap();
    pool::provision("elsewhere", 1 << 16, &oa, &ob).unwrap();
    // Another link's pool under this link's name.
    let target = l.a.join("home-lsa.a2b.pool");
    std::fs::copy(oa.join("elsewhere.a2b.pool"), &target).unwrap();
    let e = refused(&l.a, "home-lsa.a2b.pool", || send(&l.a));
    assert!(
        matches!(e, LinkError::Key(KeyError::ForeignPool { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("elsewhere"), "{e}");
    // The other direction's pool under the a2b name.
    std::fs::copy(l.a.join("home-lsa.b2a.pool"), &target).unwrap();
    let e = refused(&l.a, "home-lsa.a2b.pool", || send(&l.a));
    assert!(e.to_string().contains("b2a"), "{e}");
    // The other end: b holds the receiving end of a2b, not the sending end.
    let e = refused(&l.b, "home-lsa.a2b.pool", || send(&l.b));
    assert!(e.to_string().contains("end b"), "{e}");
    let e = refused(&l.a, "home-lsa.b2a.pool", || {
        SendStream::from_dir(&l.a, LINK, Direction::BtoA, opts())
    });
    assert!(
        matches!(e, LinkError::Key(KeyError::ForeignPool { .. })),
        "{e}"
    );
}

fn write_slot(path: &Path, slot_index: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, slot_index * SLOT_STRIDE).unwrap();
}

fn stream_id(dir: &Path) -> [u8; 16] {
    let mut id = [0u8; 16];
    let f = std::fs::File::open(dir.join("home-lsa.a2b.pool")).unwrap();
    f.read_exact_at(&mut id, 16).unwrap();
    id
}

#[test]
fn ledger_from_the_future() {
    let l = provision(1 << 16);
    use_stream(&l.a, 2);
    let lp = ledger_path(&l.a, LINK, Direction::AtoB);
    let mut b = Slot {
        role: Role::Sender,
        stream_id: stream_id(&l.a),
        seq: 1000,
        value: 100,
    }
    .encode();
    b[8] = 9; // version 9
    write_slot(&lp, 0, &b);
    let e = refused(&l.a, "home-lsa.a2b.ledger", || send(&l.a));
    assert!(
        matches!(e, LinkError::LedgerFromFuture { found: 9, .. }),
        "{e}"
    );
}

#[test]
fn ledger_beyond_the_pool_and_foreign_ledger() {
    let l = provision(1 << 16);
    use_stream(&l.a, 1);
    let lp = ledger_path(&l.a, LINK, Direction::AtoB);
    let slot = |value, stream_id| {
        Slot {
            role: Role::Sender,
            stream_id,
            seq: 1000,
            value,
        }
        .encode()
    };
    write_slot(&lp, 0, &slot((1 << 16) + 1, stream_id(&l.a)));
    let e = refused(&l.a, "home-lsa.a2b.ledger", || send(&l.a));
    assert!(matches!(e, LinkError::LedgerBeyondPool { .. }), "{e}");
    assert!(e.to_string().contains("home-lsa.a2b.pool"), "{e}");
    write_slot(&lp, 0, &slot(10, [0xee; 16]));
    let e = refused(&l.a, "home-lsa.a2b.ledger", || send(&l.a));
    assert!(matches!(e, LinkError::LedgerForeign { .. }), "{e}");
    // Both slots torn: refuse rather than guess.
    write_slot(&lp, 0, &[0xff; 64]);
    write_slot(&lp, 1, &[0xff; 64]);
    let e = refused(&l.a, "home-lsa.a2b.ledger", || send(&l.a));
    assert!(matches!(e, LinkError::LedgerCorrupt { .. }), "{e}");
}

#[test]
fn stale_or_missing_ledger_of_a_used_pool() {
    let l = provision(1 << 18);
    let lp = ledger_path(&l.a, LINK, Direction::AtoB);
    use_stream(&l.a, 1);
    let backup = std::fs::read(&lp).unwrap();
    use_stream(&l.a, 20); // passes several windows
    std::fs::write(&lp, &backup).unwrap();
    let e = refused(&l.a, "home-lsa.a2b.ledger", || send(&l.a));
    assert!(matches!(e, LinkError::StaleLedger { .. }), "{e}");
    std::fs::remove_file(&lp).unwrap();
    let e = refused(&l.a, "home-lsa.a2b.ledger", || send(&l.a));
    assert!(matches!(e, LinkError::LedgerMissing { .. }), "{e}");
}

/// A pool used under one ledger, then reached from another key directory (a symlink to it, or
/// its ledger deleted) before any used key was destroyed (the first process killed right
/// after its first frame): the pool shows it was used, and the second opening is refused as
/// missing its ledger, at both ends. A new ledger starts past the first key block, which the
/// stream's opening destroys durably before any key is read; the opening alone is enough.
/// Before, the first block was destroyed only once its frame was used (in the background),
/// and the second opening started a new ledger at it: the same pad again.
#[test]
fn a_pool_reached_under_another_ledger_is_refused_even_before_used_key_is_destroyed() {
    let l = provision(1 << 20);
    drop(send(&l.a).unwrap());
    drop(RecvStream::from_dir(&l.b, LINK, Direction::AtoB, opts()).unwrap());
    let other = tempfile::tempdir().unwrap();
    for (from, name) in [(&l.a, "a"), (&l.b, "b")] {
        let dir = other.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(
            from.join("home-lsa.a2b.pool"),
            dir.join("home-lsa.a2b.pool"),
        )
        .unwrap();
    }
    let (oa, ob) = (other.path().join("a"), other.path().join("b"));
    let e = refused(&oa, "home-lsa.a2b.ledger", || send(&oa));
    assert!(matches!(e, LinkError::LedgerMissing { .. }), "{e}");
    let e = refused(&ob, "home-lsa.a2b.ledger", || {
        RecvStream::from_dir(&ob, LINK, Direction::AtoB, opts())
    });
    assert!(matches!(e, LinkError::LedgerMissing { .. }), "{e}");
    // The ledgers where they are still work.
    let mut s = send(&l.a).unwrap();
    let mut r = RecvStream::from_dir(&l.b, LINK, Direction::AtoB, opts()).unwrap();
    let (mut f, mut o) = (Vec::new(), Vec::new());
    s.seal(b"still fine", &mut f).unwrap();
    r.open(&f, &mut o).unwrap();
    assert_eq!(o, b"still fine");
}

#[test]
fn exhausted_stream() {
    // Frames use whole key blocks of 4096 bytes, 4064 of them pad; a new stream destroys
    // its first block unused (so that a lost ledger is always seen).
    let l = provision(4 * 4096);
    let mut s = send(&l.a).unwrap();
    assert_eq!(s.remaining(), 3 * 4096);
    let mut f = Vec::new();
    s.seal(&[7; 4000], &mut f).unwrap();
    assert_eq!(s.remaining(), 2 * 4096);
    // Used key is destroyed on a background thread: let it finish before the snapshot.
    s.flush().unwrap();
    let e = refused(&l.a, "home-lsa.a2b.pool", || s.seal(&[7; 9000], &mut f));
    assert!(
        matches!(
            e,
            LinkError::Exhausted {
                needed: 12288,
                remaining: 8192,
                ..
            }
        ),
        "{e}"
    );
    s.seal(&[7; 2 * 4064], &mut f).unwrap();
    assert_eq!(s.remaining(), 0);
    s.flush().unwrap();
    let e = refused(&l.a, "home-lsa.a2b.pool", || s.seal(&[], &mut f));
    assert!(matches!(e, LinkError::Exhausted { .. }), "{e}");
    drop(s);
    // Reopening an exhausted stream works and still refuses.
    let mut s = send(&l.a).unwrap();
    assert_eq!(s.remaining(), 0);
    s.flush().unwrap();
    refused(&l.a, "home-lsa.a2b.pool", || s.seal(&[], &mut f));
}

#[test]
fn a_stream_is_opened_by_one_process_at_a_time() {
    let l = provision(1 << 16);
    let s = send(&l.a).unwrap();
    // The pool is locked first (see keys::pool); its ledger is locked too.
    let e = refused(&l.a, "home-lsa.a2b.pool", || send(&l.a));
    assert!(matches!(e, LinkError::Key(KeyError::InUse { .. })), "{e}");
    drop(s);
    send(&l.a).unwrap();
}

/// Ten frames from the sender's pools in `a` to the receiver's in `b`, each end flushed after
/// each: the key each used must then read back as zeros at both ends. Returns the pool-file
/// ranges used and the sender's next key offset.
fn send_ten_frames_checking_their_key_is_destroyed(
    a: &Path,
    b: &Path,
) -> (Vec<std::ops::Range<u64>>, u64) {
    let mut s = send(a).unwrap();
    let mut r = RecvStream::from_dir(b, LINK, Direction::AtoB, opts()).unwrap();
    let (mut f, mut o) = (Vec::new(), Vec::new());
    // The first key block, destroyed unused by the streams' opening (a new ledger starts
    // past it), then each frame's key.
    let mut used = Vec::new();
    used.push(4096..4096 + 4096);
    for _ in 0..10 {
        let k = s.seal(&[5; 10_000], &mut f).unwrap().key_range;
        r.open(&f, &mut o).unwrap();
        s.flush().unwrap();
        r.flush().unwrap();
        for dir in [a, b] {
            let mut buf = vec![1u8; (k.end - k.start) as usize];
            std::fs::File::open(dir.join("home-lsa.a2b.pool"))
                .unwrap()
                .read_exact_at(&mut buf, 4096 + k.start)
                .unwrap();
            assert!(
                buf.iter().all(|&x| x == 0),
                "used key {k:?} left in {}",
                dir.display()
            );
        }
        used.push(4096 + k.start..4096 + k.end);
    }
    (used, s.next_offset())
}

#[test]
fn used_key_is_destroyed_at_both_ends() {
    let l = provision(1 << 20);
    let (_, next) = send_ten_frames_checking_their_key_is_destroyed(&l.a, &l.b);
    // The unused key just past the last frame is intact (non-zero) at both ends.
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    std::fs::File::open(l.a.join("home-lsa.a2b.pool"))
        .unwrap()
        .read_exact_at(&mut a, 4096 + next)
        .unwrap();
    std::fs::File::open(l.b.join("home-lsa.a2b.pool"))
        .unwrap()
        .read_exact_at(&mut b, 4096 + next)
        .unwrap();
    assert_eq!(a, b);
    assert_ne!(a, [0u8; 32]);
}

#[test]
fn provision_refuses_zero_absurd_and_existing() {
    let l = provision(4096);
    let fresh = tempfile::tempdir().unwrap();
    let (fa, fb) = (fresh.path().join("a"), fresh.path().join("b"));
    std::fs::create_dir_all(&fa).unwrap();
    std::fs::create_dir_all(&fb).unwrap();
    let before = (snapshot(&fa), snapshot(&fb));
    let e = pool::provision(LINK, 0, &fa, &fb).unwrap_err();
    assert!(matches!(e, KeyError::BadSize { .. }), "{e}");
    assert!(e.to_string().contains(LINK), "{e}");
    let e = pool::provision(LINK, 1 << 49, &fa, &fb).unwrap_err();
    assert!(e.to_string().contains("free"), "{e}");
    assert!(e.to_string().contains(LINK), "{e}");
    let e = pool::provision(LINK, u64::MAX, &fa, &fb).unwrap_err();
    assert!(matches!(e, KeyError::BadSize { .. }), "{e}");
    assert_eq!((snapshot(&fa), snapshot(&fb)), before);
    let before = (snapshot(&l.a), snapshot(&l.b));
    let e = pool::provision(LINK, 4096, &l.a, &l.b).unwrap_err();
    assert!(matches!(e, KeyError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("home-lsa.a2b.pool"), "{e}");
    assert_eq!((snapshot(&l.a), snapshot(&l.b)), before);
    let e = pool::provision("../x", 4096, &l.a, &l.b).unwrap_err();
    assert!(matches!(e, KeyError::InvalidLinkName { .. }), "{e}");
}

/// A ramfs mounted on a fresh temporary directory, detached (`umount -l`) when dropped, so
/// even when the test fails. Declare it before anything that keeps files in it open.
struct Ramfs {
    dir: tempfile::TempDir,
}

impl Ramfs {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("ramfs"),
            dir.path(),
            Some("ramfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount ramfs on {}: {e}", dir.path().display()));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        // Before the TempDir field removes the (then empty) mount point.
        if let Err(e) = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("umount -l {}: {e}", self.dir.path().display());
        }
    }
}

#[test]
fn used_key_is_overwritten_where_holes_cannot_be_punched() {
    // Needs root (mount), as the tests run.
    let ram = Ramfs::mount();
    const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6);
    assert_eq!(
        nix::sys::statfs::statfs(ram.path())
            .unwrap()
            .filesystem_type(),
        RAMFS_MAGIC,
        "{} is not a ramfs",
        ram.path().display()
    );
    // Punching must fail there with EOPNOTSUPP, else this would test the punch path again.
    let probe = ram.path().join("probe");
    std::fs::write(&probe, [7u8; 8192]).unwrap();
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&probe)
            .unwrap();
        // SAFETY: plain syscall on an fd owned by `f`; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096,
            )
        };
        let e = std::io::Error::last_os_error();
        assert_eq!(
            rc, -1,
            "ramfs punched a hole: pick a filesystem that cannot"
        );
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
    }
    std::fs::remove_file(&probe).unwrap();
    // `provision` refuses a ramfs (it reports no free space): provision elsewhere and copy
    // the pools in (mode kept).
    let l = provision(1 << 20);
    let (ra, rb) = (ram.path().join("a"), ram.path().join("b"));
    for (from, to) in [(&l.a, &ra), (&l.b, &rb)] {
        std::fs::create_dir(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let pool = |dir: &Path| std::fs::read(dir.join("home-lsa.a2b.pool")).unwrap();
    let before = [pool(&ra), pool(&rb)];
    assert_eq!(before[0].len() as u64, 4096 + (1 << 20));

    let (used, next) = send_ten_frames_checking_their_key_is_destroyed(&ra, &rb);
    assert_eq!(used.last().unwrap().end, 4096 + next);
    assert!(next < 1 << 20, "no unused key left to compare");
    // Every used byte zero, every other byte (header, unused key) as before, size unchanged.
    for (dir, before) in [(&ra, &before[0]), (&rb, &before[1])] {
        let after = pool(dir);
        assert_eq!(
            after.len(),
            before.len(),
            "pool size changed in {}",
            dir.display()
        );
        for k in &used {
            let k = k.start as usize..k.end as usize;
            assert!(before[k.clone()].iter().any(|&x| x != 0));
            assert!(
                after[k.clone()].iter().all(|&x| x == 0),
                "used key {k:?} left in {}",
                dir.display()
            );
        }
        let is_used = |i: usize| used.iter().any(|k| k.contains(&(i as u64)));
        let changed = (0..after.len()).find(|&i| !is_used(i) && after[i] != before[i]);
        assert_eq!(
            changed,
            None,
            "byte {changed:?} outside the used key changed in {}",
            dir.display()
        );
    }
}

/// A window larger than its pool ("64G" written for "64M") is refused where the home opens
/// its configured links (the site's are checked alike, in `mountd`'s server tests), naming
/// the link and the pool, before any file is touched.
#[test]
fn a_window_above_half_the_pool_is_refused_by_name() {
    use qgenome::sites::mountd::{LinkKeys, MountdSite};
    let l = provision(4 << 20);
    let window = 64 << 30;
    let pool = pool::pool_path(&l.a, LINK, Direction::AtoB);
    let e = refused(&l.a, "home-lsa.a2b.pool", || {
        qgenome::link::stream::check_window(LINK, &pool, 4 << 20, window)
    });
    assert!(e.to_string().contains("larger than pool"), "{e}");
    let before = snapshot(&l.a);
    let keys = LinkKeys {
        dir: l.a.clone(),
        link: LINK.into(),
        end: qgenome::keys::End::A,
        options: StreamOptions { window },
    };
    let Err(e) = MountdSite::tcp("site1", "127.0.0.1:9", &keys) else {
        panic!("a window of 64 GiB over a 4 MiB pool was taken");
    };
    let e = e.to_string();
    assert!(
        e.contains(LINK) && e.contains("home-lsa.a2b.pool") && e.contains("key_window"),
        "{e}"
    );
    assert_eq!(snapshot(&l.a), before, "files changed by a refused window");
    // The whole pool is allowed (tests' small pools use it).
    qgenome::link::stream::check_window(LINK, &pool, 4 << 20, 4 << 20).unwrap();
}
