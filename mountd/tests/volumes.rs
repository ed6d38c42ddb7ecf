//! Many shares through the store on a real file volume and on a loop block device.

use std::path::Path;

mod common;

use common::LoopDevice;
use qgenome_mountd::bench::pattern;
use qgenome_mountd::layout::{ShareKey, ShareMeta};
use qgenome_mountd::store::{FormatOptions, Store, StoreOptions};
use qgenome_mountd::volume::{
    create_file_volume, BlockDevice, Durability, UringOptions, UringVolume, VolumeError, VolumeKind,
};

const META: ShareMeta = ShareMeta {
    k: 3,
    n: 5,
    secret_len: 123_456,
};

fn key(i: u64) -> ShareKey {
    ShareKey {
        file_id: *b"volume-test-file",
        chunk: i / 5,
        share: (i % 5) as u8,
    }
}

fn len_of(i: u64) -> usize {
    [1usize, 4095, 4096, 65_537, 1 << 20, 300_001][(i % 6) as usize]
}

/// Puts `n` shares of assorted sizes, reads them back, reopens, reads them again.
fn round_trip(path: &Path, state: &Path, n: u64, expect: VolumeKind) {
    let opts = UringOptions::default();
    let dev = UringVolume::open(path, &opts).unwrap();
    assert_eq!(dev.kind(), expect);
    Store::format(&dev, "round-trip", &FormatOptions::default()).unwrap();
    let store = Store::open(dev, state, StoreOptions::default()).unwrap();
    let mut buf = Vec::new();
    for i in 0..n {
        buf.resize(len_of(i), 0);
        pattern(42, &key(i), &mut buf);
        store.put(key(i), META, &buf).unwrap();
    }
    let check = |store: &Store<UringVolume>| {
        let mut want = Vec::new();
        for i in 0..n {
            want.resize(len_of(i), 0);
            pattern(42, &key(i), &mut want);
            let got = store.get(&key(i)).unwrap();
            assert!(
                got.bytes() == &want[..],
                "share {i} differs on {}",
                path.display()
            );
            assert_eq!(got.meta, META);
        }
        assert_eq!(store.stat().shares, n);
        assert!(store.scrub().unwrap().damaged.is_empty());
    };
    check(&store);
    drop(store);
    let store = Store::open(
        UringVolume::open(path, &opts).unwrap(),
        state,
        StoreOptions::default(),
    )
    .unwrap();
    check(&store);
}

#[test]
fn many_shares_round_trip_on_a_file_volume_of_unaligned_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shares.vol");
    // Not a multiple of the block size: the tail is never addressed.
    let size = (96 << 20) + 1234;
    create_file_volume(&path, size, false).unwrap();
    let dev = UringVolume::open(&path, &UringOptions::default()).unwrap();
    assert!(dev.size() < size && dev.size().is_multiple_of(u64::from(dev.alignment().offset)));
    drop(dev);
    round_trip(&path, &dir.path().join("state"), 150, VolumeKind::File);
}

/// tmpfs accepts O_DIRECT but its statx reports no DIOALIGN: the alignment is probed, and a
/// zeroed volume there stores and serves shares like any other.
#[test]
fn many_shares_round_trip_on_a_zeroed_tmpfs_volume() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs /dev/shm (tmpfs)");
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("shares.vol");
    create_file_volume(&path, 64 << 20, true).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 64 << 20);
    assert!(
        bytes.iter().all(|b| *b == 0),
        "--zero leaves zeros over the whole volume"
    );
    drop(bytes);
    let dev = UringVolume::open(&path, &UringOptions::default()).unwrap();
    let a = dev.alignment();
    assert!(a.offset.is_power_of_two() && (512..=65536).contains(&a.offset));
    drop(dev);
    // A different directory for the index: sled's files stay off the volume's filesystem.
    let state = tempfile::tempdir().unwrap();
    round_trip(&path, state.path(), 50, VolumeKind::File);
}

/// A loop device over a file, detached on drop even when the test panics.
#[test]
fn many_shares_round_trip_on_a_loop_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backing.img");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(96 << 20).unwrap();
    drop(f);
    let lo = LoopDevice::attach(&file);
    let dev = UringVolume::open(&lo.dev, &UringOptions::default()).unwrap();
    assert_eq!(dev.kind(), VolumeKind::BlockDevice);
    assert_eq!(dev.size(), 96 << 20, "BLKSSZGET alignment and device size");
    drop(dev);
    round_trip(
        &lo.dev,
        &dir.path().join("state"),
        150,
        VolumeKind::BlockDevice,
    );
}

/// A filesystem mounted on a directory of its own, unmounted on drop.
struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    /// A tmpfs of `size`.
    fn tmpfs(size: &str) -> Self {
        Self::mount(&["-t", "tmpfs", "-o", &format!("size={size}"), "qgenome-test"])
    }

    fn mount(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(args)
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount {args:?} on {}", dir.path().display());
        Self { dir }
    }
}

/// A 64 MiB loop device whose backing file sits on a tmpfs of `size`: writes past what the
/// tmpfs holds fail at the device. The tmpfs and the device.
fn failing_disk(size: &str) -> (Mounted, LoopDevice) {
    let fs = Mounted::tmpfs(size);
    let backing = fs.dir.path().join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let lo = LoopDevice::attach(&backing);
    (fs, lo)
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A loop device just detached may hold its backing file on this mount a moment
        // longer (the kernel detaches it once it is idle): retry, then detach it lazily.
        let umount = |lazy: bool| {
            std::process::Command::new("umount")
                .args(lazy.then_some("-l"))
                .arg(self.dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        for _ in 0..40 {
            if umount(false) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = umount(true);
    }
}

/// A durable write that fails (here: the loop device's backing file cannot grow on a full
/// tmpfs, so the device answers the write with an error) stops every later durable write of
/// the volume, even where the device could take it, until the volume is opened again: after
/// a failed write or flush, what was written since the last good flush may not be on the
/// disk, and a later flush that succeeds does not say it is.
#[test]
fn after_a_failed_durable_write_the_volume_refuses_durable_writes_until_reopened() {
    for durability in [Durability::RwfDsync, Durability::Fdatasync] {
        refused_after_a_failed_durable_write(durability);
    }
}

fn refused_after_a_failed_durable_write(durability: Durability) {
    let (_fs, lo) = failing_disk("3m");
    let opts = UringOptions {
        durability,
        ..UringOptions::default()
    };
    let open = || UringVolume::open(&lo.dev, &opts).unwrap();
    let v = open();
    assert_eq!(v.kind(), VolumeKind::BlockDevice);
    assert_eq!(v.durability(), durability);
    let write = |v: &UringVolume, seed: u64, at: u64, durable: bool| {
        let mut b = v.alloc_buf(1 << 20);
        pattern(seed, &key(at), b.as_mut_slice());
        v.write_at(b, at << 20, durable)
    };
    let mut first_failure = None;
    for at in 0..16u64 {
        if let Err(e) = write(&v, 1, at, true) {
            first_failure = Some((at, e));
            break;
        }
    }
    let (failed_at, e) = first_failure.expect("a 3 MiB tmpfs cannot back 16 MiB of writes");
    assert!(failed_at >= 1, "the first MiB fits");
    assert!(
        matches!(e, VolumeError::Io { .. }),
        "the failure itself is reported as it is: {e}"
    );
    assert!(
        matches!(
            v.durable_writes_refused(),
            Some(VolumeError::DurabilityLost { .. })
        ),
        "callers can see it before they allocate"
    );
    // Block 0 is backed already: the device would take this write; the volume must not.
    let e = write(&v, 2, 0, true).expect_err("a durable write after the failure");
    let msg = e.to_string();
    assert!(
        matches!(e, VolumeError::DurabilityLost { .. })
            && msg.contains(&lo.dev.display().to_string())
            && msg.contains("refused until the daemon restarts"),
        "{msg}"
    );
    let mut want = vec![0u8; 1 << 20];
    pattern(1, &key(0), &mut want);
    let got = v.read_at(v.alloc_buf(1 << 20), 0).expect("reads go on");
    assert!(
        got.as_slice() == &want[..],
        "block 0 still holds what was acknowledged"
    );
    assert!(
        matches!(v.sync(), Err(VolumeError::DurabilityLost { .. })),
        "a sync is refused too"
    );
    drop(v);
    let v = open();
    write(&v, 3, 0, true).expect("a volume opened again takes durable writes");
}

/// A share index on a disk that fails a write-back (ext4 on a loop device whose backing file
/// sits on a full tmpfs): the flush that meets the failure fails, and so does every later
/// one, even once the disk takes writes again. Linux reports a write-back error once, and the
/// pages it lost are clean after it: a later flush that succeeded would acknowledge commits
/// that are not on the disk. (Here sled's own `sync_file_range` meets the error first, and
/// sled then refuses everything; `SledSync` latches it too.)
#[test]
fn after_a_failed_index_flush_every_later_flush_fails_until_reopened() {
    use qgenome::catalog::durable::SledSync;
    let (fs, lo) = failing_disk("12m");
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal"])
        // Inode tables written now, not by ext4's lazy-init thread after the mount: that
        // thread's writes would land in the tmpfs while the ballast below is sized.
        .args(["-E", "nodiscard,lazy_itable_init=0"])
        .arg(&lo.dev)
        .status()
        .expect("run mkfs.ext4");
    assert!(mkfs.success(), "mkfs.ext4 {}", lo.dev.display());
    let mnt = Mounted::mount(&["-o", "noinit_itable", lo.dev.to_str().unwrap()]);
    // What fills the tmpfs, and is removed to let the disk take writes again: all of its
    // free space but a 2 MiB margin, measured once the mount's own writes have reached it.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let free = nix::sys::statvfs::statvfs(fs.dir.path()).unwrap();
    let free = free.blocks_available() * free.fragment_size();
    let ballast = fs.dir.path().join("ballast");
    let room = free.saturating_sub(2 << 20);
    assert!(
        room > 0,
        "the 12 MiB tmpfs has {free} bytes free after mkfs"
    );
    std::fs::write(&ballast, vec![1u8; room as usize]).unwrap();

    let dir = mnt.dir.path().join("index");
    let db = sled::Config::new().path(&dir).open().unwrap();
    let sync = SledSync::open(&dir).unwrap();
    let mut failed = None;
    for i in 0u32..64 {
        db.insert(i.to_be_bytes(), vec![i as u8; 100 << 10])
            .unwrap();
        if let Err(e) = sync.flush(&db) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("a 2 MiB margin cannot take 6 MiB of index");
    eprintln!("first failure: {e}");
    std::fs::remove_file(&ballast).unwrap();
    // sled keeps its first I/O error and fails what comes after it too; either way, nothing
    // written since is acknowledged.
    let insert = db.insert(b"after", &b"v"[..]);
    let again = sync.flush(&db);
    assert!(
        again.is_err(),
        "a flush after a failed one went through (the insert: {insert:?})"
    );
    drop(sync);
    drop(db);
}
