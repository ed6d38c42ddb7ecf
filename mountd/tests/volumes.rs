//! Many shares through the store on a real file volume and on a loop block device.

use std::path::Path;

mod common;

use common::LoopDevice;
use qgenome_mountd::bench::pattern;
use qgenome_mountd::layout::{ShareKey, ShareMeta};
use qgenome_mountd::store::{FormatOptions, Store, StoreOptions};
use qgenome_mountd::volume::{
    create_file_volume, BlockDevice, UringOptions, UringVolume, VolumeKind,
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
