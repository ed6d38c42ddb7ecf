//! The io_uring volume on a real file: round trips, concurrency, alignment, durability modes.

use std::sync::Arc;

use qgenome_mountd::volume::{
    BlockDevice, Durability, RequestError, UringOptions, UringVolume, VolumeError, VolumeKind,
};

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn file_of(dir: &tempfile::TempDir, size: u64) -> std::path::PathBuf {
    let p = dir.path().join("vol");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// The options with the group fdatasync.
fn group_sync() -> UringOptions {
    UringOptions {
        durability: Durability::Fdatasync,
        ..UringOptions::default()
    }
}

#[test]
fn round_trip_every_durability_mode_with_fixed_and_heap_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let path = file_of(&dir, 16 << 20);
    for durability in [
        Durability::RwfDsync,
        Durability::ODsync,
        Durability::Fdatasync,
    ] {
        let opts = UringOptions {
            durability,
            fixed_buffers: 2,
            ..UringOptions::default()
        };
        let v = UringVolume::open(&path, &opts).unwrap();
        assert_eq!(v.kind(), VolumeKind::File);
        assert!(v.has_fixed_buffers());
        for (i, len) in [4096usize, 1 << 20, 3 << 20].into_iter().enumerate() {
            let data = pattern(i as u64 + durability as u64 * 10, len);
            let mut b = v.alloc_buf(len);
            // 3 MiB is larger than a slot, so it must come from the heap.
            assert_eq!(b.is_fixed(), len <= opts.fixed_buffer_len);
            b.as_mut_slice().copy_from_slice(&data);
            let off = (i as u64) * (4 << 20);
            v.write_at(b, off, true).unwrap();
            let r = v.read_at(v.alloc_buf(len), off).unwrap();
            assert!(r.as_slice() == &data[..], "{durability:?} len {len}");
        }
        v.sync().unwrap();
    }
}

/// RWF_DSYNC is the default; the group fdatasync, when asked for, is used where there is a
/// device to flush, and a volume on tmpfs, which has none, writes with RWF_DSYNC instead (no
/// fdatasync through io_uring's worker threads for nothing).
#[test]
fn the_group_fdatasync_asked_for_is_used_except_on_tmpfs() {
    assert_eq!(Durability::default(), Durability::RwfDsync);
    let on_disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let in_ram = tempfile::tempdir_in("/dev/shm").unwrap();
    let fs = |d: &tempfile::TempDir| {
        nix::sys::statfs::statfs(d.path())
            .unwrap()
            .filesystem_type()
    };
    assert_ne!(
        fs(&on_disk),
        nix::sys::statfs::TMPFS_MAGIC,
        "this test needs /var/tmp on a disk"
    );
    assert_eq!(
        fs(&in_ram),
        nix::sys::statfs::TMPFS_MAGIC,
        "this test needs /dev/shm on tmpfs"
    );
    for (dir, want) in [
        (&on_disk, Durability::Fdatasync),
        (&in_ram, Durability::RwfDsync),
    ] {
        let v = UringVolume::open(&file_of(dir, 4 << 20), &group_sync()).unwrap();
        assert_eq!(v.durability(), want, "{}", dir.path().display());
        let data = pattern(7, 1 << 20);
        let mut b = v.alloc_buf(data.len());
        b.as_mut_slice().copy_from_slice(&data);
        v.write_at(b, 0, true).unwrap();
        assert!(v.read_at(v.alloc_buf(data.len()), 0).unwrap().as_slice() == &data[..]);
    }
}

/// Durable writes under way together share their fdatasyncs: 64 of them, all submitted
/// before the first completes, take far fewer than 64; each is acknowledged only after one
/// that was issued once it was written.
#[test]
fn durable_writes_under_way_together_share_their_fdatasyncs() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let v = UringVolume::open(&file_of(&dir, 16 << 20), &group_sync()).unwrap();
    assert_eq!(v.durability(), Durability::Fdatasync);
    // Every buffer filled first, then all submitted at once: filled one by one between the
    // submissions (slow in a debug build on a busy machine), the first writes completed and
    // were flushed alone while the last were still being made (42 syncs in one `make test`).
    let bufs: Vec<_> = (0..64u64)
        .map(|i| {
            let data = pattern(i, 64 << 10);
            let mut b = v.alloc_buf(data.len());
            b.as_mut_slice().copy_from_slice(&data);
            b
        })
        .collect();
    let before = v.group_syncs();
    let pending: Vec<_> = bufs
        .into_iter()
        .zip(0u64..)
        .map(|(b, i)| v.submit_write(b, i * (64 << 10), true))
        .collect();
    for p in pending {
        p.wait().unwrap();
    }
    let syncs = v.group_syncs() - before;
    assert!(
        (1..=32).contains(&syncs),
        "64 durable writes under way together took {syncs} fdatasyncs"
    );
    for i in 0..64u64 {
        let got = v.read_at(v.alloc_buf(64 << 10), i * (64 << 10)).unwrap();
        assert!(got.as_slice() == &pattern(i, 64 << 10)[..], "write {i}");
    }
}

/// Plain and durable writes from many threads, then reads all in flight at once, with each
/// durability mode (the group fdatasync's bookkeeping sees plain and durable writes mixed).
#[test]
fn many_concurrent_requests_from_threads_and_async() {
    for durability in [Durability::RwfDsync, Durability::Fdatasync] {
        concurrent_requests(durability);
    }
}

fn concurrent_requests(durability: Durability) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = file_of(&dir, 64 << 20);
    let opts = UringOptions {
        durability,
        ..UringOptions::default()
    };
    let v = Arc::new(UringVolume::open(&path, &opts).unwrap());
    assert_eq!(v.durability(), durability);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let v = Arc::clone(&v);
            std::thread::spawn(move || {
                for j in 0..16u64 {
                    let n = t * 16 + j;
                    let data = pattern(n, 256 << 10);
                    let mut b = v.alloc_buf(data.len());
                    b.as_mut_slice().copy_from_slice(&data);
                    v.write_at(b, n * (256 << 10), j % 2 == 0).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Read back through the async interface, all 128 reads in flight at once.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let pending: Vec<_> = (0..128u64)
            .map(|n| v.submit_read(v.alloc_buf(256 << 10), n * (256 << 10)))
            .collect();
        for (n, p) in pending.into_iter().enumerate() {
            let b = p.await.unwrap().unwrap();
            assert!(
                b.as_slice() == &pattern(n as u64, 256 << 10)[..],
                "request {n}"
            );
        }
    });
}

#[test]
fn unaligned_volume_size_and_misaligned_requests_are_refused_before_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let size = (10 << 20) + 1234;
    let path = file_of(&dir, size);
    let v = UringVolume::open(&path, &UringOptions::default()).unwrap();
    let a = v.alignment();
    assert!(a.offset.is_power_of_two() && a.offset >= 512, "{a:?}");
    assert_eq!(v.size(), a.floor(size));
    assert!(v.size() < size);
    // The last aligned block works; one past it is refused with a named error.
    let last = v.size() - u64::from(a.offset);
    v.write_at(v.alloc_buf(a.offset as usize), last, true)
        .unwrap();
    let e = v
        .write_at(v.alloc_buf(a.offset as usize), v.size(), true)
        .unwrap_err();
    assert!(
        matches!(
            &e,
            VolumeError::Request {
                source: RequestError::OutOfRange { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("vol"), "error names the volume: {e}");
    let e = v.read_at(v.alloc_buf(a.offset as usize), 1).unwrap_err();
    assert!(matches!(
        e,
        VolumeError::Request {
            source: RequestError::MisalignedOffset { .. },
            ..
        }
    ));
    let e = v
        .read_at(v.alloc_buf(a.offset as usize + 1), 0)
        .unwrap_err();
    assert!(matches!(
        e,
        VolumeError::Request {
            source: RequestError::MisalignedLength { .. },
            ..
        }
    ));
}

#[test]
fn open_errors_name_the_path() {
    let e = UringVolume::open(
        std::path::Path::new("/nonexistent/qg-vol"),
        &UringOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/qg-vol"), "{e}");
    let e =
        UringVolume::open(std::path::Path::new("/dev/null"), &UringOptions::default()).unwrap_err();
    assert!(e.to_string().contains("/dev/null"), "{e}");
}
