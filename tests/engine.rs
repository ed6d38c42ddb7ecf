//! The data path against in-memory sites: write, consent-gated read, routing around faults.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qgenome::catalog::Catalog;
use qgenome::consent::ConsentRegistry;
use qgenome::fs::{Engine, EngineConfig, EngineError};
use qgenome::sharing::{Drbg, RandomSource};
use qgenome::sites::{MemSite, ShareKey, ShareMeta, SharePage, ShareSite, SiteError};

struct Rig {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    sites: Vec<Arc<MemSite>>,
}

fn rig(k: usize, n: usize) -> Rig {
    rig_with(k, n, |_| {})
}

/// [`rig`] with its configuration changed by `tweak`.
fn rig_with(k: usize, n: usize, tweak: impl FnOnce(&mut EngineConfig)) -> Rig {
    let sites: Vec<Arc<MemSite>> = (0..n)
        .map(|i| Arc::new(MemSite::new(&format!("site{i}"))))
        .collect();
    let (dir, engine) = engine_with(k, as_dyn(&sites), tweak);
    Rig {
        _dir: dir,
        engine,
        sites,
    }
}

/// In-memory sites as the engine takes them.
fn as_dyn(sites: &[Arc<MemSite>]) -> Vec<Arc<dyn ShareSite>> {
    sites
        .iter()
        .map(|s| s.clone() as Arc<dyn ShareSite>)
        .collect()
}

/// An engine with a fresh catalog (in the returned directory) over `sites`, the first the
/// home site, with patient P0001.
fn engine_over(k: usize, sites: Vec<Arc<dyn ShareSite>>) -> (tempfile::TempDir, Arc<Engine>) {
    engine_with(k, sites, |_| {})
}

/// [`engine_over`] with its configuration changed by `tweak`.
fn engine_with(
    k: usize,
    sites: Vec<Arc<dyn ShareSite>>,
    tweak: impl FnOnce(&mut EngineConfig),
) -> (tempfile::TempDir, Arc<Engine>) {
    let (dir, engine) = empty_engine_with(k, sites, tweak);
    engine.catalog.add_patient("P0001").unwrap();
    (dir, engine)
}

/// An engine with an empty catalog over `sites` (for a catalog rebuild).
fn empty_engine(k: usize, sites: Vec<Arc<dyn ShareSite>>) -> (tempfile::TempDir, Arc<Engine>) {
    empty_engine_with(k, sites, |_| {})
}

fn empty_engine_with(
    k: usize,
    sites: Vec<Arc<dyn ShareSite>>,
    tweak: impl FnOnce(&mut EngineConfig),
) -> (tempfile::TempDir, Arc<Engine>) {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Arc::new(Catalog::open(&dir.path().join("catalog")).unwrap());
    let consent = ConsentRegistry::new(catalog.clone());
    let mut cfg = EngineConfig {
        k,
        n: sites.len(),
        chunk_size: 64 << 10,
        consent_wait: Duration::from_millis(300),
        max_in_flight: 3,
        ..EngineConfig::default()
    };
    tweak(&mut cfg);
    let engine = Engine::new(catalog, consent, sites, cfg).unwrap();
    (dir, engine)
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Drbg::from_os().unwrap().fill(&mut v).unwrap();
    v
}

fn write(engine: &Engine, name: &str, data: &[u8]) -> Result<(), EngineError> {
    let mut w = engine.create("P0001", name, 0o644)?;
    // Uneven request sizes, as pipelines issue them: each 50 000-byte piece whole, or (two
    // pieces in three) a third of it and then the rest.
    let mut off = 0;
    for (i, piece) in data.chunks(50_000).enumerate() {
        let cut = if i % 3 == 0 {
            piece.len()
        } else {
            piece.len() / 3
        };
        for part in [&piece[..cut], &piece[cut..]] {
            if !part.is_empty() {
                w.write(engine, off as u64, part)?;
                off += part.len();
            }
        }
    }
    assert_eq!(off, data.len());
    w.commit(engine)?;
    // A version this one replaced is deleted after the commit, by the discarder.
    assert!(engine.wait_discards(Duration::from_secs(10)));
    Ok(())
}

fn read_all(engine: &Engine, name: &str) -> Result<Vec<u8>, EngineError> {
    let rec = engine.catalog.file("P0001", name)?.expect("committed");
    let chunks = engine.catalog.chunks(&rec.id)?;
    let mut out = Vec::new();
    while (out.len() as u64) < rec.size {
        out.extend(engine.read(&rec, &chunks, out.len() as u64, 100_000)?);
    }
    Ok(out)
}

#[test]
fn round_trip_under_consent_and_no_plaintext_at_any_site() {
    let r = rig(2, 3);
    let data = random(300_001);
    write(&r.engine, "a.cram", &data).unwrap();
    let err = read_all(&r.engine, "a.cram").unwrap_err();
    assert!(
        matches!(err, EngineError::Consent(_)),
        "read without consent: {err}"
    );
    r.engine
        .consent
        .grant("P0001", Some(Duration::from_secs(60)), "test");
    assert_eq!(read_all(&r.engine, "a.cram").unwrap(), data);
    for site in &r.sites {
        // 5 data chunks plus the version's manifest (chunk u64::MAX, for catalog rebuild).
        assert_eq!(site.len(), 5 + 1, "one share per chunk per site");
        for share in site.all_bytes() {
            for w in data.chunks_exact(64).step_by(7) {
                assert!(
                    !share.windows(64).any(|x| x == w),
                    "plaintext window found at {}",
                    site.name()
                );
            }
        }
    }
    let rec = r.engine.catalog.file("P0001", "a.cram").unwrap().unwrap();
    assert_eq!(rec.size, 300_001);
    assert!(rec.root.is_some());
}

#[test]
fn reads_route_around_a_down_site_and_a_lying_site() {
    let r = rig(2, 3);
    let data = random(200_000);
    write(&r.engine, "b.cram", &data).unwrap();
    r.engine.consent.grant("P0001", None, "test");
    r.sites[0].set_down(true);
    assert_eq!(read_all(&r.engine, "b.cram").unwrap(), data);
    assert!(r.engine.stats().snapshot()["share_failures"] >= 1);
    r.sites[0].set_down(false);
    // Fresh version so the cache does not answer. Site 0 failed just now, so it is asked
    // last: site 1, asked first, lies (and is asked last once caught).
    write(&r.engine, "c.cram", &data).unwrap();
    r.sites[1].set_corrupt(true);
    assert_eq!(read_all(&r.engine, "c.cram").unwrap(), data);
    assert!(r.engine.stats().snapshot()["bad_rebuilds"] >= 1);
    // The lying site and one good one, the third down: no k shares rebuild the data, and the
    // error names the sites tried.
    write(&r.engine, "d.cram", &data).unwrap();
    r.sites[2].set_down(true);
    let e = read_all(&r.engine, "d.cram").map(|_| ()).unwrap_err();
    assert!(matches!(e, EngineError::Corrupt { .. }), "{e}");
    let msg = e.to_string();
    for site in ["share 0 at site0", "share 1 at site1", "d.cram", "chunk 0"] {
        assert!(msg.contains(site), "{site:?} missing from: {msg}");
    }
}

/// A site that failed a GET is asked only after the others for a while: a site that is down
/// costs one chunk its failure (for a host that is off, its connect timeout), not every chunk.
#[test]
fn a_site_that_failed_is_asked_last_for_the_next_chunks() {
    asked_last_once_failed(|s| s.set_down(true));
}

/// Likewise a site that answers, but with shares of the wrong length (each of which also
/// spends a share's worth of its link's reply key).
#[test]
fn a_site_serving_shares_of_the_wrong_length_is_asked_last_for_the_next_chunks() {
    asked_last_once_failed(|s| s.set_short(true));
}

fn asked_last_once_failed(fail: impl Fn(&MemSite)) {
    let r = rig(2, 3);
    // 20 chunks of 64K.
    let data = random(20 << 16);
    write(&r.engine, "f.cram", &data).unwrap();
    r.engine.consent.grant("P0001", None, "test");
    write(&r.engine, "g.cram", &data).unwrap();
    // The home site is asked first while it answers. Once it failed, only the chunks already
    // being fetched (read-ahead) ask it; the rest, and the next file, do not.
    fail(&r.sites[0]);
    assert_eq!(read_all(&r.engine, "f.cram").unwrap(), data);
    let failures = r.engine.stats().snapshot()["share_failures"];
    assert!(
        (1..10).contains(&failures),
        "{failures} GETs of 20 chunks went to the down site"
    );
    assert_eq!(read_all(&r.engine, "g.cram").unwrap(), data);
    let more = r.engine.stats().snapshot()["share_failures"] - failures;
    assert_eq!(
        more, 0,
        "{more} GETs of the next file went to the down site"
    );
}

#[test]
fn fewer_than_k_sites_gives_an_error_naming_the_file_and_chunk() {
    let r = rig(2, 3);
    write(&r.engine, "d.cram", &random(10_000)).unwrap();
    r.engine.consent.grant("P0001", None, "test");
    r.sites[0].set_down(true);
    r.sites[2].set_down(true);
    let err = read_all(&r.engine, "d.cram").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EngineError::TooFewShares { .. }), "{msg}");
    assert!(
        msg.contains("P0001/d.cram") && msg.contains("chunk 0") && msg.contains("site2"),
        "{msg}"
    );
}

#[test]
fn a_site_down_during_a_write_fails_the_commit_and_nothing_becomes_visible() {
    let r = rig(2, 3);
    write(&r.engine, "e.cram", &random(10_000)).unwrap();
    r.sites[1].set_down(true);
    let err = write(&r.engine, "e.cram", &random(200_000)).unwrap_err();
    assert!(err.to_string().contains("site1"), "{err}");
    let rec = r.engine.catalog.file("P0001", "e.cram").unwrap().unwrap();
    assert_eq!(
        rec.size, 10_000,
        "the failed version replaced the committed one"
    );
}

#[test]
fn writes_must_append() {
    let r = rig(2, 3);
    let mut w = r.engine.create("P0001", "f.cram", 0o644).unwrap();
    w.write(&r.engine, 0, &[1; 100]).unwrap();
    let err = w.write(&r.engine, 50, &[2; 10]).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::NotAppend {
                offset: 50,
                size: 100,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("P0001/f.cram"));
}

/// A file may have only as many chunks as its manifest can list: a write past that fails at
/// once with EFBIG naming the file and the way out, not at the commit after hours of upload,
/// and what was written before it still commits.
#[test]
fn a_write_past_the_most_chunks_a_file_can_have_fails_with_efbig() {
    let sites: Vec<Arc<dyn ShareSite>> = (0..3)
        .map(|i| Arc::new(MemSite::new(&format!("site{i}"))) as Arc<dyn ShareSite>)
        .collect();
    let (_dir, engine) = engine_with(2, sites, |c| c.max_chunks = 3);
    let data = random(3 * (64 << 10));
    let mut w = engine.create("P0001", "big.cram", 0o644).unwrap();
    w.write(&engine, 0, &data[..100]).unwrap();
    w.write(&engine, 100, &data[100..]).unwrap();
    let err = w.write(&engine, data.len() as u64, &[0]).unwrap_err();
    assert!(matches!(err, EngineError::TooLarge { .. }), "{err}");
    assert_eq!(err.errno(), libc::EFBIG);
    let msg = err.to_string();
    assert!(
        msg.contains("P0001/big.cram") && msg.contains("chunk_size") && msg.contains("196608"),
        "{msg}"
    );
    w.commit(&engine).unwrap();
    engine.consent.grant("P0001", None, "test");
    assert_eq!(read_all(&engine, "big.cram").unwrap(), data);
}

#[test]
fn an_unfinished_version_is_discarded_at_recovery() {
    let r = rig(3, 5);
    let mut w = r.engine.create("P0001", "g.cram", 0o644).unwrap();
    w.write(&r.engine, 0, &random(200_000)).unwrap();
    // Simulate a crash: the writer vanishes without commit or abort, once the chunks it
    // handed to the upload workers are at the sites (recovery must not race them).
    w.wait_in_flight(&r.engine).unwrap();
    std::mem::forget(w);
    assert_eq!(r.engine.recover().unwrap(), 1);
    assert!(r.engine.catalog.file("P0001", "g.cram").unwrap().is_none());
    assert!(
        r.sites.iter().all(|s| s.is_empty()),
        "shares of the discarded version remain"
    );
}

/// A version replaced while a reader had it open keeps its shares until that reader closes;
/// if the mount dies first, the next recovery deletes them (nothing names the version).
#[test]
fn a_replaced_version_kept_for_a_reader_is_deleted_by_close_or_recovery() {
    let r = rig(2, 3);
    let shares = |r: &Rig| r.sites.iter().map(|s| s.len()).sum::<usize>();
    for crash in [false, true] {
        write(&r.engine, "h.cram", &random(200_000)).unwrap();
        let old = r.engine.catalog.file("P0001", "h.cram").unwrap().unwrap();
        r.engine.reader_opened(&old.id);
        write(&r.engine, "h.tmp", &random(1000)).unwrap();
        r.engine
            .rename("P0001", "h.tmp", "P0001", "h.cram")
            .unwrap();
        // Old: 4 chunks and a manifest; new: 1 chunk and a manifest; 3 shares each.
        assert_eq!(shares(&r), 3 * (5 + 2), "the old version went while read");
        if crash {
            assert_eq!(r.engine.recover().unwrap(), 1);
        } else {
            r.engine.reader_closed(&old.id);
            // Deleted after the close, by the discarder.
            assert!(r.engine.wait_discards(Duration::from_secs(10)));
        }
        assert_eq!(shares(&r), 3 * 2, "crash: {crash}");
        r.engine
            .catalog
            .unlink("P0001", "h.cram")
            .map(|v| r.engine.retire(&v))
            .unwrap();
        assert!(r.engine.wait_discards(Duration::from_secs(10)));
        assert_eq!(shares(&r), 0);
    }
}

/// Chunks uploaded while their records were not yet durable (the mount died before the
/// catalog's flush at commit) are found by listing the sites, however far past the last
/// record they go; other versions' shares are left alone.
#[test]
fn recovery_deletes_shares_past_the_last_durable_chunk_record() {
    let r = rig(2, 3);
    let keep = random(100_000);
    write(&r.engine, "keep.cram", &keep).unwrap();
    let kept: Vec<usize> = r.sites.iter().map(|s| s.len()).collect();
    let mut w = r.engine.create("P0001", "u.cram", 0o644).unwrap();
    w.write(&r.engine, 0, &random(200_000)).unwrap();
    // Its uploads at the sites before the writer vanishes, so none lands after recovery.
    w.wait_in_flight(&r.engine).unwrap();
    std::mem::forget(w);
    let id = r.engine.catalog.unfinished().unwrap()[0].id;
    let meta = ShareMeta {
        k: 2,
        n: 3,
        secret_len: 64,
    };
    for (i, site) in r.sites.iter().enumerate() {
        for chunk in 40..50 {
            let key = ShareKey {
                file: id,
                chunk,
                share: i as u8,
            };
            site.put(&key, &meta, &[7; 64]).unwrap();
        }
    }
    assert_eq!(r.engine.recover().unwrap(), 1);
    let left: Vec<usize> = r.sites.iter().map(|s| s.len()).collect();
    assert_eq!(
        left, kept,
        "shares of the dead version remain, or others went"
    );
    r.engine.consent.grant("P0001", None, "test");
    assert_eq!(read_all(&r.engine, "keep.cram").unwrap(), keep);
}

/// A MemSite behind a pretend link: fixed key left each way, a count of the shares fetched
/// from it, and a hook run on every fetch.
struct Metered {
    inner: MemSite,
    to_site: u64,
    replies: u64,
    gets: AtomicUsize,
    on_get: std::sync::Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    on_put: std::sync::Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl Metered {
    fn new(name: &str, to_site: u64, replies: u64) -> Self {
        Self {
            inner: MemSite::new(name),
            to_site,
            replies,
            gets: Default::default(),
            on_get: Default::default(),
            on_put: Default::default(),
        }
    }
}

impl ShareSite for Metered {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn put(&self, key: &ShareKey, meta: &ShareMeta, data: &[u8]) -> Result<(), SiteError> {
        // The hook may panic under the lock: its poison is no concern here.
        if let Some(hook) = self
            .on_put
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook();
        }
        self.inner.put(key, meta, data)
    }
    fn get(&self, key: &ShareKey) -> Result<Vec<u8>, SiteError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if let Some(hook) = self.on_get.lock().unwrap().as_ref() {
            hook();
        }
        self.inner.get(key)
    }
    fn delete(&self, key: &ShareKey) -> Result<(), SiteError> {
        self.inner.delete(key)
    }
    fn list_shares(&self, after: Option<ShareKey>) -> Result<SharePage, SiteError> {
        self.inner.list_shares(after)
    }
    fn key_remaining(&self) -> Option<u64> {
        Some(self.to_site)
    }
    fn reply_key_remaining(&self) -> Option<u64> {
        Some(self.replies)
    }
}

/// A panic in an upload (a thread that could not be spawned for the puts, a site's bug) fails
/// the chunk, named, and the commit says so: unanswered, it left the writer waiting for ever
/// (its close hung, holding the name's lock), and the upload worker gone for good.
#[test]
fn a_panicking_upload_fails_the_commit_instead_of_hanging_it() {
    let panicky = Arc::new(Metered::new("b", 1 << 30, 1 << 30));
    *panicky.on_put.lock().unwrap() = Some(Box::new(|| panic!("a put that panics (test)")));
    let sites: Vec<Arc<dyn ShareSite>> = vec![
        Arc::new(MemSite::new("home")),
        Arc::new(MemSite::new("a")),
        panicky.clone(),
    ];
    let (_dir, engine) = engine_over(2, sites);
    let (tx, rx) = std::sync::mpsc::channel();
    let e = engine.clone();
    std::thread::spawn(move || {
        let _ = tx.send(write(&e, "p.cram", &random(3 * (64 << 10))));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the commit of a file whose upload panicked did not return in 20 s");
    let err = r.expect_err("committed although an upload panicked");
    assert!(
        err.to_string().contains("p.cram") && err.to_string().contains("upload failed"),
        "{err}"
    );
    assert!(engine.catalog.file("P0001", "p.cram").unwrap().is_none());
    // The workers are all still there: a file written once the site behaves commits.
    *panicky.on_put.lock().unwrap_or_else(|e| e.into_inner()) = None;
    for i in 0..8 {
        write(&engine, &format!("ok{i}.cram"), &random(2 * (64 << 10))).unwrap();
    }
}

/// A fetched share spends the key of its site's replies, so reads go to the link with the
/// most of that left, whatever is left the other way.
#[test]
fn reads_prefer_the_link_with_the_most_reply_key_left() {
    let site = |name: &str, to_site, replies| Arc::new(Metered::new(name, to_site, replies));
    let (a, b) = (site("a", 1 << 30, 1 << 10), site("b", 1 << 10, 1 << 30));
    let sites: Vec<Arc<dyn ShareSite>> = vec![Arc::new(MemSite::new("home")), a.clone(), b.clone()];
    let (_dir, engine) = engine_over(2, sites);
    let data = random(10 * (64 << 10));
    write(&engine, "r.cram", &data).unwrap();
    engine.consent.grant("P0001", None, "test");
    assert_eq!(read_all(&engine, "r.cram").unwrap(), data);
    let gets = |s: &Metered| s.gets.load(Ordering::SeqCst);
    assert_eq!(
        gets(&a),
        0,
        "a share fetched over the link with little reply key left"
    );
    assert!(gets(&b) >= 10, "{} shares fetched from b", gets(&b));
}

/// Consent checked when a read starts is not enough: a consent that ends while the chunks are
/// fetched (revoked, card pulled) gets the read EACCES and no data, and leaves nothing cached.
#[test]
fn a_consent_that_ends_during_a_read_returns_no_data() {
    let revoking = Arc::new(Metered::new("b", 1 << 30, 1 << 30));
    // k = n: every read fetches a share from every site, the revoking one included.
    let sites: Vec<Arc<dyn ShareSite>> = vec![
        Arc::new(MemSite::new("home")),
        Arc::new(MemSite::new("a")),
        revoking.clone(),
    ];
    // No readahead: a chunk a readahead worker began fetching under the ended consent and
    // finished once the next grant below was active is rightly kept, and would then be
    // missing from the count of fetches this test makes (seen once under `make test`).
    let (_dir, engine) = engine_with(3, sites, |c| c.readahead = 0);
    let data = random(3 * (64 << 10) + 5);
    write(&engine, "v.cram", &data).unwrap();
    let rec = engine.catalog.file("P0001", "v.cram").unwrap().unwrap();
    let chunks = engine.catalog.chunks(&rec.id).unwrap();
    engine.consent.grant("P0001", None, "test");
    let weak = Arc::downgrade(&engine);
    *revoking.on_get.lock().unwrap() = Some(Box::new(move || {
        if let Some(e) = weak.upgrade() {
            e.consent.end("P0001", "test: revoked mid-read");
        }
    }));
    let err = engine.read(&rec, &chunks, 0, 100_000).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Consent(qgenome::consent::ConsentError::Ended { .. })
        ),
        "{err}"
    );
    assert_eq!(err.errno(), libc::EACCES);
    assert!(err.to_string().contains("P0001"), "{err}");
    // The read spans chunks 0 and 1, and the consent ended during chunk 0's GETs: chunk 1 is
    // not fetched at all (its shares would have gone back to the share pool after the end's
    // wipe, unwiped, and its GETs spent pad for a read that is refused).
    assert_eq!(
        revoking.gets.load(Ordering::SeqCst),
        1,
        "shares fetched after the consent ended"
    );
    // The refusal is in the audit log, with the file.
    let log = engine.catalog.audit_log().unwrap();
    assert!(
        log.iter()
            .any(|e| e.event == "read-refused" && e.file.as_deref() == Some("v.cram")),
        "no read-refused entry: {:?}",
        log.iter().map(|e| &e.event).collect::<Vec<_>>()
    );
    // Nothing was kept: under a new consent the chunks are fetched again.
    *revoking.on_get.lock().unwrap() = None;
    let before = revoking.gets.load(Ordering::SeqCst);
    engine.consent.grant("P0001", None, "test");
    assert_eq!(read_all(&engine, "v.cram").unwrap(), data);
    assert!(
        revoking.gets.load(Ordering::SeqCst) >= before + chunks.len(),
        "a chunk rebuilt after the consent ended was served from the cache"
    );
}

/// A version committed by an fsync and still growing: a reader opened then gets the committed
/// chunks, each at its index, whatever its writer has recorded past them, in whatever order
/// its uploads completed.
#[test]
fn a_reader_of_a_growing_file_gets_its_committed_chunks_only() {
    let r = rig(2, 3);
    let data = random(3 * 65_536);
    let mut w = r.engine.create("P0001", "g.cram", 0o644).unwrap();
    w.write(&r.engine, 0, &data).unwrap();
    w.commit(&r.engine).unwrap();
    let rec = r.engine.catalog.file("P0001", "g.cram").unwrap().unwrap();
    // An append's chunk 5 recorded before its chunks 3 and 4.
    let mut late = r.engine.catalog.chunk(&rec.id, 2).unwrap().unwrap();
    late.offset = 5 * 65_536;
    r.engine.catalog.put_chunk(&rec.id, 5, &late).unwrap();
    assert_eq!(r.engine.catalog.chunks(&rec.id).unwrap().len(), 4);
    let chunks = r.engine.committed_chunks(&rec).unwrap();
    assert_eq!(chunks.len(), 3, "only the committed version's chunks");
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.offset, i as u64 * 65_536, "chunk {i} at its place");
    }
    r.engine
        .consent
        .grant("P0001", Some(Duration::from_secs(60)), "test");
    assert_eq!(
        r.engine.read(&rec, &chunks, 0, data.len() + 10).unwrap(),
        data
    );
}

/// A chunk list altered in the catalog (an offset moved, a hash changed, a chunk gone) is
/// refused when the version is opened, naming the file: a chunk is checked against its own
/// hash only, which says nothing of where it lies in the file.
#[test]
fn a_chunk_list_that_does_not_make_the_version_is_refused_at_open() {
    let r = rig(2, 3);
    let data = random(200_000);
    write(&r.engine, "a.cram", &data).unwrap();
    let cat = &r.engine.catalog;
    let rec = cat.file("P0001", "a.cram").unwrap().unwrap();
    let good = r.engine.committed_chunks(&rec).unwrap();
    assert_eq!(good.len(), 4);
    let altered = |index: u64, change: &dyn Fn(&mut qgenome::catalog::ChunkRecord)| {
        let mut c = good[index as usize].clone();
        change(&mut c);
        cat.put_chunk(&rec.id, index, &c).unwrap();
        let err = r.engine.committed_chunks(&rec).unwrap_err().to_string();
        cat.put_chunk(&rec.id, index, &good[index as usize])
            .unwrap();
        err
    };
    let err = altered(1, &|c| c.offset += 100);
    assert!(
        err.contains("P0001/a.cram") && err.contains("chunk 1 at offset"),
        "{err}"
    );
    let err = altered(2, &|c| c.hash[0] ^= 1);
    assert!(err.contains("Merkle root does not match"), "{err}");
    let err = altered(3, &|c| c.len -= 1);
    assert!(err.contains("size says 200000"), "{err}");
    assert_eq!(r.engine.committed_chunks(&rec).unwrap(), good);
}

/// With n - k >= 2, some shares left out of the rebuild that matched were never tried: only a
/// share that spoils a rebuild with shares known good is blamed, and its site is asked last
/// for the next chunks (not first again, costing every chunk a fetch from all n sites).
#[test]
fn a_damaged_share_is_blamed_on_its_site_alone_and_that_site_is_asked_last() {
    let Rig {
        _dir,
        engine,
        sites,
    } = rig_with(2, 4, |c| c.readahead = 0);
    let data = random(10 << 16);
    write(&engine, "e.cram", &data).unwrap();
    engine.consent.grant("P0001", None, "test");
    sites[1].set_corrupt(true);
    let rec = engine.catalog.file("P0001", "e.cram").unwrap().unwrap();
    let chunks = engine.committed_chunks(&rec).unwrap();
    assert_eq!(engine.read(&rec, &chunks, 0, 1000).unwrap(), data[..1000]);
    let stats = engine.stats().snapshot();
    assert_eq!(stats["bad_rebuilds"], 1);
    assert_eq!(stats["share_failures"], 1, "an honest site blamed");
    assert_eq!(read_all(&engine, "e.cram").unwrap(), data);
    let stats = engine.stats().snapshot();
    assert_eq!(
        (stats["bad_rebuilds"], stats["share_failures"]),
        (1, 1),
        "the damaged site was asked again"
    );
}

/// A version keeps the (k,n) it was written under: after `scheme` changes in the
/// configuration (a fourth site added), files written before still read, with their own
/// scheme; a rename rewrites their manifest under that scheme, so a catalog rebuild restores
/// them by their new name. A rebuild whose configured k is higher does not take them (fewer
/// sites than its threshold could have forged them), and a version placed on a site no longer
/// configured keeps its old manifest (the rename says why).
#[test]
fn files_written_under_another_scheme_stay_readable_and_are_rebuilt_with_it() {
    let sites: Vec<Arc<MemSite>> = (0..4)
        .map(|i| Arc::new(MemSite::new(&format!("site{i}"))))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // An engine over the sites `on`, in that order (share i of a new version on `on[i]`).
    let engine = |catalog: &str, k: usize, on: &[usize]| {
        let n = on.len();
        let catalog = Arc::new(Catalog::open(&dir.path().join(catalog)).unwrap());
        let cfg = EngineConfig {
            k,
            n,
            chunk_size: 64 << 10,
            consent_wait: Duration::from_millis(300),
            ..EngineConfig::default()
        };
        let sites = on
            .iter()
            .map(|&i| sites[i].clone() as Arc<dyn ShareSite>)
            .collect();
        let consent = ConsentRegistry::new(catalog.clone());
        consent.grant("P0001", None, "test");
        Engine::new(catalog, consent, sites, cfg).unwrap()
    };
    let data = random(300_001);
    let three = engine("catalog", 2, &[0, 1, 2]);
    three.catalog.add_patient("P0001").unwrap();
    write(&three, "old.cram", &data).unwrap();
    drop(three);
    let four = engine("catalog", 2, &[0, 1, 2, 3]);
    assert_eq!(read_all(&four, "old.cram").unwrap(), data);
    write(&four, "new.cram", &data).unwrap();
    assert_eq!(read_all(&four, "new.cram").unwrap(), data);
    let stats = four.stats().snapshot();
    assert_eq!((stats["bad_rebuilds"], stats["share_failures"]), (0, 0));
    four.rename("P0001", "old.cram", "P0001", "older.cram")
        .unwrap();
    assert_eq!(read_all(&four, "older.cram").unwrap(), data);
    assert!(four.wait_discards(Duration::from_secs(10)));
    let log = four.catalog.audit_log().unwrap();
    assert!(
        !log.iter().any(|e| e.event == "manifest-stale"),
        "{:?}",
        log.iter().find(|e| e.event == "manifest-stale")
    );
    // The (2,3) version's manifest shares stayed on the first three sites.
    let older = four.catalog.file("P0001", "older.cram").unwrap().unwrap();
    assert_eq!((older.k, older.n), (2, 3));
    let manifest_at = |site: &MemSite, id| {
        let (page, _) = site.list_shares(None).unwrap();
        page.iter()
            .any(|(key, _)| key.file == id && key.chunk == u64::MAX)
    };
    let placed: Vec<bool> = sites.iter().map(|s| manifest_at(s, older.id)).collect();
    assert_eq!(placed, [true, true, true, false]);
    drop(four);

    // The catalog lost: a rebuild under (2,4) restores both, each with its own (k,n).
    let rebuilt = engine("rebuilt", 2, &[0, 1, 2, 3]);
    let report = rebuilt.rebuild_catalog().unwrap();
    let mut names: Vec<_> = report.restored.iter().map(|f| f.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["new.cram", "older.cram"], "{report:?}");
    let kn = |e: &Engine, name| {
        let r = e.catalog.file("P0001", name).unwrap().unwrap();
        (r.k, r.n)
    };
    assert_eq!(kn(&rebuilt, "older.cram"), (2, 3));
    assert_eq!(kn(&rebuilt, "new.cram"), (2, 4));
    for name in ["older.cram", "new.cram"] {
        assert_eq!(read_all(&rebuilt, name).unwrap(), data, "{name}");
    }
    drop(rebuilt);

    // Configured k = 3: versions of k = 2 are not taken, and the report says why.
    let strict = engine("strict", 3, &[0, 1, 2, 3]);
    let report = strict.rebuild_catalog().unwrap();
    assert!(report.restored.is_empty(), "{report:?}");
    assert_eq!(report.unreadable.len(), 2, "{report:?}");
    for u in &report.unreadable {
        assert!(
            u.reason.contains("below the configured k = 3"),
            "{}",
            u.reason
        );
    }
    drop(strict);

    // The fourth site taken out of the configuration: the (2,4) version still reads from
    // three, but a rename cannot put its manifest's fourth share anywhere, and says so.
    let back = engine("rebuilt", 2, &[0, 1, 2]);
    assert_eq!(read_all(&back, "new.cram").unwrap(), data);
    back.rename("P0001", "new.cram", "P0001", "newer.cram")
        .unwrap();
    assert!(back.wait_discards(Duration::from_secs(10)));
    let log = back.catalog.audit_log().unwrap();
    let stale = log
        .iter()
        .find(|e| e.event == "manifest-stale")
        .expect("the rename's manifest refresh says why it was not done");
    assert!(
        stale.detail.contains("(2, 4)") && stale.detail.contains("share 3 on site site3"),
        "{}",
        stale.detail
    );
    drop(back);

    // The same number of sites, another order (site1 taken out, site3 added in its place):
    // the (2,3) version's share 1 is on site1 and its share 2 on site2, so the manifest's
    // share 1 cannot go to site2 (which would then hold two of its shares).
    let moved = engine("rebuilt", 2, &[0, 2, 3]);
    assert_eq!(read_all(&moved, "older.cram").unwrap(), data);
    moved
        .rename("P0001", "older.cram", "P0001", "oldest.cram")
        .unwrap();
    assert!(moved.wait_discards(Duration::from_secs(10)));
    let log = moved.catalog.audit_log().unwrap();
    assert!(
        log.iter().any(|e| e.event == "manifest-stale"
            && e.detail.contains("(2, 3)")
            && e.detail.contains("share 1 on site site1")),
        "{log:?}"
    );
    let (listed, _) = sites[2].list_shares(None).unwrap();
    let older = moved.catalog.file("P0001", "oldest.cram").unwrap().unwrap();
    assert_eq!(
        listed
            .iter()
            .filter(|(key, _)| key.file == older.id && key.chunk == u64::MAX)
            .count(),
        1,
        "site2 holds one manifest share of the version"
    );
}

/// New versions hash each chunk as side-by-side pieces; a version recorded with whole-chunk
/// hashes (written before the pieces) still reads, its hashes still catch a lying site, and
/// the record's `leaf` is what picks the hash: whole-chunk hashes under a record that says
/// pieces rebuild nothing.
#[test]
fn versions_of_either_leaf_hash_read_and_are_checked_by_their_own() {
    use qgenome::catalog::merkle::{self, LeafHash, PIECE};
    // Chunks of four pieces, the last chunk of one and a bit.
    let r = rig_with(2, 3, |c| c.chunk_size = 4 * PIECE);
    let cat = &r.engine.catalog;
    let data = random(8 * PIECE + PIECE + 1000);
    // As a version from before the pieces: the same shares, whole-chunk hashes and their root.
    let as_whole = |name: &str, leaf: LeafHash| {
        write(&r.engine, name, &data).unwrap();
        let mut rec = cat.file("P0001", name).unwrap().unwrap();
        let mut chunks = r.engine.committed_chunks(&rec).unwrap();
        assert_eq!((rec.leaf, chunks.len()), (LeafHash::Pieces, 3));
        for c in &mut chunks {
            let plain = &data[c.offset as usize..][..c.len as usize];
            assert_eq!(c.hash, LeafHash::Pieces.hash(plain));
            c.hash = merkle::chunk_hash(plain);
        }
        let leaves: Vec<_> = chunks.iter().map(|c| c.hash).collect();
        (rec.root, rec.leaf) = (Some(merkle::root(&leaves)), leaf);
        cat.restore(&rec, &chunks).unwrap();
        assert_eq!(cat.file("P0001", name).unwrap().unwrap().leaf, leaf);
    };
    as_whole("whole.cram", LeafHash::Whole);
    r.engine.consent.grant("P0001", None, "test");
    r.sites[1].set_corrupt(true);
    assert_eq!(read_all(&r.engine, "whole.cram").unwrap(), data);
    let stats = r.engine.stats().snapshot();
    assert!(stats["bad_rebuilds"] >= 1, "the lying site was not caught");
    r.sites[1].set_corrupt(false);

    as_whole("mislabelled.cram", LeafHash::Pieces);
    let e = read_all(&r.engine, "mislabelled.cram").unwrap_err();
    assert!(matches!(e, EngineError::Corrupt { .. }), "{e}");
}

/// A manifest rewrite still queued when an unmount stops waiting (a site too slow) is audited:
/// that version's manifests keep its previous name, which a catalog rebuild would restore.
#[test]
fn manifest_rewrites_an_unmount_leaves_are_audited() {
    let r = rig(2, 3);
    write(&r.engine, "m.tmp", &random(1000)).unwrap();
    r.sites[2].set_put_delay(Duration::from_secs(2));
    r.engine
        .rename("P0001", "m.tmp", "P0001", "m.cram")
        .unwrap();
    assert!(!r.engine.wait_discards(Duration::from_millis(100)));
    r.engine.audit_unrefreshed();
    let log = r.engine.catalog.audit_log().unwrap();
    let stale = log
        .iter()
        .find(|e| e.event == "manifest-stale")
        .expect("the rewrite left is audited");
    assert!(
        stale.detail.contains("not rewritten before the unmount"),
        "{}",
        stale.detail
    );
    assert!(r.engine.wait_discards(Duration::from_secs(10)));
}

/// Renames `s.tmp` to `s.cram` with sites 1 and 2 down (the new manifest reaches one site,
/// fewer than k) and waits for its rewrite to fail; the version's id.
fn rename_with_two_sites_down(r: &Rig) -> qgenome::catalog::FileId {
    r.sites[1].set_down(true);
    r.sites[2].set_down(true);
    r.engine
        .rename("P0001", "s.tmp", "P0001", "s.cram")
        .unwrap();
    assert!(r.engine.wait_discards(Duration::from_secs(10)));
    r.engine
        .catalog
        .file("P0001", "s.cram")
        .unwrap()
        .unwrap()
        .id
}

/// A manifest rewrite that fails (sites down at the rename) is recorded in the catalog, and
/// retried by the manifest thread while the mount runs (whenever it has been idle for
/// `manifest_retry`, doubling while the retries fail): once the sites are back, a catalog
/// rebuild finds the name the catalog has, not the one before the rename (which a later
/// file of that name would supersede, and `--delete-orphans` delete). It used to wait for
/// the next mount.
#[test]
fn a_stale_manifest_is_rewritten_while_the_mount_runs_once_its_sites_are_back() {
    let r = rig_with(2, 3, |c| c.manifest_retry = Duration::from_millis(100));
    let data = random(100_000);
    write(&r.engine, "s.tmp", &data).unwrap();
    write(&r.engine, "busy.cram", &data).unwrap();
    let busy = r
        .engine
        .catalog
        .file("P0001", "busy.cram")
        .unwrap()
        .unwrap()
        .id;
    let id = rename_with_two_sites_down(&r);
    // Retried while the sites are down (at 100, 300 and 700 ms): still recorded.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(r.engine.catalog.stale_manifests().unwrap(), [id]);
    r.sites[1].set_down(false);
    r.sites[2].set_down(false);
    // No remount: the manifest thread's next round rewrites it, although other rewrites
    // (a chmod every 50 ms, more often than the wait) keep it from ever being idle that long.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut mode = 0o600;
    while !r.engine.catalog.stale_manifests().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale manifest was not rewritten while the mount ran"
        );
        mode ^= 0o040;
        r.engine.set_attrs(&busy, Some(mode), None).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(r.engine.wait_discards(Duration::from_secs(10)));
    // A catalog lost now is rebuilt with the new name.
    let (_dir, rebuilt) = empty_engine(2, as_dyn(&r.sites));
    let report = rebuilt.rebuild_catalog().unwrap();
    let mut names: Vec<&str> = report.restored.iter().map(|f| f.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["busy.cram", "s.cram"]);
}

/// The same at the next mount: its recovery rewrites what is recorded stale (a catalog
/// rebuild before it would restore the name before the rename).
#[test]
fn a_manifest_whose_rewrite_failed_is_rewritten_at_the_next_recovery() {
    let r = rig(2, 3);
    let data = random(100_000);
    write(&r.engine, "s.tmp", &data).unwrap();
    let id = rename_with_two_sites_down(&r);
    assert_eq!(r.engine.catalog.stale_manifests().unwrap(), [id]);
    // A recovery with the site still down leaves it recorded.
    r.engine.recover().unwrap();
    assert!(r.engine.wait_discards(Duration::from_secs(10)));
    assert_eq!(r.engine.catalog.stale_manifests().unwrap(), [id]);
    r.sites[1].set_down(false);
    r.sites[2].set_down(false);
    // An engine over the sites with an empty catalog, for a rebuild.
    let empty = || empty_engine(2, as_dyn(&r.sites));
    // Before the recovery, a rebuild would restore the name before the rename.
    let (_before_dir, before) = empty();
    let names = |e: &Engine| {
        let report = e.rebuild_catalog().unwrap();
        let names: Vec<String> = report.restored.iter().map(|f| f.name.clone()).collect();
        names
    };
    assert_eq!(names(&before), ["s.tmp"]);
    r.engine.recover().unwrap();
    assert!(r.engine.wait_discards(Duration::from_secs(10)));
    assert!(r.engine.catalog.stale_manifests().unwrap().is_empty());
    let (_after_dir, after) = empty();
    assert_eq!(names(&after), ["s.cram"]);
    after.consent.grant("P0001", None, "test");
    assert_eq!(read_all(&after, "s.cram").unwrap(), data);
}

/// A rename or attribute change records the manifest as stale with the catalog change itself
/// (a crash before its rewrite leaves the record for the next mount), and a rewrite clears
/// only the mark it began under: one finishing while a later change's rewrite is still
/// queued leaves the mark to that one.
#[test]
fn a_manifest_stays_recorded_stale_until_its_last_change_is_rewritten() {
    let r = rig(2, 3);
    write(&r.engine, "q.tmp", &random(1000)).unwrap();
    let id = r.engine.catalog.file("P0001", "q.tmp").unwrap().unwrap().id;
    assert!(r.engine.catalog.stale_manifests().unwrap().is_empty());
    // Manifest share i as site i holds it now.
    let manifest = |i: usize| {
        let key = ShareKey {
            file: id,
            chunk: u64::MAX,
            share: i as u8,
        };
        r.sites[i].get(&key).unwrap()
    };
    let changed = |i: usize, from: &[u8]| {
        let t = std::time::Instant::now();
        while manifest(i) == from {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "site{i}'s manifest never rewritten"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let (first, slow) = (manifest(0), manifest(2));
    // A chmod of a version still being written marks nothing: its commit writes the
    // manifest from the record.
    let mut w = r.engine.create("P0001", "w.cram", 0o644).unwrap();
    w.write(&r.engine, 0, b"being written").unwrap();
    r.engine
        .catalog
        .set_attrs(&w.id(), Some(0o640), None)
        .unwrap();
    assert!(r.engine.catalog.stale_manifests().unwrap().is_empty());
    w.commit(&r.engine).unwrap();
    assert!(r.engine.catalog.stale_manifests().unwrap().is_empty());
    r.sites[2].set_put_delay(Duration::from_millis(1500));
    r.engine.set_attrs(&id, Some(0o600), None).unwrap();
    // Recorded with the change, before any rewrite could have run.
    assert_eq!(r.engine.catalog.stale_manifests().unwrap(), [id]);
    // The attribute change's rewrite has read the record (site0 has its share; site2 is
    // slow); the rename's rewrite is queued behind it.
    changed(0, &first);
    let before = r.engine.catalog.stale_mark(&id).unwrap();
    r.engine
        .rename("P0001", "q.tmp", "P0001", "q.cram")
        .unwrap();
    // The rename marked it anew (the attribute change's rewrite cannot clear this mark).
    assert_ne!(r.engine.catalog.stale_mark(&id).unwrap(), before);
    // The first rewrite done at the slow site too; the rename's takes 1.5 s there.
    changed(2, &slow);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        r.engine.catalog.stale_manifests().unwrap(),
        [id],
        "the first rewrite cleared the mark the rename's still owes"
    );
    r.sites[2].set_put_delay(Duration::ZERO);
    assert!(r.engine.wait_discards(Duration::from_secs(10)));
    assert!(r.engine.catalog.stale_manifests().unwrap().is_empty());
}
