//! The store on the in-memory volume: round trips, replace, delete, full volume, torn writes,
//! tampering, restart and index rebuild.

use qgenome_mountd::layout::{IndexEntry, ShareKey, ShareMeta};

const META: ShareMeta = ShareMeta {
    k: 2,
    n: 3,
    secret_len: 1 << 20,
};

fn key(file: u8, chunk: u64, share: u8) -> ShareKey {
    let mut file_id = [0u8; 16];
    file_id[0] = file;
    file_id[15] = 0xF1;
    ShareKey {
        file_id,
        chunk,
        share,
    }
}

fn share_bytes(seed: u64, key: &ShareKey, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    qgenome_mountd::bench::pattern(seed, key, &mut v);
    v
}
use qgenome_mountd::store::{FormatOptions, Store, StoreError, StoreOptions};
use qgenome_mountd::volume::{Alignment, MemVolume};

const A: Alignment = Alignment {
    offset: 512,
    mem: 512,
};

fn fresh(size: u64) -> MemVolume {
    let v = MemVolume::new("mem-vol", size, A);
    Store::format(&v, "site-a", &FormatOptions::default()).unwrap();
    v
}

fn reopen(image: Vec<u8>, dir: &std::path::Path) -> Store<MemVolume> {
    Store::open(
        MemVolume::from_image("mem-vol", image, A),
        dir,
        StoreOptions::default(),
    )
    .unwrap()
}

#[test]
fn many_shares_round_trip_list_stat_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(64 << 20), dir.path(), StoreOptions::default()).unwrap();
    let sizes = [1usize, 511, 512, 4096, 4097, 100_000, 1 << 20];
    let mut keys = Vec::new();
    for (i, &len) in sizes.iter().cycle().take(40).enumerate() {
        let k = key(1, i as u64, (i % 3) as u8);
        s.put(k, META, &share_bytes(7, &k, len)).unwrap();
        keys.push((k, len));
    }
    for (k, len) in &keys {
        let d = s.get(k).unwrap();
        assert_eq!(d.bytes(), &share_bytes(7, k, *len)[..], "{k}");
        assert_eq!(d.meta, META);
        assert!(
            !format!("{d:?}").contains("bytes: ["),
            "Debug must not dump share bytes"
        );
    }
    let listed: Vec<_> = s.list().map(|r| r.unwrap().0).collect();
    let mut want: Vec<_> = keys.iter().map(|x| x.0).collect();
    want.sort();
    assert_eq!(listed, want, "list is in key order and complete");
    let st = s.stat();
    assert_eq!(st.shares, 40);
    assert!(st.free < st.capacity);
    let free_before = st.free;
    let image = s.device().image();
    drop(s);
    let s = reopen(image, dir.path());
    assert_eq!(
        s.stat().free,
        free_before,
        "free space recomputed from the index"
    );
    for (k, len) in &keys {
        assert_eq!(s.get(k).unwrap().bytes(), &share_bytes(7, k, *len)[..]);
    }
}

#[test]
fn replace_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(8 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(2, 0, 1);
    s.put(k, META, &share_bytes(1, &k, 5000)).unwrap();
    let g1 = s.get(&k).unwrap().generation;
    let free1 = s.stat().free;
    s.put(k, META, &share_bytes(2, &k, 5000)).unwrap();
    // Freed once the new entry is durable: by the flusher within 20 ms, or by a flush.
    s.flush().unwrap();
    let d = s.get(&k).unwrap();
    assert_eq!(d.bytes(), &share_bytes(2, &k, 5000)[..]);
    assert!(d.generation > g1);
    assert_eq!(s.stat().free, free1, "the replaced extent was freed");
    s.delete(&k).unwrap();
    assert!(matches!(s.get(&k), Err(StoreError::NotFound { .. })));
    assert!(matches!(s.delete(&k), Err(StoreError::NotFound { .. })));
    assert_eq!(s.stat().free, s.stat().capacity);
}

#[test]
fn full_volume_is_a_clear_error_and_earlier_shares_stay_intact() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(4 << 20), dir.path(), StoreOptions::default()).unwrap();
    let mut stored = Vec::new();
    let err = loop {
        let k = key(3, stored.len() as u64, 0);
        match s.put(k, META, &share_bytes(3, &k, 300_000)) {
            Ok(()) => stored.push(k),
            Err(e) => break e,
        }
    };
    assert!(stored.len() >= 10, "{} shares fit", stored.len());
    match &err {
        StoreError::VolumeFull {
            site, needed, free, ..
        } => {
            assert_eq!(site, "site-a");
            assert!(needed > free, "{err}");
        }
        other => panic!("expected VolumeFull, got {other}"),
    }
    assert!(err.to_string().contains("site-a") && err.to_string().contains("full"));
    for k in &stored {
        assert_eq!(s.get(k).unwrap().bytes(), &share_bytes(3, k, 300_000)[..]);
    }
    // Deleting one makes room again.
    s.delete(&stored[0]).unwrap();
    let k = key(3, 999, 0);
    s.put(k, META, &share_bytes(3, &k, 300_000)).unwrap();
}

#[test]
fn torn_write_is_never_served_and_failed_puts_give_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(8 << 20), dir.path(), StoreOptions::default()).unwrap();
    let good = key(4, 0, 0);
    s.put(good, META, &share_bytes(4, &good, 70_000)).unwrap();
    let free = s.stat().free;
    let torn = key(4, 1, 0);
    // The header block and part of the share reach the volume, the rest does not; the disk
    // works again for the store's clean-up: the header is zeroed and the space given back.
    s.device().tear_next_write(8192);
    assert!(s.put(torn, META, &share_bytes(4, &torn, 70_000)).is_err());
    assert_eq!(s.stat().free, free, "the failed put's extent is free again");
    assert!(matches!(s.get(&torn), Err(StoreError::NotFound { .. })));
    let cleaned = s.device().image();
    // The same tear as a crash: the disk takes no write after it, the header stays torn.
    let crashed = key(4, 2, 0);
    s.device().tear_next_write(8192);
    s.device().fail_writes_after(1);
    assert!(s
        .put(crashed, META, &share_bytes(4, &crashed, 70_000))
        .is_err());
    let image = s.device().image();
    drop(s);
    // Neither is served after a restart, and a rebuild from the headers finds no trace of
    // the first and rejects the second by its checksum.
    let s = reopen(image.clone(), dir.path());
    for k in [torn, crashed] {
        assert!(matches!(s.get(&k), Err(StoreError::NotFound { .. })));
    }
    drop(s);
    for (image, want_torn) in [(cleaned, 0), (image, 1)] {
        let dir2 = tempfile::tempdir().unwrap();
        let v = MemVolume::from_image("mem-vol", image, A);
        let r = Store::rebuild_index(&v, dir2.path()).unwrap();
        assert_eq!((r.shares, r.torn), (1, want_torn), "{r:?}");
        let s = Store::open(v, dir2.path(), StoreOptions::default()).unwrap();
        for k in [torn, crashed] {
            assert!(matches!(s.get(&k), Err(StoreError::NotFound { .. })));
        }
        assert_eq!(
            s.get(&good).unwrap().bytes(),
            &share_bytes(4, &good, 70_000)[..]
        );
    }
}

#[test]
fn tampered_bytes_are_detected_named_and_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(8 << 20), dir.path(), StoreOptions::default()).unwrap();
    let keys: Vec<_> = (0..5).map(|c| key(5, c, 2)).collect();
    for k in &keys {
        s.put(*k, META, &share_bytes(5, k, 10_000)).unwrap();
    }
    let (k0, e0) = s.list().next().unwrap().unwrap();
    let bs = u64::from(s.superblock().block_size);
    s.device().poke(e0.offset + bs + 1234, |b| b ^ 0x01);
    let err = s.get(&k0).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("chunk {}", k0.chunk)) && msg.contains("050000"),
        "{msg}"
    );
    // A changed header byte is caught too.
    let (k1, e1) = s.list().nth(1).unwrap().unwrap();
    s.device().poke(e1.offset + 50, |b| b ^ 0x80);
    assert!(matches!(s.get(&k1), Err(StoreError::Damaged { .. })));
    let report = s.scrub().unwrap();
    assert_eq!(report.checked, 5);
    let mut bad: Vec<_> = report.damaged.iter().map(|d| d.key).collect();
    bad.sort();
    assert_eq!(bad, vec![k0, k1]);
    assert_eq!(s.stat().health, qgenome_mountd::store::Health::Damaged);
}

/// Headers no put writes, crafted on the volume (their checksum is no secret): a share
/// length that overflows its extent's size or would have the rebuild read the whole volume,
/// a generation at the top of the range. The rebuild skips them and keeps every real share.
#[test]
fn a_rebuild_skips_crafted_headers_without_panicking_or_reading_the_volume_at_once() {
    use qgenome_mountd::layout::{share_sum, ShareHeader};
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(8, 0, 0);
    s.put(k, META, &share_bytes(8, &k, 20_000)).unwrap();
    let mut image = s.device().image();
    drop(s);
    let sb =
        qgenome_mountd::store::read_superblock(&MemVolume::from_image("mem-vol", image.clone(), A))
            .unwrap();
    let au = u64::from(sb.alloc_unit);
    let body = vec![7u8; 4096];
    let crafted = |share_len: u64, generation: u64| ShareHeader {
        volume_id: sb.volume_id,
        key: key(9, share_len % 1000, 0),
        meta: META,
        share_len,
        generation,
        extent_len: sb.extent_len(share_len.min(4096)),
        share_sum: share_sum(&body),
    };
    let headers = [
        crafted(u64::MAX, 1),
        crafted(sb.volume_len - 4 * au, 1),
        crafted(4096, u64::MAX),
    ];
    for (i, h) in headers.iter().enumerate() {
        let at = (sb.volume_len - (i as u64 + 2) * au) as usize;
        image[at..at + h.encode().len()].copy_from_slice(&h.encode());
        let bs = sb.block_size as usize;
        image[at + bs..at + bs + body.len()].copy_from_slice(&body);
    }
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let v = MemVolume::from_image("mem-vol", image, A);
    let r = Store::rebuild_index(&v, dir.path()).unwrap();
    assert_eq!(r.shares, 1, "{r:?}");
    assert!(r.max_generation_seen < 1 << 62, "{r:?}");
    let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(8, &k, 20_000)[..]);
    let k2 = key(8, 1, 0);
    s.put(k2, META, &share_bytes(8, &k2, 1000)).unwrap();
}

#[test]
fn rebuild_index_restores_live_shares_newest_generation_and_not_deleted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    for c in 0..10 {
        let k = key(6, c, 0);
        s.put(k, META, &share_bytes(6, &k, 20_000 + c as usize * 1000))
            .unwrap();
    }
    let replaced = key(6, 3, 0);
    s.put(replaced, META, &share_bytes(66, &replaced, 9_000))
        .unwrap();
    let deleted = key(6, 4, 0);
    s.delete(&deleted).unwrap();
    let image = s.device().image();
    drop(s);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let v = MemVolume::from_image("mem-vol", image, A);
    let r = Store::rebuild_index(&v, dir.path()).unwrap();
    assert_eq!(r.shares, 9, "{r:?}");
    let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(
        s.get(&replaced).unwrap().bytes(),
        &share_bytes(66, &replaced, 9_000)[..]
    );
    assert!(matches!(s.get(&deleted), Err(StoreError::NotFound { .. })));
    for c in [0u64, 1, 2, 5, 6, 7, 8, 9] {
        let k = key(6, c, 0);
        assert_eq!(
            s.get(&k).unwrap().bytes(),
            &share_bytes(6, &k, 20_000 + c as usize * 1000)[..]
        );
    }
    // New generations stay above every one on the volume, and new puts avoid live extents.
    let k = key(6, 100, 0);
    s.put(k, META, &share_bytes(6, &k, 50_000)).unwrap();
    assert!(s.get(&k).unwrap().generation > s.get(&replaced).unwrap().generation);
    assert_eq!(s.scrub().unwrap().damaged.len(), 0);
}

#[test]
fn index_of_another_volume_and_bad_shares_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(fresh(4 << 20), dir.path(), StoreOptions::default()).unwrap());
    let e = Store::open(fresh(4 << 20), dir.path(), StoreOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::StateMismatch { .. }), "{e}");
    assert!(e.to_string().contains("mem-vol"), "{e}");
    let e = Store::open(
        MemVolume::new("blank", 1 << 20, A),
        dir.path(),
        StoreOptions::default(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(e, StoreError::NoSuperblock { .. }) && e.to_string().contains("blank"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(4 << 20), dir.path(), StoreOptions::default()).unwrap();
    let e = s.put(key(7, 0, 3), META, b"xyz").unwrap_err();
    assert!(
        matches!(e, StoreError::InvalidShare { .. }) && e.to_string().contains("share index"),
        "{e}"
    );
    assert!(matches!(
        s.put(key(7, 0, 0), META, b""),
        Err(StoreError::InvalidShare { .. })
    ));
}

#[test]
fn concurrent_puts_and_gets() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(
        Store::open(fresh(64 << 20), dir.path(), StoreOptions::default()).unwrap(),
    );
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for c in 0..30 {
                    let k = key(8, c, t % 3);
                    let k = qgenome_mountd::layout::ShareKey {
                        file_id: [t; 16],
                        ..k
                    };
                    s.put(k, META, &share_bytes(8, &k, 100_000)).unwrap();
                    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(8, &k, 100_000)[..]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.stat().shares, 120);
    assert!(s.scrub().unwrap().damaged.is_empty());
}

fn open_mem(image: Vec<u8>, dir: &std::path::Path) -> Result<Store<MemVolume>, StoreError> {
    Store::open(
        MemVolume::from_image("mem-vol", image, A),
        dir,
        StoreOptions::default(),
    )
}

#[test]
fn a_volume_holding_shares_is_refused_without_its_index_never_served_empty() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(8 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(12, 0, 0);
    s.put(k, META, &share_bytes(12, &k, 100_000)).unwrap();
    let image = s.device().image();
    drop(s);
    // A mistyped state_dir: refused, naming it and the volume, and nothing is created there.
    let other = tempfile::tempdir().unwrap();
    let wrong = other.path().join("mistyped");
    let e = open_mem(image.clone(), &wrong)
        .err()
        .expect("a volume holding a share was opened with a new, empty index");
    let m = e.to_string();
    assert!(
        m.contains(&wrong.display().to_string())
            && m.contains("mem-vol")
            && m.contains("rebuild-index"),
        "{m}"
    );
    assert!(
        !wrong.exists(),
        "the refused open created {}",
        wrong.display()
    );
    // An index directory without an index in it (a crash, or an older version's empty
    // index) is refused the same way.
    std::fs::create_dir_all(wrong.join("index")).unwrap();
    let e = open_mem(image.clone(), &wrong)
        .err()
        .expect("empty index accepted");
    assert!(e.to_string().contains("rebuild-index"), "{e}");
    // The original state_dir still serves the share; a rebuilt index does too.
    let s = reopen(image.clone(), dir.path());
    assert_eq!(
        s.get(&k).unwrap().bytes(),
        &share_bytes(12, &k, 100_000)[..]
    );
    drop(s);
    let rebuilt = other.path().join("rebuilt");
    let v = MemVolume::from_image("mem-vol", image, A);
    assert_eq!(Store::rebuild_index(&v, &rebuilt).unwrap().shares, 1);
    let image = v.image();
    let s = Store::open(v, &rebuilt, StoreOptions::default()).unwrap();
    assert_eq!(
        s.get(&k).unwrap().bytes(),
        &share_bytes(12, &k, 100_000)[..]
    );
    drop(s);
    // The rebuilt index is the volume's index now; the old one is refused.
    let e = open_mem(image, dir.path())
        .err()
        .expect("old index accepted");
    assert!(matches!(e, StoreError::StaleIndex { .. }), "{e}");
}

#[test]
fn a_volume_that_never_held_a_share_gets_an_index_where_it_is_opened() {
    // `format` made an index in one directory; the daemon's state_dir is another (the
    // demo deployment does this): nothing can be lost, so the index is created there.
    let image = fresh(8 << 20).image();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    drop(open_mem(image.clone(), d1.path()).unwrap());
    let s = open_mem(image, d2.path()).unwrap();
    let k = key(13, 0, 1);
    s.put(k, META, b"first share").unwrap();
    let image = s.device().image();
    drop(s);
    // Now the volume holds a share written through d2's index: format's empty index in d1
    // is stale and refused (it would serve the volume as empty).
    let e = open_mem(image.clone(), d1.path())
        .err()
        .expect("a stale empty index was accepted");
    let m = e.to_string();
    assert!(
        m.contains(&d1.path().display().to_string())
            && m.contains("not the index of volume mem-vol")
            && m.contains("rebuild-index"),
        "{m}"
    );
    assert_eq!(
        reopen(image, d2.path()).get(&k).unwrap().bytes(),
        b"first share"
    );
}

#[test]
fn a_volume_with_shares_but_no_index_tag_is_tagged_when_opened_with_its_index() {
    use qgenome_mountd::layout::{Superblock, SUPERBLOCK_LEN};
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(8 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(14, 0, 2);
    s.put(k, META, b"old share").unwrap();
    let mut image = s.device().image();
    drop(s);
    // As an older version left it: shares, and no index tag.
    let mut sb = Superblock::decode(&image[..SUPERBLOCK_LEN]).unwrap();
    assert_ne!(sb.index_tag, 0);
    sb.index_tag = 0;
    image[..SUPERBLOCK_LEN].copy_from_slice(&sb.encode());
    let s = reopen(image, dir.path());
    let image = s.device().image();
    drop(s);
    let tag = Superblock::decode(&image[..SUPERBLOCK_LEN])
        .unwrap()
        .index_tag;
    assert_ne!(tag, 0);
    let other = tempfile::tempdir().unwrap();
    assert!(open_mem(image, other.path()).is_err());
}

/// While a store has its index open, neither a rebuild of that index nor a second store on
/// it may start (the rebuild would move the index aside under the running one, whose
/// acknowledged puts would then be missing from the index in use at the next start).
#[test]
fn an_index_in_use_is_neither_rebuilt_nor_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(9, 0, 0);
    s.put(k, META, &share_bytes(9, &k, 4096)).unwrap();
    let image = s.device().image();
    let v = MemVolume::from_image("mem-vol", image.clone(), A);
    let e = Store::rebuild_index(&v, dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    assert!(
        e.to_string().contains(&dir.path().display().to_string()),
        "{e}"
    );
    assert!(
        dir.path().join("index").exists(),
        "the index in use was moved"
    );
    let e = Store::open(
        MemVolume::from_image("mem-vol", image.clone(), A),
        dir.path(),
        StoreOptions::default(),
    )
    .err()
    .expect("a second store on an index in use");
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    drop(s);
    assert_eq!(Store::rebuild_index(&v, dir.path()).unwrap().shares, 1);
}

/// `read_located` is the daemon's GET without the key's lock: whatever happened to the key
/// between `locate` and the read, it serves the located share's exact bytes or nothing.
#[test]
fn a_read_without_the_key_lock_serves_only_bytes_that_verify() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(8 << 20), dir.path(), StoreOptions::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let read = |l| rt.block_on(s.read_located(&l)).unwrap();
    let keys: Vec<_> = (0..5).map(|c| key(9, c, 1)).collect();
    for k in &keys {
        s.put(*k, META, &share_bytes(9, k, 30_000)).unwrap();
    }
    let [same, replaced, deleted, reused, damaged] = keys[..] else {
        unreachable!()
    };

    // Nothing happened: the share, as `get` gives it.
    let l = s.locate(&same).unwrap();
    assert!(l.read_len() >= 30_000);
    assert_eq!(read(l).unwrap().bytes(), s.get(&same).unwrap().bytes());

    // Replaced after it was located: the old extent is tombstoned.
    let l = s.locate(&replaced).unwrap();
    s.put(replaced, META, &share_bytes(99, &replaced, 30_000))
        .unwrap();
    s.flush().unwrap();
    assert!(read(l).is_none());
    assert_eq!(
        s.get(&replaced).unwrap().bytes(),
        &share_bytes(99, &replaced, 30_000)[..]
    );

    // Deleted after it was located.
    let l = s.locate(&deleted).unwrap();
    s.delete(&deleted).unwrap();
    assert!(read(l).is_none());

    // Damaged on the volume: nothing, and not counted as a damaged read (the locked `get`
    // that follows in the daemon is what reports it).
    let offset_of = |k: ShareKey| {
        s.list()
            .map(Result::unwrap)
            .find(|(key, _)| *key == k)
            .map(|(_, e)| e.offset)
            .unwrap()
    };
    let l = s.locate(&damaged).unwrap();
    let at = offset_of(damaged) + u64::from(s.superblock().block_size) + 7;
    s.device().poke(at, |b| b ^ 0x10);
    assert!(read(l).is_none());
    assert_eq!(s.stat().damaged_reads, 0);
    assert!(matches!(s.get(&damaged), Err(StoreError::Damaged { .. })));
    assert_eq!(s.stat().damaged_reads, 1);

    // Deleted, and its extent given to another share of the same length: with the volume
    // full otherwise, that extent is the only place the new share fits.
    let l = s.locate(&reused).unwrap();
    let offset = offset_of(reused);
    let mut filler = 0;
    while s
        .put(
            key(11, filler, 0),
            META,
            &share_bytes(11, &key(11, filler, 0), 30_000),
        )
        .is_ok()
    {
        filler += 1;
    }
    s.delete(&reused).unwrap();
    let other = key(10, 0, 0);
    s.put(other, META, &share_bytes(10, &other, 30_000))
        .unwrap();
    assert_eq!(offset_of(other), offset);
    assert!(read(l).is_none());
}

/// A delete the index cannot commit (its sync failed before) is refused before it touches the
/// share, which stays readable, here and after a restart: it used to zero the share's header
/// first and fail at the commit, so that the share read as damaged from then on.
#[test]
fn a_delete_the_index_cannot_commit_leaves_the_share() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(14, 1, 0);
    s.put(k, META, &share_bytes(1, &k, 30_000)).unwrap();
    s.fail_index_flushes();
    let e = s
        .delete(&k)
        .expect_err("a delete whose commit cannot be durable");
    assert!(matches!(e, StoreError::Index { .. }), "{e}");
    assert!(
        matches!(s.flush(), Err(StoreError::Index { .. })),
        "a flush says the index cannot be made durable"
    );
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(1, &k, 30_000)[..]);
    let image = s.device().image();
    drop(s);
    let s = reopen(image, dir.path());
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(1, &k, 30_000)[..]);
    assert_eq!(s.scrub().unwrap().damaged.len(), 0);
}

/// Likewise on a volume that refuses durable writes (its flush failed): the delete is refused
/// with `DurabilityLost`, naming the volume, and the share stays readable.
#[test]
fn a_delete_on_a_volume_that_lost_durability_leaves_the_share() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(16, 1, 0);
    s.put(k, META, &share_bytes(1, &k, 30_000)).unwrap();
    s.device().lose_durability();
    let e = s
        .delete(&k)
        .expect_err("a delete that cannot be made durable");
    assert!(
        matches!(
            e,
            StoreError::Volume(qgenome_mountd::volume::VolumeError::DurabilityLost { .. })
        ) && e.to_string().contains("mem-vol"),
        "{e}"
    );
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(1, &k, 30_000)[..]);
    assert!(s.put(k, META, &share_bytes(2, &k, 30_000)).is_err());
}

/// Rebuilds the index of `image` from the volume alone (the index lost), then opens it.
fn rebuilt(image: Vec<u8>, dir: &std::path::Path) -> (u64, u64, Store<MemVolume>) {
    std::fs::remove_dir_all(dir.join("index")).unwrap();
    let v = MemVolume::from_image("mem-vol", image, A);
    let r = Store::rebuild_index(&v, dir).unwrap();
    let s = Store::open(v, dir, StoreOptions::default()).unwrap();
    (r.shares, r.superseded, s)
}

/// Two shares `k` and `other`, then a replace of `k` whose tombstone of the old extent does not
/// reach the volume (a crash, here a disk failing right after the new share's write). The put
/// succeeds: the new share is durable and indexed. The store, with the two keys.
fn interrupted_replace_store(
    dir: &std::path::Path,
    file: u8,
) -> (Store<MemVolume>, ShareKey, ShareKey) {
    let s = Store::open(fresh(16 << 20), dir, StoreOptions::default()).unwrap();
    let (k, other) = (key(file, 1, 0), key(file, 2, 0));
    s.put(k, META, &share_bytes(1, &k, 30_000)).unwrap();
    s.put(other, META, &share_bytes(1, &other, 20_000)).unwrap();
    s.device().fail_writes_after(1);
    s.put(k, META, &share_bytes(2, &k, 30_000))
        .expect("a replace whose tombstone failed has still stored the new share");
    (s, k, other)
}

/// [`interrupted_replace_store`], then the process gone: the volume's image, with the two keys.
fn interrupted_replace(dir: &std::path::Path, file: u8) -> (Vec<u8>, ShareKey, ShareKey) {
    let (s, k, other) = interrupted_replace_store(dir, file);
    (s.device().image(), k, other)
}

/// The same, with the store still running and the disk back: deleting the key first finishes
/// the failed tombstone, so a rebuild brings back no older generation of it.
#[test]
fn a_delete_after_a_failed_tombstone_leaves_no_older_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (s, k, other) = interrupted_replace_store(dir.path(), 11);
    s.device().fail_writes_after(u64::MAX);
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(2, &k, 30_000)[..]);
    delete_and_rebuild(s, k, other, dir.path());
}

/// Deletes `k`, loses the index and rebuilds it: `k` must stay gone (no older generation of
/// it comes back) and `other` intact.
fn delete_and_rebuild(s: Store<MemVolume>, k: ShareKey, other: ShareKey, dir: &std::path::Path) {
    s.delete(&k).unwrap();
    let image = s.device().image();
    drop(s);
    let (shares, superseded, s) = rebuilt(image, dir);
    assert_eq!((shares, superseded), (1, 0));
    assert!(matches!(s.get(&k), Err(StoreError::NotFound { .. })));
    assert_eq!(
        s.get(&other).unwrap().bytes(),
        &share_bytes(1, &other, 20_000)[..]
    );
    assert_eq!(s.scrub().unwrap().damaged.len(), 0);
}

/// After an interrupted replace, restarted with its index: the open finishes the tombstone.
#[test]
fn a_replaced_share_whose_tombstone_was_interrupted_never_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (image, k, other) = interrupted_replace(dir.path(), 9);
    let s = reopen(image, dir.path());
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(2, &k, 30_000)[..]);
    delete_and_rebuild(s, k, other, dir.path());
}

/// A rebuild writes nothing on the volume but, last, the superblock: the older generations
/// it finds go into the new index as retiring records, zeroed at its first start. It used to
/// zero them before the old index moved aside, so that a rebuild stopped in between (a crash,
/// a failed rename) left the old index in use with shares it named destroyed. Here every
/// write fails: the rebuild fails at the superblock with the volume untouched, and a rebuild
/// on a disk that works again (within the same second: the old index goes aside under a name
/// of its own) finds everything there was.
#[test]
fn a_rebuild_that_fails_has_zeroed_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (image, k, other) = interrupted_replace(dir.path(), 12);
    let v = MemVolume::from_image("mem-vol", image.clone(), A);
    v.fail_writes_after(0);
    Store::rebuild_index(&v, dir.path()).expect_err("a rebuild whose superblock write failed");
    assert!(v.image() == image, "the failed rebuild wrote on the volume");
    v.fail_writes_after(u64::MAX);
    let r = Store::rebuild_index(&v, dir.path()).unwrap();
    assert_eq!((r.shares, r.superseded), (2, 1));
    // Still nothing zeroed: a rebuild again finds the older generation too.
    let r = Store::rebuild_index(&v, dir.path()).unwrap();
    assert_eq!((r.shares, r.superseded), (2, 1), "a rebuild zeroed a share");
    let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(2, &k, 30_000)[..]);
    delete_and_rebuild(s, k, other, dir.path());
}

/// A put refused after its bytes landed (its write reported a failure, and zeroing its
/// header failed too) is recorded as retiring by the index. A rebuild with that index there
/// does not bring it back over the acknowledged share it was to replace, although its
/// generation is newer; the next start zeroes it.
#[test]
fn a_rebuild_does_not_bring_back_a_share_its_index_was_retiring() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(15, 1, 0);
    s.put(k, META, &share_bytes(1, &k, 30_000)).unwrap();
    // The replace's write lands whole but reports a failure; zeroing its header then fails.
    s.device().fail_writes_after(1);
    s.device().tear_next_write(usize::MAX);
    s.put(k, META, &share_bytes(2, &k, 30_000))
        .expect_err("a put whose write failed");
    let image = s.device().image();
    drop(s);
    let v = MemVolume::from_image("mem-vol", image, A);
    let r = Store::rebuild_index(&v, dir.path()).unwrap();
    assert_eq!((r.shares, r.superseded), (1, 1));
    let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(
        s.get(&k).unwrap().bytes(),
        &share_bytes(1, &k, 30_000)[..],
        "the refused put came back"
    );
    // Its header is zeroed now: a rebuild without any index finds only the acknowledged one.
    let image = s.device().image();
    drop(s);
    let (shares, superseded, s) = rebuilt(image, dir.path());
    assert_eq!((shares, superseded), (1, 0));
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(1, &k, 30_000)[..]);
}

/// The index lost right after an interrupted replace: the rebuild indexes the newer
/// generation and tombstones the older.
#[test]
fn a_rebuild_tombstones_the_older_generations_it_finds() {
    let dir = tempfile::tempdir().unwrap();
    let (image, k, other) = interrupted_replace(dir.path(), 10);
    let (shares, superseded, s) = rebuilt(image, dir.path());
    assert_eq!((shares, superseded), (2, 1));
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(2, &k, 30_000)[..]);
    delete_and_rebuild(s, k, other, dir.path());
}

/// An index entry whose share length does not fit its extent (a damaged index) stops the
/// open, naming the share, instead of sizing a later read by it.
#[test]
fn an_index_entry_whose_length_does_not_fit_its_extent_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(9, 0, 1);
    s.put(k, META, &share_bytes(9, &k, 5000)).unwrap();
    let image = s.device().image();
    drop(s);
    {
        let db = sled::open(dir.path().join("index")).unwrap();
        let shares = db.open_tree("shares").unwrap();
        let mut e = IndexEntry::decode(&shares.get(k.encode()).unwrap().unwrap()).unwrap();
        e.share_len = 1 << 40;
        shares.insert(k.encode(), &e.encode()[..]).unwrap();
        db.flush().unwrap();
    }
    let e = Store::open(
        MemVolume::from_image("mem-vol", image, A),
        dir.path(),
        StoreOptions::default(),
    )
    .err()
    .expect("a damaged entry");
    let msg = e.to_string();
    assert!(
        matches!(e, StoreError::CorruptIndex { .. })
            && msg.contains(&k.to_string())
            && msg.contains("1099511627776"),
        "{msg}"
    );
}

/// A replaced extent whose tombstone a start could not finish stays reserved until its record
/// goes: new shares never land on it, so deleting its key (which finishes that tombstone)
/// cannot zero or free space that belongs to another acknowledged share.
#[test]
fn a_replaced_extent_kept_at_a_start_is_not_handed_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let (image, k, other) = interrupted_replace(dir.path(), 13);
    let v = MemVolume::from_image("mem-vol", image, A);
    // Models a read of the old header failing at the start: the record is kept.
    v.fail_writes_after(0);
    let s = Store::open(v, dir.path(), StoreOptions::default()).expect("opens");
    s.device().fail_writes_after(u64::MAX);
    let mut stored = vec![];
    loop {
        let j = key(14, stored.len() as u64, 0);
        match s.put(j, META, &share_bytes(3, &j, 30_000)) {
            Ok(()) => stored.push(j),
            Err(StoreError::VolumeFull { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(stored.len() > 100, "{} shares fitted", stored.len());
    s.delete(&k).unwrap();
    for j in stored.iter().chain([&other]) {
        let seed = if *j == other { 1 } else { 3 };
        let len = if *j == other { 20_000 } else { 30_000 };
        assert_eq!(
            s.get(j).unwrap_or_else(|e| panic!("{j}: {e}")).bytes(),
            &share_bytes(seed, j, len)[..]
        );
    }
    assert!(s.scrub().unwrap().damaged.is_empty());
    // The space the delete gave back is whole and usable once, and the index still opens.
    let j = key(15, 0, 0);
    s.put(j, META, &share_bytes(4, &j, 30_000)).unwrap();
    let image = s.device().image();
    drop(s);
    let s = reopen(image, dir.path());
    assert!(s.scrub().unwrap().damaged.is_empty());
}

/// The zeroing of a replaced share's header that failed is finished at the next start; a
/// start whose volume refuses that write still opens (the record waits for the one after),
/// instead of keeping the whole site down over a share already superseded.
#[test]
fn a_start_that_cannot_finish_a_replaced_shares_tombstone_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    let k = key(11, 0, 2);
    s.put(k, META, &share_bytes(1, &k, 9000)).unwrap();
    // The new share's write goes through; the old header's zeroing after it fails.
    s.device().fail_writes_after(1);
    s.put(k, META, &share_bytes(2, &k, 9000))
        .expect("the put stands: its share is durable and indexed");
    let image = s.device().image();
    drop(s);
    let v = MemVolume::from_image("mem-vol", image, A);
    v.fail_writes_after(0);
    let s = Store::open(v, dir.path(), StoreOptions::default())
        .expect("a start with the tombstone still failing");
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(2, &k, 9000)[..]);
    let image = s.device().image();
    drop(s);
    let s = reopen(image, dir.path());
    assert_eq!(s.get(&k).unwrap().bytes(), &share_bytes(2, &k, 9000)[..]);
    assert!(s.scrub().unwrap().damaged.is_empty());
}

/// An allocation unit a rebuild could not read in single requests is refused at format.
#[test]
fn format_refuses_an_allocation_unit_past_the_largest() {
    use qgenome_mountd::store::MAX_ALLOC_UNIT;
    let v = MemVolume::new("mem-vol", 16 << 20, A);
    let opts = |au| FormatOptions {
        alloc_unit: Some(au),
    };
    let e = Store::format(&v, "s", &opts(2 << 30))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("allocation unit") && e.contains("mem-vol"),
        "{e}"
    );
    let e = Store::format(&v, "s", &opts(MAX_ALLOC_UNIT * 2))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("allocation unit") && e.contains(&format!("at most {MAX_ALLOC_UNIT}")),
        "{e}"
    );
    Store::format(&v, "s", &opts(1 << 20)).unwrap();
}

/// A scrub whose volume stops answering (the io_uring thread gone) fails, naming the
/// volume, rather than reporting every share after as damaged.
#[test]
fn a_scrub_stops_at_a_volume_that_stops_rather_than_report_whole_shares_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(fresh(16 << 20), dir.path(), StoreOptions::default()).unwrap();
    for c in 0..6 {
        let k = key(5, c, 0);
        s.put(k, META, &share_bytes(5, &k, 10_000)).unwrap();
    }
    assert!(s.scrub().unwrap().damaged.is_empty());
    s.device().stop_after_reads(3);
    let e = s.scrub().expect_err("a scrub past a stopped volume");
    assert!(e.to_string().contains("mem-vol"), "{e}");
}
