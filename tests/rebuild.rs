//! `Engine::rebuild_catalog` against in-memory sites: a lost catalog comes back from the
//! sites' listings and the secret-shared manifests, files read back byte-identical.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qgenome::catalog::merkle::hex;
use qgenome::catalog::{Catalog, FileRecord};
use qgenome::consent::ConsentRegistry;
use qgenome::fs::{Engine, EngineConfig, EngineError, RebuildReport};
use qgenome::sharing::{Drbg, RandomSource};
use qgenome::sites::{MemSite, ShareKey, ShareMeta, SharePage, ShareSite, SiteError};

/// A MemSite whose deletes can be lost (a site that was down when a version was deleted).
struct LossySite {
    inner: MemSite,
    lose_deletes: AtomicBool,
    /// Listings asked for.
    lists: std::sync::atomic::AtomicUsize,
    /// Called at each listing (to look at the catalog while a rebuild runs).
    on_list: std::sync::Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl ShareSite for LossySite {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn put(&self, key: &ShareKey, meta: &ShareMeta, data: &[u8]) -> Result<(), SiteError> {
        self.inner.put(key, meta, data)
    }
    fn get(&self, key: &ShareKey) -> Result<Vec<u8>, SiteError> {
        self.inner.get(key)
    }
    fn delete(&self, key: &ShareKey) -> Result<(), SiteError> {
        if self.lose_deletes.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.delete(key)
    }
    fn list_shares(&self, after: Option<ShareKey>) -> Result<SharePage, SiteError> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        if let Some(f) = &*self.on_list.lock().unwrap() {
            f();
        }
        self.inner.list_shares(after)
    }
}

struct Rig {
    dir: tempfile::TempDir,
    sites: Vec<Arc<LossySite>>,
}

const CHUNK: usize = 64 << 10;

impl Rig {
    fn new() -> Self {
        Rig {
            dir: tempfile::tempdir().unwrap(),
            sites: (0..3)
                .map(|i| {
                    Arc::new(LossySite {
                        inner: MemSite::new(&format!("site{i}")),
                        lose_deletes: AtomicBool::new(false),
                        lists: Default::default(),
                        on_list: Default::default(),
                    })
                })
                .collect(),
        }
    }

    /// An engine over the rig's sites with a fresh catalog named `name`.
    fn engine(&self, name: &str) -> Arc<Engine> {
        let sites = self
            .sites
            .iter()
            .map(|s| s.clone() as Arc<dyn ShareSite>)
            .collect();
        self.engine_over(name, sites)
    }

    /// An engine over `sites` (the rig's, some maybe wrapped) with a fresh catalog `name`.
    fn engine_over(&self, name: &str, sites: Vec<Arc<dyn ShareSite>>) -> Arc<Engine> {
        let catalog = Arc::new(Catalog::open(&self.dir.path().join(name)).unwrap());
        let consent = ConsentRegistry::new(catalog.clone());
        let cfg = EngineConfig {
            k: 2,
            n: 3,
            chunk_size: CHUNK,
            consent_wait: Duration::from_millis(300),
            max_in_flight: 3,
            ..EngineConfig::default()
        };
        Engine::new(catalog, consent, sites, cfg).unwrap()
    }

    fn lose_deletes(&self, lose: bool) {
        for s in &self.sites {
            s.lose_deletes.store(lose, Ordering::SeqCst);
        }
    }
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Drbg::from_os().unwrap().fill(&mut v).unwrap();
    v
}

fn write(engine: &Engine, patient: &str, name: &str, data: &[u8]) -> FileRecord {
    let mut w = engine.create(patient, name, 0o644).unwrap();
    let mut off = 0;
    for piece in data.chunks(50_000) {
        w.write(engine, off as u64, piece).unwrap();
        off += piece.len();
    }
    w.commit(engine).unwrap();
    // A version this one replaced is deleted after the commit, by the discarder.
    assert!(engine.wait_discards(Duration::from_secs(10)));
    engine.catalog.file(patient, name).unwrap().unwrap()
}

fn read_all(engine: &Engine, patient: &str, name: &str) -> Result<Vec<u8>, EngineError> {
    let rec = engine.catalog.file(patient, name)?.expect("committed");
    let chunks = engine.catalog.chunks(&rec.id)?;
    let mut out = Vec::new();
    while (out.len() as u64) < rec.size {
        out.extend(engine.read(&rec, &chunks, out.len() as u64, 100_000)?);
    }
    Ok(out)
}

fn unlink(engine: &Engine, patient: &str, name: &str) {
    let old = engine.catalog.unlink(patient, name).unwrap();
    engine.discard(&old);
}

/// Every committed file of the catalog: (patient, name) -> record.
fn files(engine: &Engine) -> BTreeMap<(String, String), FileRecord> {
    let mut out = BTreeMap::new();
    for p in engine.catalog.patients().unwrap() {
        for f in engine.catalog.files_of(&p).unwrap() {
            out.insert((p.clone(), f.name.clone()), f);
        }
    }
    out
}

fn restored_names(r: &RebuildReport) -> Vec<String> {
    let mut v: Vec<String> = r
        .restored
        .iter()
        .map(|f| format!("{}/{}", f.patient, f.name))
        .collect();
    v.sort();
    v
}

#[test]
fn a_lost_catalog_is_rebuilt_from_the_sites_and_every_file_reads_back() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    a.catalog.add_patient("P2").unwrap();
    let mut want: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    let mut put = |p: &str, n: &str, d: Vec<u8>| want.insert((p.into(), n.into()), d);

    let plain = random(300_001);
    write(&a, "P1", "a.cram", &plain);
    put("P1", "a.cram", plain);
    // Replaced: the second version is the one that comes back.
    write(&a, "P1", "b.cram", &random(100_000));
    let b2 = random(70_000);
    write(&a, "P1", "b.cram", &b2);
    put("P1", "b.cram", b2);
    // Renamed: the new name comes back (moving to another patient is refused).
    let c = random(CHUNK * 2);
    write(&a, "P2", "c.tmp", &c);
    assert!(matches!(
        a.rename("P2", "c.tmp", "P1", "c.cram"),
        Err(EngineError::CrossPatient { .. })
    ));
    a.rename("P2", "c.tmp", "P2", "c.cram").unwrap();
    assert!(
        a.wait_discards(Duration::from_secs(10)),
        "manifest rewritten"
    );
    put("P2", "c.cram", c);
    // Unlinked: gone.
    write(&a, "P2", "d.cram", &random(90_000));
    unlink(&a, "P2", "d.cram");
    // Attributes changed after commit: they come back.
    let f = random(1000);
    let f_rec = write(&a, "P1", "f.cram", &f);
    a.set_attrs(&f_rec.id, Some(0o600), Some(1_234_567))
        .unwrap();
    assert!(
        a.wait_discards(Duration::from_secs(10)),
        "manifest rewritten"
    );
    put("P1", "f.cram", f);
    // Empty file.
    write(&a, "P2", "empty", &[]);
    put("P2", "empty", vec![]);
    // A growing version committed twice (fsync, more appends, close): the second commit's
    // manifest replaced the first.
    let g = random(CHUNK * 3 + 5);
    let mut w = a.create("P2", "g.cram", 0o644).unwrap();
    w.write(&a, 0, &g[..CHUNK + 7]).unwrap();
    w.commit(&a).unwrap();
    w.write(&a, (CHUNK + 7) as u64, &g[CHUNK + 7..]).unwrap();
    w.commit(&a).unwrap();
    put("P2", "g.cram", g);
    // Uncommitted: three chunks at every site, never committed.
    let mut e = a.create("P2", "e.cram", 0o644).unwrap();
    e.write(&a, 0, &random(CHUNK * 3)).unwrap();
    let e_id = e.record().id;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rig.sites.iter().any(|s| {
        let mut n = 0;
        qgenome::sites::list_all(s.as_ref(), |k, _| {
            n += usize::from(k.file == e_id);
            Ok(())
        })
        .unwrap();
        n < 3
    }) {
        assert!(
            Instant::now() < deadline,
            "uncommitted chunks never arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = files(&a);
    assert_eq!(before.len(), want.len());

    // The catalog is lost; a fresh one is rebuilt from the sites.
    let b = rig.engine("catalog-b");
    let report = b.rebuild_catalog().unwrap();
    assert!(
        !b.catalog.rebuild_unfinished().unwrap(),
        "a finished rebuild leaves no mark"
    );
    assert_eq!(
        restored_names(&report),
        want.keys()
            .map(|(p, n)| format!("{p}/{n}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(report.patients, ["P1", "P2"]);
    // Manifests carry no folder modes: rebuilt folders are closed to others until opened.
    let p1 = b.catalog.patient("P1").unwrap().unwrap();
    assert_eq!((p1.owner, p1.mode), (None, Some(0o700)));
    assert!(report.superseded.is_empty(), "{report:?}");
    assert!(report.unreadable.is_empty(), "{report:?}");
    assert!(report.unreachable_sites.is_empty());
    assert_eq!(report.uncommitted.len(), 1, "{report:?}");
    assert_eq!(report.uncommitted[0].id, hex(&e_id));
    assert_eq!(report.uncommitted[0].shares, 9);
    assert!(report.restored.iter().all(|f| f.degraded_chunks == 0));

    // Same ids, names, sizes, attributes, roots and chunk records as before.
    let after = files(&b);
    assert_eq!(after, before);
    for rec in after.values() {
        assert_eq!(
            b.catalog.chunks(&rec.id).unwrap(),
            a.catalog.chunks(&rec.id).unwrap(),
            "{}",
            rec.name
        );
    }
    let f_back = &after[&("P1".to_string(), "f.cram".to_string())];
    assert_eq!((f_back.mode, f_back.mtime), (0o600, 1_234_567));
    assert!(b.catalog.file("P2", "d.cram").unwrap().is_none());
    assert!(b.catalog.file("P2", "e.cram").unwrap().is_none());
    assert!(b.catalog.file("P1", "c.tmp").unwrap().is_none());

    // Reads need consent as ever, then give the bytes written.
    assert!(matches!(
        read_all(&b, "P1", "a.cram"),
        Err(EngineError::Consent(_))
    ));
    b.consent.grant("P1", Some(Duration::from_secs(60)), "test");
    b.consent.grant("P2", Some(Duration::from_secs(60)), "test");
    for ((p, n), data) in &want {
        assert_eq!(&read_all(&b, p, n).unwrap(), data, "{p}/{n}");
    }

    // A rebuild refuses a catalog that is not empty.
    assert!(matches!(
        b.rebuild_catalog(),
        Err(EngineError::CatalogNotEmpty { .. })
    ));

    // Life goes on after a rebuild: a new version written now wins the next rebuild.
    let a2 = random(5000);
    write(&b, "P1", "a.cram", &a2);
    let c3 = rig.engine("catalog-c");
    let again = c3.rebuild_catalog().unwrap();
    assert!(again.superseded.is_empty(), "{again:?}");
    c3.consent
        .grant("P1", Some(Duration::from_secs(60)), "test");
    assert_eq!(read_all(&c3, "P1", "a.cram").unwrap(), a2);
    drop(e);
}

#[test]
fn when_deletes_were_lost_the_last_written_version_wins_and_the_rest_are_orphans() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    let v1 = write(&a, "P1", "x", &random(10_000));
    let t = random(20_000);
    let v2 = write(&a, "P1", "t", &t);
    rig.lose_deletes(true);
    // v3 replaces v1 (v1's shares stay), then t is renamed over x (v3's shares stay): v2 was
    // committed before v3 and has the older mtime, but its rename is the latest event.
    let v3 = write(&a, "P1", "x", &random(30_000));
    assert!(v3.mtime >= v2.mtime);
    a.rename("P1", "t", "P1", "x").unwrap();
    // The deletes of v1 and v3 (run after the commit and the rename) are lost too.
    assert!(a.wait_discards(Duration::from_secs(10)));
    rig.lose_deletes(false);

    let b = rig.engine("catalog-b");
    let report = b.rebuild_catalog().unwrap();
    assert_eq!(restored_names(&report), ["P1/x"]);
    let mut superseded: Vec<&str> = report.superseded.iter().map(|o| o.id.as_str()).collect();
    superseded.sort();
    let mut want = vec![hex(&v1.id), hex(&v3.id)];
    want.sort();
    assert_eq!(superseded, want);
    assert!(report
        .superseded
        .iter()
        .all(|o| o.file.as_deref() == Some("P1/x")));
    b.consent.grant("P1", Some(Duration::from_secs(60)), "test");
    assert_eq!(read_all(&b, "P1", "x").unwrap(), t);
    assert_eq!(b.catalog.file("P1", "x").unwrap().unwrap().id, v2.id);

    // Deleting the orphans leaves only the live version at the sites.
    let deleted = b.delete_orphans(&report.superseded);
    assert_eq!(
        deleted,
        report.superseded.iter().map(|o| o.shares).sum::<usize>()
    );
    let c = rig.engine("catalog-c");
    let again = c.rebuild_catalog().unwrap();
    assert!(again.superseded.is_empty(), "{again:?}");
    assert_eq!(restored_names(&again), ["P1/x"]);
}

#[test]
fn a_manifest_rewrite_cut_short_or_a_lying_site_still_rebuilds_a_consistent_manifest() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    let data = random(150_000);
    write(&a, "P1", "old", &data);
    // The rename's manifest rewrite reaches sites 0 and 1 only: any k=2 of them is the new
    // manifest; mixed subsets fail the manifest checksum and are passed over.
    rig.sites[2].inner.set_down(true);
    a.rename("P1", "old", "P1", "new").unwrap();
    assert!(
        a.wait_discards(Duration::from_secs(10)),
        "manifest rewritten"
    );
    rig.sites[2].inner.set_down(false);
    let b = rig.engine("catalog-b");
    let report = b.rebuild_catalog().unwrap();
    assert_eq!(restored_names(&report), ["P1/new"]);

    // An attribute change with every site up makes the manifests agree again.
    let id = a.catalog.file("P1", "new").unwrap().unwrap().id;
    a.set_attrs(&id, Some(0o640), None).unwrap();
    assert!(
        a.wait_discards(Duration::from_secs(10)),
        "manifest rewritten"
    );
    // Reaching a single site, the rewrite cannot be rebuilt: the previous name comes back.
    rig.sites[1].inner.set_down(true);
    rig.sites[2].inner.set_down(true);
    a.rename("P1", "new", "P1", "newer").unwrap();
    assert!(
        a.wait_discards(Duration::from_secs(10)),
        "manifest rewritten"
    );
    rig.sites[1].inner.set_down(false);
    rig.sites[2].inner.set_down(false);
    let c = rig.engine("catalog-c");
    assert_eq!(restored_names(&c.rebuild_catalog().unwrap()), ["P1/new"]);

    // A site serving damaged shares: the other k still rebuild the manifest.
    rig.sites[0].inner.set_corrupt(true);
    let d = rig.engine("catalog-d");
    let report = d.rebuild_catalog().unwrap();
    assert_eq!(restored_names(&report), ["P1/new"]);
    rig.sites[0].inner.set_corrupt(false);
    d.consent.grant("P1", Some(Duration::from_secs(60)), "test");
    assert_eq!(read_all(&d, "P1", "new").unwrap(), data);
}

/// A rename (or chmod) of a file committed by an fsync and still being written rewrites the
/// manifest of the committed version only: a rebuild restores it at its committed size.
#[test]
fn a_manifest_rewritten_while_the_file_grows_describes_the_committed_version() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    let data = random(150_000 + 140_000);
    let mut w = a.create("P1", "grows", 0o644).unwrap();
    w.write(&a, 0, &data[..150_000]).unwrap();
    w.commit(&a).unwrap();
    // Two more whole chunks, uploaded and recorded, not committed.
    w.write(&a, 150_000, &data[150_000..]).unwrap();
    w.wait_in_flight(&a).unwrap();
    let id = w.id();
    assert!(
        a.catalog.chunks(&id).unwrap().len() > 3,
        "appended chunks recorded"
    );
    a.rename("P1", "grows", "P1", "renamed").unwrap();
    a.set_attrs(&id, Some(0o600), None).unwrap();
    assert!(
        a.wait_discards(Duration::from_secs(10)),
        "manifest rewritten"
    );
    let b = rig.engine("catalog-b");
    let report = b.rebuild_catalog().unwrap();
    assert_eq!(restored_names(&report), ["P1/renamed"], "{report:?}");
    let rec = b.catalog.file("P1", "renamed").unwrap().unwrap();
    assert_eq!((rec.size, rec.mode), (150_000, 0o600));
    b.consent.grant("P1", Some(Duration::from_secs(60)), "test");
    assert_eq!(read_all(&b, "P1", "renamed").unwrap(), &data[..150_000]);
    w.abort(&a);
}

/// A version deleted while a site is down stays in the catalog, retired, and the next
/// recovery deletes its shares there once the site is back (they were left for good before).
#[test]
fn shares_a_down_site_kept_at_a_delete_go_at_the_next_recovery() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    // Committed by an fsync, then grown by two chunks and abandoned.
    let data = random(290_000);
    let mut w = a.create("P1", "f", 0o644).unwrap();
    w.write(&a, 0, &data[..150_000]).unwrap();
    w.commit(&a).unwrap();
    w.write(&a, 150_000, &data[150_000..]).unwrap();
    w.abort(&a);
    // And two more files, one chunk each.
    write(&a, "P1", "g", &data[..1000]);
    write(&a, "P1", "h", &data[..1000]);
    rig.sites[2].inner.set_down(true);
    for f in ["f", "g", "h"] {
        unlink(&a, "P1", f);
    }
    assert!(rig.sites[..2].iter().all(|s| s.inner.is_empty()));
    assert_eq!(a.catalog.retired().unwrap().len(), 3, "still retired");
    // A recovery while the site is still down asks it once, not once per version.
    let lists = rig.sites[2].lists.load(Ordering::SeqCst);
    assert_eq!(a.recover().unwrap(), 3);
    assert_eq!(rig.sites[2].lists.load(Ordering::SeqCst), lists + 1);
    rig.sites[2].inner.set_down(false);
    assert_eq!(
        rig.sites[2].inner.len(),
        5 + 1 + 2 * (1 + 1),
        "f's five chunks, g's and h's one, and three manifests"
    );
    assert_eq!(a.recover().unwrap(), 3);
    assert!(rig.sites.iter().all(|s| s.inner.is_empty()));
    assert!(a.catalog.retired().unwrap().is_empty());
}

#[test]
fn a_site_down_during_the_rebuild_is_reported_and_files_stay_readable() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    let data = random(CHUNK * 2 + 1);
    write(&a, "P1", "a.cram", &data);
    rig.sites[1].inner.set_down(true);
    let b = rig.engine("catalog-b");
    let report = b.rebuild_catalog().unwrap();
    assert_eq!(report.unreachable_sites.len(), 1);
    assert!(report.unreachable_sites[0].starts_with("site1:"));
    assert_eq!(restored_names(&report), ["P1/a.cram"]);
    assert_eq!(report.restored[0].degraded_chunks, 3);
    let rec = b.catalog.file("P1", "a.cram").unwrap().unwrap();
    for c in b.catalog.chunks(&rec.id).unwrap() {
        let sites: Vec<&str> = c.shares.iter().map(|s| s.site.as_str()).collect();
        assert_eq!(sites, ["site0", "site2"]);
    }
    b.consent.grant("P1", Some(Duration::from_secs(60)), "test");
    assert_eq!(read_all(&b, "P1", "a.cram").unwrap(), data);

    // With two of three sites down nothing can be rebuilt, and the report says why.
    rig.sites[2].inner.set_down(true);
    let c = rig.engine("catalog-c");
    let report = c.rebuild_catalog().unwrap();
    assert!(report.restored.is_empty());
    assert_eq!(report.unreadable.len(), 1, "{report:?}");
    assert!(
        report.unreadable[0].reason.contains("manifest"),
        "{report:?}"
    );
    assert_eq!(report.unreachable_sites.len(), 2);
}

/// One site holding k shares of a version (here: site 2 given site 0's shares too, the others
/// holding none) is what a site forging a file on its own would list. The rebuild must not
/// restore such a version: its chunks would come from that one site alone.
#[test]
fn a_version_whose_k_shares_all_come_from_one_site_is_not_restored() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    let data = random(CHUNK * 2 + 500);
    let rec = write(&a, "P1", "g.cram", &data);
    let of_file = |s: &LossySite| -> Vec<(ShareKey, ShareMeta)> {
        let (page, _) = s.list_shares(None).unwrap();
        page.into_iter().filter(|(k, _)| k.file == rec.id).collect()
    };
    for (key, meta) in of_file(&rig.sites[0]) {
        let d = rig.sites[0].get(&key).unwrap();
        rig.sites[2].put(&key, &meta, &d).unwrap();
        rig.sites[0].delete(&key).unwrap();
    }
    for (key, _) in of_file(&rig.sites[1]) {
        rig.sites[1].delete(&key).unwrap();
    }
    assert!(
        of_file(&rig.sites[2]).len() >= 2 * 4,
        "site 2 holds shares 0 and 2 of each"
    );

    let b = rig.engine("catalog-b");
    let report = b.rebuild_catalog().unwrap();
    assert!(restored_names(&report).is_empty(), "{report:?}");
    assert_eq!(report.unreadable.len(), 1, "{report:?}");
    assert!(b.catalog.file("P1", "g.cram").unwrap().is_none());
}

/// One hostile remote site cannot defeat a rebuild that the home and the other site can do:
/// listing extra manifest shares (so that, capped, the honest site's was never fetched),
/// with a bad one of its own, or claiming the other site's share index for its data shares
/// (so that the honest site's share was never recorded, and every read failed its hash).
#[test]
fn one_hostile_site_cannot_hide_a_file_from_a_rebuild_or_make_it_unreadable() {
    const MANIFEST: u64 = u64::MAX;
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    let data = random(CHUNK * 2 + 500);
    let rec = write(&a, "P1", "h.cram", &data);
    let of_file = |s: &LossySite| -> Vec<(ShareKey, ShareMeta)> {
        let (page, _) = s.list_shares(None).unwrap();
        page.into_iter().filter(|(k, _)| k.file == rec.id).collect()
    };
    let hostile = &rig.sites[1];
    for (key, meta) in of_file(hostile) {
        let d = hostile.get(&key).unwrap();
        hostile.delete(&key).unwrap();
        if key.chunk == MANIFEST {
            // Its own manifest share spoilt, and 15 more listed.
            let junk = vec![0x5a; d.len()];
            hostile.put(&key, &meta, &junk).unwrap();
            for share in 3..18 {
                hostile
                    .put(&ShareKey { share, ..key }, &meta, &junk)
                    .unwrap();
            }
        } else {
            // Its data shares listed under site 2's share index.
            hostile
                .put(&ShareKey { share: 2, ..key }, &meta, &d)
                .unwrap();
        }
    }

    let b = rig.engine("catalog-b");
    let report = b.rebuild_catalog().unwrap();
    assert_eq!(restored_names(&report), ["P1/h.cram"], "{report:?}");
    b.consent.grant("P1", Some(Duration::from_secs(60)), "test");
    assert_eq!(read_all(&b, "P1", "h.cram").unwrap(), data);
}

/// A site (with a valid link key) whose listing never ends: its real shares, then pages of
/// 4096 made-up keys, each page well formed and with a next page, for ever.
struct EndlessSite {
    inner: Arc<LossySite>,
    /// Every made-up key of one file id (chunks 0, 1, ...), else each of a new file id.
    one_file: bool,
    /// What it says of its volume.
    volume: Option<u64>,
    /// Made-up pages listed.
    pages: std::sync::atomic::AtomicU64,
}

/// The made-up file ids: from here up (past every random one, but for a chance of 2^-96).
const MADE_UP: u128 = u128::MAX - (1 << 32);

impl EndlessSite {
    fn made_up(&self, after: Option<ShareKey>) -> SharePage {
        let pages = self.pages.fetch_add(1, Ordering::SeqCst);
        // Past every bound the rebuild should have stopped at (a site of ~130 000 shares of
        // one file, or of 1000 in all): a rebuild still listing would run until memory ends.
        assert!(
            pages < 64,
            "{pages} made-up pages listed: the rebuild never stops"
        );
        let after = after.filter(|a| u128::from_be_bytes(a.file) >= MADE_UP);
        let meta = ShareMeta {
            k: 2,
            n: 3,
            secret_len: 1,
        };
        let keys: Vec<(ShareKey, ShareMeta)> = (0..4096u64)
            .map(|i| {
                let key = if self.one_file {
                    ShareKey {
                        file: MADE_UP.to_be_bytes(),
                        chunk: after.map_or(0, |a| a.chunk + 1) + i,
                        share: 1,
                    }
                } else {
                    let first = after.map_or(MADE_UP, |a| u128::from_be_bytes(a.file) + 1);
                    ShareKey {
                        file: (first + u128::from(i)).to_be_bytes(),
                        chunk: 0,
                        share: 1,
                    }
                };
                (key, meta)
            })
            .collect();
        let next = keys.last().map(|(k, _)| *k);
        (keys, next)
    }
}

impl ShareSite for EndlessSite {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn put(&self, key: &ShareKey, meta: &ShareMeta, data: &[u8]) -> Result<(), SiteError> {
        self.inner.put(key, meta, data)
    }
    fn get(&self, key: &ShareKey) -> Result<Vec<u8>, SiteError> {
        self.inner.get(key)
    }
    fn delete(&self, key: &ShareKey) -> Result<(), SiteError> {
        self.inner.delete(key)
    }
    fn list_shares(&self, after: Option<ShareKey>) -> Result<SharePage, SiteError> {
        if after.is_some_and(|a| u128::from_be_bytes(a.file) >= MADE_UP) {
            return Ok(self.made_up(after));
        }
        let (page, next) = self.inner.list_shares(after)?;
        match (next, page.last()) {
            (Some(_), _) => Ok((page, next)),
            (None, Some((last, _))) => {
                let last = *last;
                Ok((page, Some(last)))
            }
            (None, None) => Ok(self.made_up(None)),
        }
    }
    fn space(&self) -> Option<(u64, u64)> {
        self.volume.map(|v| (v, 0))
    }
}

/// One site that lists for ever (made-up keys, every page well formed) cannot run a rebuild
/// out of memory: its listing is cut at what it could hold (one version's worth of one file
/// id; its volume's worth in all), the site reported with the reason, none of its entries
/// kept, and the files rebuilt from the k honest sites.
#[test]
fn a_site_that_lists_for_ever_is_cut_off_and_the_others_still_rebuild() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    let data = random(CHUNK * 2 + 9);
    write(&a, "P1", "e.cram", &data);
    for (case, one_file, volume, reason) in [
        (
            "one-file",
            true,
            None,
            format!(
                "lists more than 130561 shares of file {}",
                hex(&MADE_UP.to_be_bytes())
            ),
        ),
        (
            "new-files",
            false,
            Some(1000 * 1024),
            "lists more than 1000 shares, more than its volume of 1024000 bytes can hold".into(),
        ),
    ] {
        let endless = Arc::new(EndlessSite {
            inner: rig.sites[1].clone(),
            one_file,
            volume,
            pages: Default::default(),
        });
        let mut sites: Vec<Arc<dyn ShareSite>> = Vec::new();
        for (i, s) in rig.sites.iter().enumerate() {
            sites.push(match i {
                1 => endless.clone(),
                _ => s.clone(),
            });
        }
        let b = rig.engine_over(&format!("catalog-{case}"), sites);
        let report = b.rebuild_catalog().unwrap();
        // (Not the whole report: its made-up versions, if kept, list 100 000s of keys.)
        let sites = &report.unreachable_sites;
        assert_eq!(sites.len(), 1, "{case}: {sites:?}");
        assert!(
            sites[0].starts_with("site1:") && sites[0].contains(&reason),
            "{case}: {sites:?}"
        );
        assert_eq!(restored_names(&report), ["P1/e.cram"], "{case}");
        // None of its entries kept: no made-up version reported, no location at site 1.
        let (uncommitted, unreadable) = (report.uncommitted.len(), report.unreadable.len());
        assert_eq!((uncommitted, unreadable), (0, 0), "{case}: orphans kept");
        let rec = b.catalog.file("P1", "e.cram").unwrap().unwrap();
        for c in b.catalog.chunks(&rec.id).unwrap() {
            let at: Vec<&str> = c.shares.iter().map(|s| s.site.as_str()).collect();
            assert_eq!(at, ["site0", "site2"], "{case}");
        }
        b.consent.grant("P1", Some(Duration::from_secs(60)), "test");
        assert_eq!(read_all(&b, "P1", "e.cram").unwrap(), data, "{case}");
    }
}

/// A rebuild marks its catalog while it runs (the mark is there when the sites are listed)
/// and clears it at the end; a catalog still marked (a rebuild killed half-way) is refused
/// by a mount and by `qgenome catalog rebuild`, naming it.
#[test]
fn a_rebuild_marks_the_catalog_while_it_runs_and_a_marked_one_is_refused() {
    let rig = Rig::new();
    let a = rig.engine("catalog-a");
    a.catalog.add_patient("P1").unwrap();
    write(&a, "P1", "x.cram", &random(CHUNK * 2 + 1));
    let b = rig.engine("catalog-b");
    let seen = Arc::new(AtomicBool::new(false));
    {
        let (catalog, seen) = (b.catalog.clone(), seen.clone());
        *rig.sites[0].on_list.lock().unwrap() = Some(Box::new(move || {
            seen.store(catalog.rebuild_unfinished().unwrap(), Ordering::SeqCst)
        }));
    }
    let report = b.rebuild_catalog().unwrap();
    *rig.sites[0].on_list.lock().unwrap() = None;
    assert_eq!(restored_names(&report), ["P1/x.cram"]);
    assert!(
        seen.load(Ordering::SeqCst),
        "no mark on the catalog while the rebuild listed the sites"
    );
    assert!(!b.catalog.rebuild_unfinished().unwrap(), "mark left behind");

    // A catalog left marked, as a rebuild killed half-way leaves it.
    let state = rig.dir.path().join("state");
    let catalog_dir = state.join("catalog");
    {
        let c = Catalog::open(&catalog_dir).unwrap();
        c.set_rebuilding(true).unwrap();
        c.flush().unwrap();
    }
    let config = rig.dir.path().join("qgenome.toml");
    std::fs::write(
        &config,
        format!(
            "mountpoint = {:?}\nstate_dir = {state:?}\n[scheme]\nk = 2\nn = 3\n\
             [[site]]\nname = \"site0\"\nsocket = \"/nonexistent/h.sock\"\n\
             [[site]]\nname = \"site1\"\naddress = \"127.0.0.1:9\"\nlink = \"l1\"\nkeys = \"/nonexistent\"\nend = \"a\"\n\
             [[site]]\nname = \"site2\"\naddress = \"127.0.0.1:10\"\nlink = \"l2\"\nkeys = \"/nonexistent\"\nend = \"a\"\n",
            rig.dir.path().join("mnt"),
        ),
    )
    .unwrap();
    let cfg = qgenome::config::HomeConfig::load(&config).unwrap();
    let sites = rig
        .sites
        .iter()
        .map(|s| s.clone() as Arc<dyn ShareSite>)
        .collect();
    let mnt = rig.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let e = match qgenome::fs::mount::start(&cfg, &mnt, sites, vec![]) {
        Ok(_) => panic!("a catalog whose rebuild did not finish was mounted"),
        Err(e) => format!("{e:#}"),
    };
    let named = catalog_dir.display().to_string();
    assert!(e.contains("did not finish") && e.contains(&named), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qgenome"))
        .args(["catalog", "rebuild", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("did not finish") && err.contains(&named),
        "{err}"
    );
}
