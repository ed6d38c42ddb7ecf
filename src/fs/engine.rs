//! The data path behind the mount, free of FUSE so it can be tested directly.
//!
//! Write: bytes appended to a [`FileWriter`] fill a chunk buffer; each full chunk goes to the
//! upload pool, where a worker hashes it (SHA-256), splits it (k,n) and puts share i on site i,
//! all sites in parallel. At most `max_in_flight` chunks per file are in the pool, so memory is
//! bounded and a slow site slows the writer instead of filling RAM. A version is committed
//! (made visible, flushed) only once every chunk's every share is acknowledged.
//!
//! Read: a chunk is fetched from k sites in [`placement::read_order`], combined, and checked
//! against its hash in the catalog. A site that fails or a share that is damaged is routed
//! around: more shares are fetched and every k-subset tried until one rebuilds the hashed
//! chunk. Rebuilt chunks go to a bounded cache that is wiped when the patient's consent ends.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::catalog::manifest::{self, Manifest, MANIFEST_CHUNK};
use crate::catalog::merkle::{self, Hash, LeafHash};
use crate::catalog::{
    Catalog, CatalogError, ChunkRecord, FileId, FileRecord, FileState, ShareLocation,
};
use crate::consent::{Consent, ConsentError, ConsentRegistry};
use crate::placement;
use crate::sharing::{k_subsets, with_thread_drbg, Scheme, SharingError};
use crate::sites::{ShareKey, ShareMeta, ShareSite, SiteError};

mod rebuild;
pub use rebuild::{OrphanVersion, RebuildReport, RestoredFile};

/// Plaintext in memory, wiped when dropped (one `memset` over the whole capacity, see
/// [`wipe`]; `Zeroizing`'s volatile byte loop cost a tenth of a restore's CPU), and then
/// handed back to the pool it came from, if any.
#[derive(Default)]
pub struct Plain {
    buf: Vec<u8>,
    home: Option<Arc<BufPool>>,
}

impl Plain {
    pub fn new(v: Vec<u8>) -> Self {
        Self { buf: v, home: None }
    }

    /// `len` zero bytes from `pool` (a wiping pool), given back to it wiped when dropped: a
    /// rebuilt chunk costs one `memset` (its wipe), not a second one to zero a fresh buffer
    /// (or the page faults of one).
    fn pooled(pool: &Arc<BufPool>, len: usize) -> Self {
        Self {
            buf: pool.take_zeroed(len),
            home: Some(pool.clone()),
        }
    }
}

impl std::ops::Deref for Plain {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for Plain {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        match self.home.take() {
            // A wiping pool wipes what it is given.
            Some(pool) => pool.give(std::mem::take(&mut self.buf)),
            None => wipe(&mut self.buf),
        }
    }
}

impl std::fmt::Debug for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plain({} bytes)", self.buf.len())
    }
}

/// The bytes of one read: ranges of rebuilt chunks, in order, shared with the chunk cache.
pub struct ReadData {
    parts: Vec<(Arc<Plain>, std::ops::Range<usize>)>,
    /// Held until the reply is sent: the end of the patient's session waits for it.
    _serving: crate::consent::session::Serving,
}

impl ReadData {
    pub fn len(&self) -> usize {
        self.parts.iter().map(|(_, r)| r.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Call `f` with the bytes as one slice: borrowed from the chunk when the read lies in
    /// one chunk (the usual case), else gathered into a buffer that is wiped afterwards.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self.parts.as_slice() {
            [] => f(&[]),
            [(chunk, range)] => f(&chunk[range.clone()]),
            parts => {
                let mut buf = Vec::with_capacity(self.len());
                for (chunk, range) in parts {
                    buf.extend_from_slice(&chunk[range.clone()]);
                }
                let r = f(&buf);
                wipe(&mut buf);
                r
            }
        }
    }
}

impl std::fmt::Debug for ReadData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadData")
            .field("parts", &self.parts.len())
            .field("len", &self.len())
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub k: usize,
    pub n: usize,
    pub chunk_size: usize,
    /// How long a read waits for consent before failing with EACCES.
    pub consent_wait: Duration,
    /// Plaintext cache budget, bytes.
    pub cache_bytes: usize,
    pub upload_workers: usize,
    /// Chunks of one file in the upload pool at once.
    pub max_in_flight: usize,
    /// Chunks fetched ahead of a sequential reader.
    pub readahead: usize,
    /// Most chunks one file can have ([`manifest::MAX_CHUNKS`]: what its manifest can list).
    pub max_chunks: u64,
    /// How long the manifest thread waits, idle, before it retries the manifests recorded
    /// stale (a rename or attribute change whose rewrite a site refused); doubled after each
    /// round that leaves some stale, up to [`MANIFEST_RETRY_MAX`].
    pub manifest_retry: Duration,
}

/// The longest wait between two rounds of stale manifest rewrites.
pub const MANIFEST_RETRY_MAX: Duration = Duration::from_secs(3600);

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            k: 2,
            n: 3,
            chunk_size: 1 << 20,
            consent_wait: Duration::from_secs(300),
            cache_bytes: 256 << 20,
            upload_workers: 4,
            max_in_flight: 8,
            readahead: 4,
            max_chunks: manifest::MAX_CHUNKS,
            manifest_retry: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Sharing(#[from] SharingError),
    #[error(transparent)]
    Consent(#[from] ConsentError),
    #[error("{file}: chunk {chunk}: {reason}")]
    Store {
        file: String,
        chunk: u64,
        reason: String,
        /// A site's volume or a link's key ran out (ENOSPC rather than EIO).
        no_space: bool,
    },
    #[error(
        "{file}: chunk {chunk}: only {good} of the {need} shares needed could be read ({detail})"
    )]
    TooFewShares {
        file: String,
        chunk: u64,
        good: usize,
        need: usize,
        detail: String,
    },
    #[error("{file}: chunk {chunk}: no {k} of the shares rebuild data matching the catalog hash (shares from {sites})")]
    Corrupt {
        file: String,
        chunk: u64,
        k: usize,
        /// The sites whose shares were tried, as "share i at site".
        sites: String,
    },
    #[error("{file}: writes must append: offset {offset} but {size} bytes written so far (rewriting shared data is not supported; write a new file and rename it over)")]
    NotAppend {
        file: String,
        offset: u64,
        size: u64,
    },
    #[error("{file}: larger than the {max} bytes a file can hold ({chunks} chunks of chunk_size {chunk_size}, all one manifest can list); write it under a larger chunk_size")]
    TooLarge {
        file: String,
        max: u64,
        chunks: u64,
        chunk_size: usize,
    },
    #[error("{file}: an earlier chunk failed, the file will not be committed: {reason}")]
    Failed {
        file: String,
        reason: String,
        /// As for [`EngineError::Store`].
        no_space: bool,
    },
    #[error("catalog {path}: not empty; a rebuild only fills an empty catalog")]
    CatalogNotEmpty { path: String },
    #[error("{file}: written with (k,n) = {written:?}, its share i on site i, and the configured sites no longer match where it was placed ({placed}): its manifest cannot be rewritten where its chunks are")]
    OtherScheme {
        file: String,
        written: (u8, u8),
        placed: String,
    },
    #[error("{from} -> {to}: a file cannot move to another patient (reading it there would need only that patient's consent); copy it, which needs its own patient's consent")]
    CrossPatient { from: String, to: String },
}

impl EngineError {
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::Consent(crate::consent::ConsentError::Abandoned { .. }) => libc::EINTR,
            EngineError::Consent(_) => libc::EACCES,
            EngineError::NotAppend { .. } => libc::EINVAL,
            EngineError::TooLarge { .. } => libc::EFBIG,
            // A pipeline told "no space" stops and says so; EIO would read as a broken disk.
            EngineError::Store { no_space: true, .. }
            | EngineError::Failed { no_space: true, .. } => libc::ENOSPC,
            EngineError::CrossPatient { .. } => libc::EXDEV,
            EngineError::Catalog(CatalogError::NoFile { .. } | CatalogError::NoPatient(_)) => {
                libc::ENOENT
            }
            EngineError::Catalog(
                CatalogError::InvalidName(_) | CatalogError::InvalidPatient(_),
            ) => libc::EINVAL,
            EngineError::Catalog(CatalogError::PatientExists(_)) => libc::EEXIST,
            EngineError::Catalog(CatalogError::PatientNotEmpty(_)) => libc::ENOTEMPTY,
            _ => libc::EIO,
        }
    }
}

/// Counters an operator (and the tests) can read through the control socket.
#[derive(Debug, Default)]
pub struct Stats {
    pub chunks_written: AtomicU64,
    pub chunks_read: AtomicU64,
    /// Share fetches that failed (site down, share damaged) and were routed around.
    pub share_failures: AtomicU64,
    /// Chunks whose first k shares did not rebuild the hashed data.
    pub bad_rebuilds: AtomicU64,
    /// Reads that failed for lack of good shares.
    pub failed_reads: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BTreeMap::from([
            ("chunks_written", get(&self.chunks_written)),
            ("chunks_read", get(&self.chunks_read)),
            ("share_failures", get(&self.share_failures)),
            ("bad_rebuilds", get(&self.bad_rebuilds)),
            ("failed_reads", get(&self.failed_reads)),
        ])
    }
}

/// What the upload workers and readers share.
struct Core {
    /// The configured scheme: every new version is split with it.
    scheme: Arc<Scheme>,
    /// Schemes of versions written under another configured `scheme`, built as they are read.
    other_schemes: Mutex<HashMap<(u8, u8), Arc<Scheme>>>,
    sites: Vec<Arc<dyn ShareSite>>,
    by_name: HashMap<String, Arc<dyn ShareSite>>,
    stats: Stats,
    /// Chunk buffers (for writers) and share buffers (uploads and fetches), reused rather than
    /// allocated per chunk: a fresh 1 MiB buffer costs page faults and, freed, a trim. Chunk
    /// buffers (plaintext) are wiped before they go back. Share buffers are not: the next
    /// split or fetch overwrites every byte, and wiping n shares per chunk cost more memory traffic
    /// than the split itself; like all of this process's memory they are locked (never
    /// swapped) and excluded from core dumps.
    chunk_bufs: BufPool,
    share_bufs: BufPool,
    /// Buffers of rebuilt chunks (plaintext, wiped), back from the chunk cache as it drops them.
    read_bufs: Arc<BufPool>,
    /// When each site last failed a GET: such a site is asked last for [`FAILING_FOR`], so a
    /// site that is down costs one chunk its timeout, not every chunk.
    failed_at: Mutex<HashMap<String, Instant>>,
    /// Per site: a STAT of [`Engine::space`] still waiting for it (one that hung past
    /// [`SPACE_WAIT`]); the site is not asked again until it answers or fails.
    space_asking: Vec<std::sync::atomic::AtomicBool>,
}

/// How long [`Engine::space`] waits for the sites; one that has not answered by then counts
/// as down.
pub const SPACE_WAIT: Duration = Duration::from_secs(3);

/// How long a site that failed a GET is asked for shares only after the others.
const FAILING_FOR: Duration = Duration::from_secs(30);

pub(crate) use crate::wipe;

/// Shares of a chunk named with their sites: "share 0 at home, share 2 at cloud".
fn at_sites(chunk: &ChunkRecord, shares: impl IntoIterator<Item = usize>) -> String {
    let names: Vec<String> = shares
        .into_iter()
        .map(|s| {
            let site = chunk
                .shares
                .iter()
                .find(|l| usize::from(l.share) == s)
                .map_or("?", |l| l.site.as_str());
            format!("share {s} at {site}")
        })
        .collect();
    names.join(", ")
}

/// A bounded stack of buffers for reuse: wiped and empty when `wipe`, else as they were left.
struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
    max: usize,
    wipe: bool,
    /// How many times [`BufPool::wipe_all`] ran (changed under `bufs`' lock).
    wipes: AtomicU64,
}

impl BufPool {
    fn new(max: usize, wipe: bool) -> Self {
        Self {
            bufs: Mutex::new(Vec::new()),
            max,
            wipe,
            wipes: AtomicU64::new(0),
        }
    }

    fn pop(&self) -> Vec<u8> {
        self.bufs
            .lock()
            .expect("buffer pool")
            .pop()
            .unwrap_or_default()
    }

    /// A buffer of exactly `len` bytes whose contents are unspecified (zeros, or what the
    /// last user left): for outputs that are overwritten whole. Only newly grown bytes are
    /// written here.
    fn take_len(&self, len: usize) -> Vec<u8> {
        let mut v = self.pop();
        crate::resize_wiped(&mut v, len);
        v
    }

    /// `len` zero bytes. A wiping pool's buffers are zero over their whole capacity, so one
    /// large enough is handed out without writing it again; otherwise a fresh zeroed one.
    fn take_zeroed(&self, len: usize) -> Vec<u8> {
        assert!(self.wipe, "only a wiping pool holds zeroed buffers");
        let mut v = self.pop();
        if v.capacity() < len {
            return vec![0; len];
        }
        // SAFETY: `give` ran `wipe` over this buffer's whole capacity (spare capacity included)
        // before it went into this pool, and nothing has written to it since: the first `len`
        // bytes are initialised, to zero.
        unsafe { v.set_len(len) };
        v
    }

    /// Wipes and frees every buffer the pool holds; buffers out of it now are wiped when
    /// they come back through [`BufPool::give_since`].
    fn wipe_all(&self) {
        let bufs = {
            let mut held = self.bufs.lock().expect("buffer pool");
            self.wipes.fetch_add(1, Ordering::SeqCst);
            std::mem::take(&mut *held)
        };
        for mut b in bufs {
            wipe(&mut b);
        }
    }

    /// A mark to pass to [`BufPool::give_since`] for buffers filled after it.
    fn mark(&self) -> u64 {
        self.wipes.load(Ordering::SeqCst)
    }

    /// [`BufPool::give`], wiping `v` first also if the pool was wiped since `mark`: it was
    /// out then, and what it holds may belong to a consent that has ended. That check is
    /// made under the lock, so no `wipe_all` falls between it and the push.
    fn give_since(&self, mut v: Vec<u8>, mark: u64) {
        if self.wipe {
            wipe(&mut v);
            v.clear();
        }
        let mut bufs = self.bufs.lock().expect("buffer pool");
        if !self.wipe && self.wipes.load(Ordering::SeqCst) != mark {
            wipe(&mut v);
            v.clear();
        }
        if bufs.len() < self.max {
            bufs.push(v);
        } else {
            // Not kept: freed, so wiped first (a share of a chunk read under a consent).
            drop(bufs);
            wipe(&mut v);
        }
    }

    /// An empty buffer with at least `capacity` bytes reserved.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let mut v = self.pop();
        if v.capacity() < capacity {
            // Growing would free the old block unwiped.
            wipe(&mut v);
            return Vec::with_capacity(capacity);
        }
        v.clear();
        v
    }

    /// Keep `v` for reuse (wiped first when the pool wipes), or free it when the pool is full.
    fn give(&self, v: Vec<u8>) {
        self.give_since(v, self.mark());
    }
}

struct UploadJob {
    file: FileId,
    /// How the chunk is hashed: its version's [`FileRecord::leaf`].
    leaf: LeafHash,
    label: String,
    index: u64,
    offset: u64,
    data: Plain,
    done: Sender<(u64, Result<ChunkRecord, EngineError>)>,
}

pub struct Engine {
    pub catalog: Arc<Catalog>,
    pub consent: Arc<ConsentRegistry>,
    cfg: EngineConfig,
    core: Arc<Core>,
    /// Manifest write order: ns since the epoch, strictly increasing (see [`Manifest::seq`]).
    seq: AtomicU64,
    /// Serialise manifest writes of one version (striped by file id).
    manifest_locks: Vec<Mutex<()>>,
    /// Per version open for reading: its read handles, and its record once replaced or
    /// unlinked (its shares are deleted when the last handle closes).
    readers: Mutex<HashMap<FileId, (usize, Option<FileRecord>)>>,
    /// How many of `readers`' holds are FUSE writers'.
    writers_holding: AtomicUsize,
    uploads: Mutex<SyncSender<UploadJob>>,
    prefetch: Mutex<SyncSender<(FileRecord, u64, ChunkRecord)>>,
    cache: Arc<ChunkCache>,
    /// Versions retired in the catalog whose shares the discarder thread deletes
    /// ([`Engine::discard_later`]).
    discards: Mutex<Sender<FileRecord>>,
    /// Versions whose manifest the manifest thread rewrites ([`Engine::refresh_later`]).
    refreshes: Mutex<Sender<FileId>>,
    /// Those queued and not yet rewritten, with how many times each (audited if an unmount
    /// leaves them).
    unrefreshed: Mutex<HashMap<FileId, usize>>,
    /// How many deletions and rewrites are queued or under way, signalled as each is done.
    discarding: (Mutex<usize>, Condvar),
}

/// How long an unmount waits for the shares of retired versions to be deleted
/// ([`Engine::wait_discards`]). What is left then stays retired in the catalog, and the next
/// mount's [`Engine::recover`] deletes it.
pub const DISCARD_WAIT: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn label(rec: &FileRecord) -> String {
    format!("{}/{}", rec.patient, rec.name)
}

impl Engine {
    /// `sites[i]` receives share i; `sites[0]` is the home site.
    pub fn new(
        catalog: Arc<Catalog>,
        consent: Arc<ConsentRegistry>,
        sites: Vec<Arc<dyn ShareSite>>,
        cfg: EngineConfig,
    ) -> Result<Arc<Self>, EngineError> {
        let scheme = Arc::new(Scheme::new(cfg.k, cfg.n)?);
        let seq = catalog.manifest_seq()?;
        if sites.len() != cfg.n {
            return Err(EngineError::Sharing(SharingError::ShareCount {
                expected: cfg.n,
                actual: sites.len(),
            }));
        }
        let by_name = sites
            .iter()
            .map(|s| (s.name().to_string(), s.clone()))
            .collect();
        let space_asking = sites.iter().map(|_| Default::default()).collect();
        let core = Arc::new(Core {
            scheme,
            other_schemes: Mutex::default(),
            sites,
            by_name,
            stats: Stats::default(),
            // Writers hold one chunk each plus up to `max_in_flight` queued; a few files at once.
            chunk_bufs: BufPool::new(cfg.upload_workers + 2 * cfg.max_in_flight, true),
            // Shares being uploaded, and shares fetched for reads (readahead and FUSE readers).
            share_bufs: BufPool::new((cfg.upload_workers + cfg.readahead + 4) * cfg.n, false),
            // Chunks being rebuilt and those just dropped by the cache; beyond that, freed.
            read_bufs: Arc::new(BufPool::new(2 * cfg.readahead + 4, true)),
            failed_at: Mutex::new(HashMap::new()),
            space_asking,
        });
        let (tx, rx) = mpsc::sync_channel::<UploadJob>(cfg.upload_workers);
        let rx = Arc::new(Mutex::new(rx));
        for w in 0..cfg.upload_workers {
            let (core, rx) = (core.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("upload-{w}"))
                .spawn(move || loop {
                    let job = match rx.lock().expect("upload queue").recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    let mut job = job;
                    // A panic (a thread that could not be spawned for the puts) is the chunk's
                    // failure: unanswered, it left the writer waiting for ever under its lock,
                    // and this worker gone from the pool for good.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        core.upload(&job)
                    }))
                    .unwrap_or_else(|_| {
                        Err(EngineError::Store {
                            file: job.label.clone(),
                            chunk: job.index,
                            reason: "its upload failed (panicked; see the log)".into(),
                            no_space: false,
                        })
                    });
                    let _ = job.done.send((job.index, result));
                    // Out of its `Zeroizing` (which would wipe byte by byte) into the pool.
                    core.chunk_bufs.give(std::mem::take(&mut *job.data));
                })
                .expect("spawn upload worker");
        }
        let cache = Arc::new(ChunkCache::new(cfg.cache_bytes));
        let wipe = cache.clone();
        consent.on_end(move |patient| wipe.wipe(patient));
        // Free share buffers keep their last shares (they are not wiped between uses): any k
        // of them rebuild a chunk read under the consent that just ended.
        let shares = core.clone();
        consent.on_end(move |_| shares.share_bufs.wipe_all());

        let (ptx, prx) = mpsc::sync_channel::<(FileRecord, u64, ChunkRecord)>(64);
        let (dtx, drx) = mpsc::channel::<FileRecord>();
        let (rtx, rrx) = mpsc::channel::<FileId>();
        let engine = Arc::new(Self {
            catalog,
            consent,
            cfg,
            core,
            seq: AtomicU64::new(seq),
            manifest_locks: (0..16).map(|_| Mutex::new(())).collect(),
            readers: Mutex::new(HashMap::new()),
            writers_holding: AtomicUsize::new(0),
            uploads: Mutex::new(tx),
            prefetch: Mutex::new(ptx),
            cache,
            discards: Mutex::new(dtx),
            refreshes: Mutex::new(rtx),
            unrefreshed: Mutex::default(),
            discarding: Default::default(),
        });
        let weak = Arc::downgrade(&engine);
        std::thread::Builder::new()
            .name("fs-discard".into())
            .spawn(move || {
                while let Ok(rec) = drx.recv() {
                    let Some(engine) = weak.upgrade() else { return };
                    let deleted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine.discard(&rec)
                    }));
                    if deleted.is_err() {
                        tracing::error!(
                            "{}: deleting its shares failed (a panic); it stays retired and the next mount deletes them",
                            label(&rec)
                        );
                    }
                    engine.discarded();
                }
            })
            .expect("spawn discard thread");
        // Manifest rewrites on a thread of their own: behind a whole genome's deletion on the
        // discarder's, they waited minutes, and an unmount's bounded wait could leave them.
        // Idle, it retries the manifests recorded stale: a rename made while a site was down
        // would otherwise keep its old name at the sites until the next mount, and a catalog
        // lost meanwhile would be rebuilt with it.
        let weak = Arc::downgrade(&engine);
        let retry = engine.cfg.manifest_retry.max(Duration::from_millis(1));
        std::thread::Builder::new()
            .name("fs-manifest".into())
            .spawn(move || {
                // A deadline, not an idle time: rewrites arriving more often than the wait
                // (a pipeline renaming a file every 30 s) must not put the retries off.
                // Checked before each receive, so that a backlog of them does not either.
                let mut wait = retry;
                let mut due = Instant::now() + wait;
                loop {
                    let now = Instant::now();
                    if now >= due {
                        let Some(engine) = weak.upgrade() else { return };
                        wait = match engine.retry_stale_manifests() {
                            0 => retry,
                            _ => (wait * 2).min(MANIFEST_RETRY_MAX),
                        };
                        due = Instant::now() + wait;
                        continue;
                    }
                    match rrx.recv_timeout(due - now) {
                        Ok(id) => {
                            let Some(engine) = weak.upgrade() else { return };
                            engine.refresh_now(&id);
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("spawn manifest thread");
        // Several readahead workers, so that the chunks ahead of a sequential reader are
        // rebuilt in parallel (each waits on k sites, then combines and hashes).
        let prx = Arc::new(Mutex::new(prx));
        for w in 0..engine.cfg.readahead.clamp(1, 4) {
            let (weak, prx) = (Arc::downgrade(&engine), prx.clone());
            std::thread::Builder::new()
                .name(format!("readahead-{w}"))
                .spawn(move || loop {
                    let Ok((rec, index, chunk)) = prx.lock().expect("readahead queue").recv()
                    else {
                        return;
                    };
                    let Some(engine) = weak.upgrade() else { return };
                    if engine.consent.is_active(&rec.patient) && engine.still_read(&rec) {
                        let _ = engine.chunk(&rec, index, &chunk);
                    }
                })
                .expect("spawn readahead thread");
        }
        Ok(engine)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// Start writing a new version of `patient/name`.
    pub fn create(&self, patient: &str, name: &str, mode: u32) -> Result<FileWriter, EngineError> {
        self.create_owned(patient, name, mode, None)
    }

    /// [`Engine::create`] with the new version's owner.
    pub fn create_owned(
        &self,
        patient: &str,
        name: &str,
        mode: u32,
        owner: Option<crate::catalog::Owner>,
    ) -> Result<FileWriter, EngineError> {
        let rec = self.catalog.begin_owned(
            patient,
            name,
            self.cfg.chunk_size as u32,
            self.cfg.k as u8,
            self.cfg.n as u8,
            mode,
            owner,
        )?;
        let (done, results) = mpsc::channel();
        Ok(FileWriter {
            label: label(&rec),
            rec,
            buf: Plain::new(Vec::with_capacity(self.cfg.chunk_size)),
            size: 0,
            next_index: 0,
            in_flight: 0,
            hashes: BTreeMap::new(),
            done,
            results,
            failed: None,
            committed: None,
            named_unflushed: None,
            mtime_set: Arc::default(),
        })
    }

    /// The chunks of committed version `rec`, in order: chunk i at place i. A version
    /// committed by an fsync and still growing also has records of chunks past its committed
    /// size, which are not the committed version's (its root does not cover them) and, being
    /// recorded as their uploads complete, may leave gaps, after which a chunk's place in the
    /// list is no longer its index.
    ///
    /// The list must tile the committed size and make the version's Merkle root: each chunk is
    /// checked against its own hash only when read, and a hash says nothing of where its chunk
    /// lies, so an offset moved in the catalog's files would otherwise serve shifted bytes.
    pub fn committed_chunks(&self, rec: &FileRecord) -> Result<Vec<ChunkRecord>, EngineError> {
        let mut chunks = self.catalog.chunks(&rec.id)?;
        let committed = chunks
            .iter()
            .take_while(|c| c.offset.saturating_add(u64::from(c.len)) <= rec.size)
            .count();
        chunks.truncate(committed);
        match &rec.root {
            Some(root) => manifest::check_chunks(
                chunks.iter().map(|c| (c.offset, c.len, c.hash)),
                rec.chunk_size,
                rec.size,
                root,
            ),
            None => Err("no Merkle root recorded".into()),
        }
        .map_err(|reason| CatalogError::Corrupt {
            path: self.catalog.path().to_owned(),
            key: label(rec),
            reason: format!("its chunk list: {reason} (catalog altered?)"),
        })?;
        Ok(chunks)
    }

    /// Wait for consent, then read up to `size` bytes at `offset` of a committed version. A
    /// copy, for tests and tools: the bytes outlive the reply guard ([`ReadData`]'s), so an
    /// end of the consent does not wait for what the caller does with them. The mount replies
    /// from [`Engine::read_unless`]'s data, which holds it.
    pub fn read(
        &self,
        rec: &FileRecord,
        chunks: &[ChunkRecord],
        offset: u64,
        size: usize,
    ) -> Result<Vec<u8>, EngineError> {
        let data = self.read_unless(rec, chunks, offset, size, &|| false)?;
        Ok(data.with_bytes(<[u8]>::to_vec))
    }

    /// [`Engine::read`] without a copy: the bytes stay in the cached chunks they come from.
    /// Stops waiting for consent once `abandoned()` says the reader is gone (killed while
    /// blocked).
    pub fn read_unless(
        &self,
        rec: &FileRecord,
        chunks: &[ChunkRecord],
        offset: u64,
        size: usize,
        abandoned: &dyn Fn() -> bool,
    ) -> Result<ReadData, EngineError> {
        self.consent
            .wait_unless(&rec.patient, self.cfg.consent_wait, abandoned)?;
        let end = rec.size.min(offset.saturating_add(size as u64));
        let mut parts = Vec::new();
        let first = chunks.partition_point(|c| c.offset + u64::from(c.len) <= offset);
        let mut last_index = None;
        for (index, chunk) in chunks.iter().enumerate().skip(first) {
            if chunk.offset >= end {
                break;
            }
            // Ask for the chunks after this read before rebuilding this one, so that the
            // readahead workers fetch them while this thread waits for its own.
            if last_index.is_none() {
                self.prefetch_after(rec, chunks, index, end);
            }
            let data = match self.chunk(rec, index as u64, chunk) {
                Ok(data) => data,
                Err(EngineError::Consent(ConsentError::Ended { .. })) => {
                    return Err(self.refused_mid_read(rec, offset))
                }
                Err(e) => return Err(e),
            };
            let from = (offset.max(chunk.offset) - chunk.offset) as usize;
            let to = (end.min(chunk.offset + u64::from(chunk.len)) - chunk.offset) as usize;
            parts.push((data, from..to));
            last_index = Some(index);
        }
        // Consent was active when the read began; it may have ended (revoked, card pulled)
        // while the chunks were fetched. Data goes back only if it is still active now, and
        // an end from now on waits for this reply before it returns.
        let Some(serving) = self.consent.serving(&rec.patient) else {
            return Err(self.refused_mid_read(rec, offset));
        };
        Ok(ReadData {
            parts,
            _serving: serving,
        })
    }

    /// Queue up to `readahead` chunks past byte `end` (those not cached or being fetched) for
    /// the readahead workers; never blocks (a full queue drops the hint).
    fn prefetch_after(&self, rec: &FileRecord, chunks: &[ChunkRecord], from: usize, end: u64) {
        let tx = self.prefetch.lock().expect("prefetch").clone();
        for (index, chunk) in chunks
            .iter()
            .enumerate()
            .skip(from)
            .skip_while(|(_, c)| c.offset < end)
            .take(self.cfg.readahead)
        {
            if !self.cache.contains(&(rec.id, index as u64)) {
                let _ = tx.try_send((rec.clone(), index as u64, chunk.clone()));
            }
        }
    }

    fn chunk(
        &self,
        rec: &FileRecord,
        index: u64,
        chunk: &ChunkRecord,
    ) -> Result<Arc<Plain>, EngineError> {
        self.cache.get_or_fetch(
            (rec.id, index),
            &rec.patient,
            || {
                // The share pool's wipe count first, then the consent: an end takes its grant
                // away before it wipes the pool, so a consent still active after the count was
                // read has its wipe still to come, and that wipe catches these shares when they
                // come back (`give_since`). A consent already ended fetches nothing: the shares
                // of a fetch begun after its wipe would stay in the pool unwiped (a read
                // spanning two chunks, or a reader taking over a read-ahead's fetch, after a
                // card was pulled), and the GETs would spend pad for a read that is refused.
                let mark = self.core.share_bufs.mark();
                if !self.consent.is_active(&rec.patient) {
                    return Err(ConsentError::Ended {
                        patient: rec.patient.clone(),
                    }
                    .into());
                }
                self.core.fetch_since(rec, index, chunk, mark)
            },
            // A consent that ended during the fetch must not leave plaintext in the cache.
            || self.consent.is_active(&rec.patient),
        )
    }

    /// A read at `offset` of `rec` whose consent ended while it was served: audited, and the
    /// error it fails with (EACCES).
    fn refused_mid_read(&self, rec: &FileRecord, offset: u64) -> EngineError {
        self.catalog.audit(
            "read-refused",
            Some(&rec.patient),
            Some(&rec.name),
            &format!("consent ended during a read at {offset}"),
        );
        ConsentError::Ended {
            patient: rec.patient.clone(),
        }
        .into()
    }

    /// A read handle of version `id` opened: its shares stay until [`Engine::reader_closed`].
    pub fn reader_opened(&self, id: &FileId) {
        let mut readers = self.readers.lock().expect("readers");
        readers.entry(*id).or_insert((0, None)).0 += 1;
    }

    /// Whether a read-ahead of version `rec` is still worth its fetch: the version is held
    /// open, or still named. One closed and deleted meanwhile (`cat big | head -c 1M; rm big`)
    /// is having its shares deleted: fetching them logged a false "too few shares" naming
    /// every site, and counted every site as failing.
    fn still_read(&self, rec: &FileRecord) -> bool {
        if self.readers.lock().expect("readers").contains_key(&rec.id) {
            return true;
        }
        matches!(self.catalog.file(&rec.patient, &rec.name), Ok(Some(f)) if f.id == rec.id)
    }

    /// Whether version `id`, still held open, lost its name (see [`Engine::retire`]).
    pub fn is_retired(&self, id: &FileId) -> bool {
        self.readers
            .lock()
            .expect("readers")
            .get(id)
            .is_some_and(|(_, rec)| rec.is_some())
    }

    /// Read handles open, over all versions.
    pub fn open_readers(&self) -> usize {
        let held: usize = self
            .readers
            .lock()
            .expect("readers")
            .values()
            .map(|(n, _)| n)
            .sum();
        held.saturating_sub(self.writers_holding.load(Ordering::SeqCst))
    }

    /// A FUSE writer of version `id` opened: held like a read handle (see
    /// [`FileWriter::commit`] for a version that loses its name while written).
    pub fn writer_opened(&self, id: &FileId) {
        self.writers_holding.fetch_add(1, Ordering::SeqCst);
        self.reader_opened(id);
    }

    /// The FUSE writer of version `id` was released (after its last commit or abort).
    pub fn writer_closed(&self, id: &FileId) {
        self.writers_holding.fetch_sub(1, Ordering::SeqCst);
        self.reader_closed(id);
    }

    /// A read handle of version `id` closed; the last one of a version replaced or unlinked
    /// meanwhile deletes its shares.
    pub fn reader_closed(&self, id: &FileId) {
        let retired = {
            let mut readers = self.readers.lock().expect("readers");
            let Some(e) = readers.get_mut(id) else { return };
            e.0 -= 1;
            if e.0 > 0 {
                return;
            }
            readers.remove(id).and_then(|(_, rec)| rec)
        };
        if let Some(rec) = retired {
            self.discard_later(rec);
        }
    }

    /// Delete the shares of a version no name points to any more (replaced, unlinked): now,
    /// or, while a reader has it open, when the last one closes (as a Unix file's blocks
    /// outlive its name while open). A crash meanwhile leaves it to [`Engine::recover`].
    pub fn retire(&self, rec: &FileRecord) {
        {
            let mut readers = self.readers.lock().expect("readers");
            if let Some(e) = readers.get_mut(&rec.id) {
                tracing::info!(
                    "{}: replaced or unlinked while open for reading; shares kept until it is closed",
                    label(rec)
                );
                e.1 = Some(rec.clone());
                return;
            }
        }
        self.discard_later(rec.clone());
    }

    /// [`Engine::discard`] on the discarder thread, after the caller has gone on. The version
    /// is already retired in the catalog (the unlink, rename or commit that replaced it is
    /// durable), so nothing serves it and a crash meanwhile leaves it to [`Engine::recover`].
    /// Deleting a whole genome's shares takes one delete per share (a quarter of a million
    /// for 80 GB in 1 MiB chunks over three sites): an `rm`, a `mv` over a file, the close
    /// of a file that replaced another, or the last reader's close of a replaced file must
    /// not wait for that, nor hold a FUSE request loop meanwhile.
    fn discard_later(&self, rec: FileRecord) {
        *self.discarding.0.lock().expect("discarding") += 1;
        if let Err(mpsc::SendError(rec)) = self.discards.lock().expect("discards").send(rec) {
            // The discarder is gone (it ends only with the engine): delete here.
            self.discard(&rec);
            self.discarded();
        }
    }

    /// Has version `id`'s manifest rewritten at every site after this returns (after a rename
    /// or an attribute change, already durable in the catalog), on the manifest thread
    /// ([`Engine::wait_discards`] waits for it). A rewrite waits on every site: in the request,
    /// a hung site held a FUSE request thread for its timeout on each `chmod`, `touch` or `mv`
    /// (rsync does all three per file).
    fn refresh_later(&self, id: FileId) {
        *self.discarding.0.lock().expect("discarding") += 1;
        *self
            .unrefreshed
            .lock()
            .expect("unrefreshed")
            .entry(id)
            .or_default() += 1;
        if let Err(mpsc::SendError(id)) = self.refreshes.lock().expect("refreshes").send(id) {
            self.refresh_now(&id);
        }
    }

    /// One rewrite queued by [`Engine::refresh_later`], done (a panic in it is audited as a
    /// rewrite that failed).
    fn refresh_now(&self, id: &FileId) {
        let done =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.refresh_manifest(id)));
        if done.is_err() {
            self.manifest_stale(id, "its rewrite failed (a panic)");
        }
        {
            let mut left = self.unrefreshed.lock().expect("unrefreshed");
            if let Some(n) = left.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    left.remove(id);
                }
            }
        }
        self.discarded();
    }

    /// Audits the rewrites still queued (an unmount's wait ran out): those versions' manifests
    /// keep their previous name and attributes, which a catalog rebuild would restore.
    pub fn audit_unrefreshed(&self) {
        let left: Vec<FileId> = self
            .unrefreshed
            .lock()
            .expect("unrefreshed")
            .keys()
            .copied()
            .collect();
        for id in left {
            self.manifest_stale(&id, "not rewritten before the unmount");
        }
    }

    /// A manifest not rewritten: logged, audited, and recorded for the next mount's
    /// [`Engine::recover`] to rewrite.
    fn manifest_stale(&self, id: &FileId, why: &str) {
        tracing::warn!(
            "file {}: manifest {why}; a catalog rebuild would restore its previous name and attributes",
            merkle::hex(id)
        );
        if let Err(e) = self.catalog.mark_manifest_stale(id) {
            tracing::error!(
                "file {}: recording its stale manifest for a rewrite at the next mount: {e}",
                merkle::hex(id)
            );
        }
        self.catalog.audit(
            "manifest-stale",
            None,
            None,
            &format!("file {}: {why}", merkle::hex(id)),
        );
    }

    /// One version queued by [`Engine::discard_later`] is done with.
    fn discarded(&self) {
        let (n, done) = &self.discarding;
        *n.lock().expect("discarding") -= 1;
        done.notify_all();
    }

    /// Completes and syncs the destruction of the link key every site's link used (before
    /// the process exits); the sites whose link could not, with why.
    pub fn flush_links(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for site in &self.core.sites {
            if let Err(e) = site.flush_link() {
                tracing::error!("site {}: used link key may stay on disk: {e}", site.name());
                failed.push(format!("{}: {e}", site.name()));
            }
        }
        failed
    }

    /// Wait until the shares of every version retired so far are deleted (or failed to be,
    /// and stay for the next mount), and every manifest rewrite queued so far is done, or
    /// until `limit` has passed; true if none is left.
    pub fn wait_discards(&self, limit: Duration) -> bool {
        let (n, done) = &self.discarding;
        let n = n.lock().expect("discarding");
        let (n, _) = done
            .wait_timeout_while(n, limit, |n| *n > 0)
            .expect("discarding");
        *n == 0
    }

    /// Delete a version's shares from every site, then its catalog records. A share that
    /// cannot be deleted (a site down) is logged, and the records stay: the version stays
    /// retired (or unfinished), and [`Engine::recover`] tries again at the next mount, instead
    /// of leaving shares that nothing would ever delete.
    ///
    /// Each site lists what it holds of the version (`list_shares_of`: only that file's
    /// keys cross the link), so that chunks past the records go too: in flight when a writer
    /// failed, appended after an fsync's commit by a writer that was then abandoned, or
    /// uploaded while their records were not yet durable when the mount died.
    pub fn discard(&self, rec: &FileRecord) {
        self.discard_unless_down(rec, &mut HashSet::new());
    }

    /// [`Engine::discard`], passing over the sites in `down` and adding to it those that
    /// cannot list: a recovery of many versions waits for a dead host's connect timeout once,
    /// not once per version.
    fn discard_unless_down(&self, rec: &FileRecord, down: &mut HashSet<String>) {
        // Whatever asked for it, the version a name points at keeps its shares: a commit
        // whose flush failed after its transaction applied is named, though its writer
        // was told the commit failed.
        match self.catalog.named_version(&rec.id) {
            Ok(None) => {}
            Ok(Some(_)) => {
                tracing::error!(
                    "{}: not deleting the shares of the version its name points at",
                    label(rec)
                );
                return;
            }
            Err(e) => {
                tracing::warn!("{}: kept for the next mount: {e}", label(rec));
                return;
            }
        }
        let failed = std::cell::Cell::new(0usize);
        let delete = |site: &dyn ShareSite, key: &ShareKey| match site.delete(key) {
            Ok(()) | Err(SiteError::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!("{}: deleting {key}: {e}", label(rec));
                failed.set(failed.get() + 1);
            }
        };
        // The manifest goes first: a crash part-way leaves data shares without a manifest,
        // which a catalog rebuild reports as an orphan instead of restoring the file.
        {
            let _guard = self.manifest_lock(&rec.id);
            for (share, site) in self.core.sites.iter().enumerate() {
                let key = ShareKey {
                    file: rec.id,
                    chunk: MANIFEST_CHUNK,
                    share: share as u8,
                };
                delete(site.as_ref(), &key);
            }
        }
        for site in &self.core.sites {
            // A site that cannot list is down: trying each key there would cost a connect
            // timeout apiece, at every mount, and the version is kept for the next one anyway.
            if down.contains(site.name()) {
                failed.set(failed.get() + 1);
                continue;
            }
            let keys = match shares_of(site.as_ref(), &rec.id) {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::warn!("{}: listing site {}: {e}", label(rec), site.name());
                    down.insert(site.name().to_string());
                    failed.set(failed.get() + 1);
                    continue;
                }
            };
            for key in keys.iter().filter(|k| k.chunk != MANIFEST_CHUNK) {
                delete(site.as_ref(), key);
            }
        }
        if failed.get() > 0 {
            tracing::warn!(
                "{}: {} deletions or listings failed; the version stays in the catalog and the next mount deletes the rest",
                label(rec),
                failed.get()
            );
            return;
        }
        if let Err(e) = self.catalog.forget(&rec.id) {
            tracing::warn!("{}: forgetting version: {e}", label(rec));
        }
    }

    /// Garbage-collect what a crash left behind: versions half-written (never served) and
    /// versions replaced or unlinked whose shares were not yet deleted (nothing names them);
    /// and queue a rewrite of every manifest recorded as older than its record (a rename or
    /// attribute change whose rewrite failed or was cut short), so that a catalog rebuild
    /// finds the names and attributes the catalog has. Returns how many versions were
    /// discarded.
    pub fn recover(&self) -> Result<usize, EngineError> {
        for id in self.catalog.stale_manifests()? {
            tracing::info!(
                "file {}: rewriting a manifest older than its record",
                merkle::hex(&id)
            );
            self.refresh_later(id);
        }
        let mut down = HashSet::new();
        let unnamed = self.catalog.retired()?;
        for rec in &unnamed {
            tracing::info!(
                "{}: deleting the shares of a replaced or unlinked version a crash left behind",
                label(rec)
            );
            self.catalog
                .audit("discard-replaced", Some(&rec.patient), Some(&rec.name), "");
            self.discard_unless_down(rec, &mut down);
        }
        let unfinished = self.catalog.unfinished()?;
        for rec in &unfinished {
            tracing::warn!(
                "{}: discarding a version left incomplete by a crash",
                label(rec)
            );
            self.catalog.audit(
                "discard-incomplete",
                Some(&rec.patient),
                Some(&rec.name),
                "",
            );
            self.discard_unless_down(rec, &mut down);
        }
        Ok(unnamed.len() + unfinished.len())
    }

    pub fn sites(&self) -> &[Arc<dyn ShareSite>] {
        &self.core.sites
    }

    /// The plaintext room the sites have ([`crate::placement::Space`]), asking them all at
    /// once and waiting at most [`SPACE_WAIT`]: a site that has not answered by then (a host
    /// that is off, or one that took the connection and hangs) counts as down, and its ask
    /// finishes alone; it is not asked again while that ask is under way.
    pub fn space(&self) -> crate::placement::Space {
        let (tx, rx) = mpsc::channel();
        let mut room: Vec<crate::placement::SiteRoom> = vec![(None, None); self.core.sites.len()];
        for (i, site) in self.core.sites.iter().enumerate() {
            if self.core.space_asking[i].swap(true, Ordering::SeqCst) {
                continue;
            }
            let (core, site, tx) = (self.core.clone(), site.clone(), tx.clone());
            let spawned = std::thread::Builder::new()
                .name("site-space".into())
                .spawn(move || {
                    let r = (site.space(), site.key_remaining());
                    core.space_asking[i].store(false, Ordering::SeqCst);
                    let _ = tx.send((i, r));
                });
            if let Err(e) = spawned {
                let site = self.core.sites[i].name();
                tracing::warn!("asking site {site} for its room: no thread: {e}");
                self.core.space_asking[i].store(false, Ordering::SeqCst);
            }
        }
        drop(tx);
        let deadline = Instant::now() + SPACE_WAIT;
        while let Ok((i, r)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            room[i] = r;
        }
        let chunk = self.cfg.chunk_size;
        let put = crate::wire::msg::PUT_HEAD_LEN + self.core.scheme.share_len(chunk);
        let key_per_chunk = crate::wire::frame::key_len_for(put as u64).expect("a chunk's PUT");
        crate::placement::Space::of(&room, chunk as u64, key_per_chunk)
    }

    fn next_seq(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let prev = self
            .seq
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| Some(now.max(p + 1)))
            .expect("closure always returns Some");
        now.max(prev + 1)
    }

    fn manifest_lock(&self, id: &FileId) -> std::sync::MutexGuard<'_, ()> {
        self.manifest_stripe(self.manifest_stripe_of(id))
    }

    fn manifest_stripe_of(&self, id: &FileId) -> usize {
        usize::from(id[0]) % self.manifest_locks.len()
    }

    fn manifest_stripe(&self, i: usize) -> std::sync::MutexGuard<'_, ()> {
        self.manifest_locks[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The manifest locks of `id` and `other`: one stripe once, two in stripe order (so
    /// that two holders of two never wait on each other).
    fn manifest_locks(
        &self,
        id: &FileId,
        other: Option<&FileId>,
    ) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let a = self.manifest_stripe_of(id);
        let mut stripes = vec![a];
        if let Some(b) = other
            .map(|o| self.manifest_stripe_of(o))
            .filter(|&b| b != a)
        {
            stripes.push(b);
            stripes.sort_unstable();
        }
        stripes
            .into_iter()
            .map(|i| self.manifest_stripe(i))
            .collect()
    }

    /// Split a version's manifest with the version's own (k,n) and put share i on site i
    /// under [`MANIFEST_CHUNK`], replacing the one stored before. Caller holds the version's
    /// manifest lock.
    fn put_manifest(
        &self,
        rec: &FileRecord,
        root: Hash,
        chunks: &[ChunkRecord],
    ) -> Result<(), EngineError> {
        let scheme = self.core.scheme_of(rec)?;
        // Share i goes to site i, where share i of every chunk is: a version placed on sites
        // other than the configured ones in that order (a site taken out or moved) cannot
        // have its manifest put where its chunks are.
        let sites = &self.core.sites;
        let moved = chunks.iter().flat_map(|c| &c.shares).find(|l| {
            sites
                .get(usize::from(l.share))
                .is_none_or(|s| s.name() != l.site)
        });
        if scheme.n() > sites.len() || moved.is_some() {
            return Err(EngineError::OtherScheme {
                file: label(rec),
                written: (rec.k, rec.n),
                placed: moved.map_or_else(
                    || format!("{} sites", rec.n),
                    |l| format!("share {} on site {}", l.share, l.site),
                ),
            });
        }
        let m = Manifest::new(rec, root, chunks, self.next_seq());
        // Remembered, so that a restart with the clock behind still writes later seqs.
        self.catalog.raise_manifest_seq(m.seq)?;
        let bytes = m.encode();
        self.core
            .put_shares(&scheme, &rec.id, &label(rec), MANIFEST_CHUNK, &bytes)
    }

    /// Rewrite the manifest of a committed version from its catalog record (after a rename
    /// or an attribute change). A failure is logged and audited: the catalog stays right, and
    /// only a later rebuild from the sites would see the previous name or attributes.
    fn refresh_manifest(&self, id: &FileId) {
        if let Err(e) = self.rewrite_manifest(id) {
            self.manifest_stale(id, &format!("not rewritten: {e}"));
        }
    }

    /// One round of retries of the manifests recorded stale, on the manifest thread while it
    /// is idle. A failure leaves the mark (and is not audited again: the first failure was);
    /// returns how many are still stale.
    fn retry_stale_manifests(&self) -> usize {
        let stale = match self.catalog.stale_manifests() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("reading the stale manifests to retry them: {e}");
                return 1;
            }
        };
        let mut left = 0;
        for id in &stale {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.rewrite_manifest(id)
            }));
            match r {
                Ok(Ok(_)) => tracing::info!(
                    "file {}: stale manifest rewritten (a retry)",
                    merkle::hex(id)
                ),
                // Never rewritable under this configuration (a site taken out of its place):
                // not counted, so that it does not hold the other retries at the longest wait.
                Ok(Err(EngineError::OtherScheme { .. })) => {}
                Ok(Err(e)) => {
                    left += 1;
                    tracing::debug!(
                        "file {}: stale manifest not rewritten yet: {e}",
                        merkle::hex(id)
                    );
                }
                Err(_) => left += 1,
            }
        }
        if left > 0 {
            tracing::info!(
                "{left} manifest(s) still older than their records (a site refused their rewrite); retried later"
            );
        }
        left
    }

    /// [`Engine::refresh_manifest`]'s rewrite, its failure returned.
    fn rewrite_manifest(&self, id: &FileId) -> Result<(), EngineError> {
        let _guard = self.manifest_lock(id);
        // Taken before the record is read: a mark made after it (a later rename, whose
        // rewrite is queued behind this one) stays for that rewrite to clear.
        let seen = self.catalog.stale_mark(id)?;
        // Only a version a name points at: one replaced or unlinked meanwhile is being
        // discarded, manifest first (under this lock), and must not get one back.
        let Some(rec) = self.catalog.named_version(id)? else {
            self.catalog.manifest_rewritten(id, seen)?;
            return Ok(());
        };
        let (FileState::Committed, Some(root)) = (rec.state, rec.root) else {
            self.catalog.manifest_rewritten(id, seen)?;
            return Ok(());
        };
        // A manifest with chunks past the committed size fails its check in a rebuild.
        let chunks = self.committed_chunks(&rec)?;
        self.put_manifest(&rec, root, &chunks)?;
        self.catalog.manifest_rewritten(id, seen)?;
        Ok(())
    }

    /// Rename a committed file (within the patient), replacing any file at the target (whose
    /// shares are deleted), and have its manifest rewritten under the new name (by the
    /// manifest thread, after this returns: see [`Engine::refresh_later`]).
    pub fn rename(
        &self,
        patient: &str,
        name: &str,
        new_patient: &str,
        new_name: &str,
    ) -> Result<(), EngineError> {
        // A read waits for the consent of the patient whose directory holds the file: moving
        // it would put one patient's genome behind another's card. `mv` answers EXDEV by
        // copying, and the copy's read waits for the owner's consent.
        if patient != new_patient {
            return Err(EngineError::CrossPatient {
                from: format!("{patient}/{name}"),
                to: format!("{new_patient}/{new_name}"),
            });
        }
        let replaced = self.catalog.rename(patient, name, new_patient, new_name)?;
        self.catalog.audit(
            "rename",
            Some(patient),
            Some(name),
            &format!("to {new_patient}/{new_name}"),
        );
        if let Some(old) = replaced {
            self.retire(&old);
        }
        if let Some(rec) = self.catalog.file(new_patient, new_name)? {
            self.refresh_later(rec.id);
        }
        Ok(())
    }

    /// Change a committed version's mode and/or modification time, in the catalog, and in its
    /// manifest after this returns (see [`Engine::refresh_later`]).
    pub fn set_attrs(
        &self,
        id: &FileId,
        mode: Option<u32>,
        mtime: Option<u64>,
    ) -> Result<(), EngineError> {
        self.catalog.set_attrs(id, mode, mtime)?;
        self.refresh_later(*id);
        Ok(())
    }
}

impl Core {
    fn upload(&self, job: &UploadJob) -> Result<ChunkRecord, EngineError> {
        let hash = job.leaf.hash(&job.data);
        self.put_shares(&self.scheme, &job.file, &job.label, job.index, &job.data)?;
        self.stats.chunks_written.fetch_add(1, Ordering::Relaxed);
        Ok(ChunkRecord {
            offset: job.offset,
            len: job.data.len() as u32,
            hash,
            shares: (0..self.scheme.n())
                .map(|i| ShareLocation {
                    share: i as u8,
                    site: self.sites[i].name().to_string(),
                })
                .collect(),
        })
    }

    /// Split `data` with `scheme` and put share i on site i under (file, index), all sites in
    /// parallel; returns once every site acknowledged.
    fn put_shares(
        &self,
        scheme: &Scheme,
        file: &FileId,
        label: &str,
        index: u64,
        data: &[u8],
    ) -> Result<(), EngineError> {
        let share_len = scheme.share_len(data.len());
        let mut shares = PooledShares {
            pool: &self.share_bufs,
            bufs: (0..scheme.n())
                .map(|_| self.share_bufs.take_len(share_len))
                .collect(),
        };
        {
            let mut refs: Vec<&mut [u8]> =
                shares.bufs.iter_mut().map(|s| s.as_mut_slice()).collect();
            with_thread_drbg(|rng| scheme.split(data, rng, &mut refs))
                .map_err(SharingError::from)??;
        }
        let meta = ShareMeta {
            k: scheme.k() as u8,
            n: scheme.n() as u8,
            secret_len: data.len() as u32,
        };
        let jobs: Vec<(usize, &Vec<u8>)> = shares.bufs.iter().enumerate().collect();
        let results = in_parallel(&jobs, |&(i, share)| {
            let key = ShareKey {
                file: *file,
                chunk: index,
                share: i as u8,
            };
            self.sites[i].put(&key, &meta, share)
        });
        let errors: Vec<SiteError> = results.into_iter().filter_map(Result::err).collect();
        if !errors.is_empty() {
            let no_space = errors
                .iter()
                .any(|e| matches!(e, SiteError::Full { .. } | SiteError::KeyExhausted { .. }));
            let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(EngineError::Store {
                file: label.to_string(),
                chunk: index,
                reason: reasons.join("; "),
                no_space,
            });
        }
        Ok(())
    }

    fn get_share(
        &self,
        rec: &FileRecord,
        index: u64,
        loc: &ShareLocation,
    ) -> Result<Vec<u8>, String> {
        let site = self
            .by_name
            .get(&loc.site)
            .ok_or_else(|| format!("site {} is not configured", loc.site))?;
        let key = ShareKey {
            file: rec.id,
            chunk: index,
            share: loc.share,
        };
        // Into a pooled buffer: the share is opened straight into it, and a buffer that held a
        // share of the same length is reused without a memset.
        let mut v = self.share_bufs.pop();
        if let Err(e) = site.get_into(&key, &mut v) {
            // It may hold part of this share, or an earlier one.
            wipe(&mut v);
            return Err(e.to_string());
        }
        Ok(v)
    }

    /// The scheme `rec` was written with. A version keeps the (k,n) it was written under, so
    /// after `scheme` changes in the configuration (a site added, say), the files written
    /// before are rebuilt with their own: read with the new one, every chunk would fail its
    /// hash and honest sites would be blamed.
    fn scheme_of(&self, rec: &FileRecord) -> Result<Arc<Scheme>, EngineError> {
        self.scheme_for(rec.k, rec.n)
    }

    /// The (k,n) scheme, the configured one's `Arc` when it is that.
    fn scheme_for(&self, k: u8, n: u8) -> Result<Arc<Scheme>, EngineError> {
        if (usize::from(k), usize::from(n)) == (self.scheme.k(), self.scheme.n()) {
            return Ok(self.scheme.clone());
        }
        let mut others = self.other_schemes.lock().expect("other_schemes");
        if let Some(s) = others.get(&(k, n)) {
            return Ok(s.clone());
        }
        let s = Arc::new(Scheme::new(usize::from(k), usize::from(n))?);
        others.insert((k, n), s.clone());
        Ok(s)
    }

    /// Rebuild chunk `index` of `rec` from k sites; its share buffers go back to the pool,
    /// wiped if the pool was wiped since `mark` (read before the caller's consent check).
    fn fetch_since(
        &self,
        rec: &FileRecord,
        index: u64,
        chunk: &ChunkRecord,
        mark: u64,
    ) -> Result<Plain, EngineError> {
        let mut good = Vec::new();
        let r = self.fetch_into(rec, index, chunk, &mut good);
        for (_, share) in good {
            self.share_bufs.give_since(share, mark);
        }
        r
    }

    /// [`fetch`](Self::fetch), with the shares it got left in `good` (for their buffers).
    fn fetch_into(
        &self,
        rec: &FileRecord,
        index: u64,
        chunk: &ChunkRecord,
        good: &mut Vec<(usize, Vec<u8>)>,
    ) -> Result<Plain, EngineError> {
        let scheme = self.scheme_of(rec)?;
        let k = scheme.k();
        let file = label(rec);
        let share_len = scheme.share_len(chunk.len as usize);
        let home = self.sites[0].name();
        // A share fetched spends the key of its site's replies.
        let key_left = |s: &str| self.by_name.get(s).and_then(|x| x.reply_key_remaining());
        let order = {
            let failed_at = self.failed_at.lock().expect("failed_at");
            let failing = |s: &str| failed_at.get(s).is_some_and(|t| t.elapsed() < FAILING_FOR);
            placement::read_order(&chunk.shares, home, key_left, failing)
        };
        let mut failures: Vec<String> = Vec::new();
        let mut next = 0;
        let mut fetch_more =
            |want: usize, good: &mut Vec<(usize, Vec<u8>)>, failures: &mut Vec<String>| {
                while good.len() < want && next < order.len() {
                    let batch = &order[next..(next + want - good.len()).min(order.len())];
                    next += batch.len();
                    let got = in_parallel(batch, |loc| self.get_share(rec, index, loc));
                    {
                        let mut failed_at = self.failed_at.lock().expect("failed_at");
                        // A share of the wrong length is a failed GET too: its site is
                        // asked last for a while, as one that did not answer.
                        for (loc, r) in batch.iter().zip(&got) {
                            match r {
                                Ok(d) if d.len() == share_len => failed_at.remove(&loc.site),
                                _ => failed_at.insert(loc.site.clone(), Instant::now()),
                            };
                        }
                    }
                    for (loc, r) in batch.iter().zip(got) {
                        match r {
                            Ok(d) if d.len() == share_len => good.push((loc.share as usize, d)),
                            Ok(mut d) => {
                                failures.push(format!(
                                    "site {}: share {} is {} bytes, expected {share_len}",
                                    loc.site,
                                    loc.share,
                                    d.len()
                                ));
                                wipe(&mut d);
                            }
                            Err(e) => failures.push(e),
                        }
                    }
                }
            };
        fetch_more(k, good, &mut failures);
        for f in &failures {
            self.stats.share_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("{file}: chunk {index}: routed around a failed share: {f}");
        }
        let mut out = Plain::pooled(&self.read_bufs, chunk.len as usize);
        let rebuild =
            |subset: &[&(usize, Vec<u8>)], out: &mut Plain| -> Result<bool, EngineError> {
                let given: Vec<(usize, &[u8])> =
                    subset.iter().map(|(i, d)| (*i, d.as_slice())).collect();
                let hash = match rec.leaf {
                    // Hashed tile by tile as it is rebuilt, while each tile is in cache.
                    LeafHash::Whole => {
                        let mut hash = merkle::ChunkHasher::new();
                        scheme.combine_observed(&given, chunk.len as usize, out, &mut |t| {
                            hash.update(t)
                        })?;
                        hash.finish()
                    }
                    // Its pieces side by side, once it is whole (1 MiB stays in this core's L2).
                    leaf @ LeafHash::Pieces => {
                        scheme.combine(&given, chunk.len as usize, out)?;
                        leaf.hash(out)
                    }
                };
                Ok(hash == chunk.hash)
            };
        if good.len() >= k && rebuild(&good.iter().take(k).collect::<Vec<_>>(), &mut out)? {
            self.stats.chunks_read.fetch_add(1, Ordering::Relaxed);
            return Ok(out);
        }
        if good.len() >= k {
            // Some share is wrong without its site knowing: get them all, find k that agree.
            self.stats.bad_rebuilds.fetch_add(1, Ordering::Relaxed);
            let before = failures.len();
            fetch_more(order.len(), good, &mut failures);
            for f in &failures[before..] {
                self.stats.share_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{file}: chunk {index}: routed around a failed share: {f}");
            }
            for subset in k_subsets(good.len(), k) {
                let pick: Vec<&(usize, Vec<u8>)> = subset.iter().map(|&i| &good[i]).collect();
                if rebuild(&pick, &mut out)? {
                    let used: Vec<usize> = pick.iter().map(|p| p.0).collect();
                    // A share left out is to blame only if it spoils a rebuild with k-1 of the
                    // shares known good (with n-k >= 2, some left out were never tried).
                    let mut scratch = Plain::pooled(&self.read_bufs, chunk.len as usize);
                    let mut suspects = Vec::new();
                    for other in good.iter().filter(|g| !used.contains(&g.0)) {
                        let mut trial = pick[..k - 1].to_vec();
                        trial.push(other);
                        if !rebuild(&trial, &mut scratch)? {
                            suspects.push(other.0);
                        }
                    }
                    drop(scratch);
                    {
                        // Asked last for the next chunks, as a site whose GET failed.
                        let mut failed_at = self.failed_at.lock().expect("failed_at");
                        for l in chunk.shares.iter() {
                            if suspects.contains(&usize::from(l.share)) {
                                failed_at.insert(l.site.clone(), Instant::now());
                            }
                        }
                    }
                    self.stats
                        .share_failures
                        .fetch_add(suspects.len() as u64, Ordering::Relaxed);
                    tracing::warn!(
                        "{file}: chunk {index}: {} failed verification; rebuilt from {}",
                        at_sites(chunk, suspects),
                        at_sites(chunk, used)
                    );
                    self.stats.chunks_read.fetch_add(1, Ordering::Relaxed);
                    return Ok(out);
                }
            }
            self.stats.failed_reads.fetch_add(1, Ordering::Relaxed);
            tracing::error!("{file}: chunk {index}: no {k} shares rebuild the hashed data");
            return Err(EngineError::Corrupt {
                file,
                chunk: index,
                k,
                sites: at_sites(chunk, good.iter().map(|g| g.0)),
            });
        }
        self.stats.failed_reads.fetch_add(1, Ordering::Relaxed);
        let err = EngineError::TooFewShares {
            file,
            chunk: index,
            good: good.len(),
            need: k,
            detail: failures.join("; "),
        };
        tracing::error!("{err}");
        Err(err)
    }
}

/// One chunk's share buffers, wiped and returned to the pool however the upload ends.
struct PooledShares<'a> {
    pool: &'a BufPool,
    bufs: Vec<Vec<u8>>,
}

impl Drop for PooledShares<'_> {
    fn drop(&mut self) {
        for b in self.bufs.drain(..) {
            self.pool.give(b);
        }
    }
}

/// The keys of every share `site` holds of version `id`, from its listing (in key order:
/// file id, chunk, share).
fn shares_of(site: &dyn ShareSite, id: &FileId) -> Result<Vec<ShareKey>, SiteError> {
    // Listing starts strictly after a key: the last one of the file id before `id`.
    let mut after = u128::from_be_bytes(*id).checked_sub(1).map(|p| ShareKey {
        file: p.to_be_bytes(),
        chunk: u64::MAX,
        share: u8::MAX,
    });
    let mut keys = Vec::new();
    // A site holds one share of each chunk of a version (share i on site i): at most every
    // chunk a manifest can list, and the manifest.
    let most = manifest::MAX_CHUNKS + 1;
    loop {
        let page = site.list_shares_of(id, after)?;
        crate::sites::check_page(site, after, &page)?;
        let (page, next) = page;
        for (k, _) in page {
            if k.file != *id {
                return Ok(keys);
            }
            keys.push(k);
        }
        if keys.len() as u64 > most {
            return Err(SiteError::Protocol {
                site: site.name().to_string(),
                reason: format!("lists more than {most} shares of file {}", merkle::hex(id)),
            });
        }
        match next {
            Some(n) => after = Some(n),
            None => return Ok(keys),
        }
    }
}

/// `f` of every item, all at once, results in order: the first on the calling thread (which
/// would only wait otherwise), each other on a thread of its own.
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let Some((first, rest)) = items.split_first() else {
        return Vec::new();
    };
    std::thread::scope(|s| {
        let f = &f;
        let others: Vec<_> = rest.iter().map(|x| s.spawn(move || f(x))).collect();
        let mut out = Vec::with_capacity(items.len());
        out.push(f(first));
        out.extend(others.into_iter().map(|h| h.join().expect("share thread")));
        out
    })
}

/// An open version being written. Appends only.
pub struct FileWriter {
    rec: FileRecord,
    label: String,
    buf: Plain,
    size: u64,
    next_index: u64,
    in_flight: usize,
    hashes: BTreeMap<u64, Hash>,
    done: Sender<(u64, Result<ChunkRecord, EngineError>)>,
    results: Receiver<(u64, Result<ChunkRecord, EngineError>)>,
    /// The first failure of a chunk, and whether it was for lack of space or key.
    failed: Option<(String, bool)>,
    /// Size at the last commit.
    committed: Option<u64>,
    /// A commit whose transaction applied but whose flush failed: the catalog names this
    /// version at this size, so it is never discarded, yet it is not durable, so it is not
    /// committed either; the next commit at this size retries only the flush.
    named_unflushed: Option<u64>,
    /// An mtime set (`utimes`, `cp -p`) since the last write, for the next commit to keep;
    /// 0: none, the commit's time is the mtime. Shared with whoever sets it without this
    /// writer's lock ([`FileWriter::mtime_setter`]).
    mtime_set: Arc<AtomicU64>,
}

impl std::fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWriter")
            .field("file", &self.label)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FileWriter {
    pub fn record(&self) -> &FileRecord {
        &self.rec
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_committed(&self) -> bool {
        self.committed == Some(self.size)
    }

    /// The size its last commit (an fsync's, while open) made durable, if any.
    pub fn committed_size(&self) -> Option<u64> {
        self.committed
    }

    /// The file was renamed (within its patient) while this writer is open: its commits take
    /// the new name. A version already committed was moved by [`Engine::rename`].
    pub fn rename(&mut self, engine: &Engine, new_name: &str) -> Result<(), EngineError> {
        engine.catalog.rename_unnamed(&self.rec.id, new_name)?;
        self.rec.name = new_name.to_string();
        self.label = label(&self.rec);
        Ok(())
    }

    /// The version this writer writes.
    pub fn id(&self) -> FileId {
        self.rec.id
    }

    /// Where an mtime set while the file is open goes (seconds since the epoch): the next
    /// commit keeps it, unless a write comes after it, as on a local filesystem.
    pub fn mtime_setter(&self) -> Arc<AtomicU64> {
        self.mtime_set.clone()
    }

    /// Appends `data` at `offset` (the size so far), waiting for the sites whenever
    /// `max_in_flight` chunks of this file are still being stored.
    pub fn write(&mut self, engine: &Engine, offset: u64, data: &[u8]) -> Result<(), EngineError> {
        let mut at = 0;
        loop {
            at += self.write_some(engine, offset + at as u64, &data[at..])?;
            if self.must_wait(engine) {
                self.wait_room(engine)?;
            }
            if at == data.len() {
                return Ok(());
            }
        }
    }

    /// Appends what it can of `data` without waiting for the sites, and returns how much:
    /// everything, unless the chunk buffer filled while `max_in_flight` chunks are being
    /// stored. That full chunk then waits, unsent, for [`FileWriter::wait_room`] (or the next
    /// call, or a commit), and [`FileWriter::must_wait`] says so. For a caller that must not
    /// block where it is (a FUSE request loop, while a slow site holds the uploads).
    pub fn write_some(
        &mut self,
        engine: &Engine,
        offset: u64,
        mut data: &[u8],
    ) -> Result<usize, EngineError> {
        self.check_failed()?;
        self.mtime_set.store(0, Ordering::SeqCst);
        if offset != self.size {
            return Err(EngineError::NotAppend {
                file: self.label.clone(),
                offset,
                size: self.size,
            });
        }
        let chunk_size = engine.cfg.chunk_size;
        // Chunks once this write is cut up (an fsync may have cut one short before).
        let chunks = self.next_index + (self.buf.len() + data.len()).div_ceil(chunk_size) as u64;
        if chunks > engine.cfg.max_chunks {
            return Err(EngineError::TooLarge {
                file: self.label.clone(),
                max: engine.cfg.max_chunks.saturating_mul(chunk_size as u64),
                chunks: engine.cfg.max_chunks,
                chunk_size,
            });
        }
        let len = data.len();
        while !data.is_empty() {
            if self.buf.len() == chunk_size && !self.try_submit(engine)? {
                break;
            }
            let take = (chunk_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            self.size += take as u64;
            data = &data[take..];
        }
        if self.buf.len() == chunk_size {
            self.try_submit(engine)?;
        }
        Ok(len - data.len())
    }

    /// A full chunk waits to be sent: this file has `max_in_flight` chunks being stored, or
    /// the upload workers' queue is full (every file's uploads wait for the sites).
    pub fn must_wait(&self, engine: &Engine) -> bool {
        self.buf.len() == engine.cfg.chunk_size
    }

    /// Waits until the sites have room for the waiting chunk, and sends it.
    pub fn wait_room(&mut self, engine: &Engine) -> Result<(), EngineError> {
        while self.in_flight >= engine.cfg.max_in_flight {
            let r = self.results.recv().expect("sender held by self");
            self.settle(engine, r);
        }
        if self.buf.len() == engine.cfg.chunk_size {
            self.submit(engine)?;
        }
        self.check_failed()
    }

    /// Marks the writer failed (as a failed upload does): every later write, fsync and
    /// close fails with `reason`, and nothing more is committed.
    pub fn fail(&mut self, reason: String) {
        self.failed.get_or_insert((reason, false));
    }

    fn check_failed(&self) -> Result<(), EngineError> {
        match &self.failed {
            Some((reason, no_space)) => Err(EngineError::Failed {
                file: self.label.clone(),
                reason: reason.clone(),
                no_space: *no_space,
            }),
            None => Ok(()),
        }
    }

    /// Sends the chunk buffer to the upload workers, waiting for room in their queue.
    fn submit(&mut self, engine: &Engine) -> Result<(), EngineError> {
        self.send_chunk(engine, true).map(|_| ())
    }

    /// Sends a full chunk buffer if this file has fewer than `max_in_flight` chunks being
    /// stored and the upload workers' queue has room; else leaves it, and says so.
    fn try_submit(&mut self, engine: &Engine) -> Result<bool, EngineError> {
        if self.in_flight >= engine.cfg.max_in_flight {
            return Ok(false);
        }
        self.send_chunk(engine, false)
    }

    fn send_chunk(&mut self, engine: &Engine, wait: bool) -> Result<bool, EngineError> {
        let data = std::mem::replace(&mut self.buf, Plain::new(Vec::new()));
        let job = UploadJob {
            file: self.rec.id,
            leaf: self.rec.leaf,
            label: self.label.clone(),
            index: self.next_index,
            offset: self.size - data.len() as u64,
            data,
            done: self.done.clone(),
        };
        let tx = engine.uploads.lock().expect("uploads").clone();
        if wait {
            tx.send(job)
                .expect("upload workers run for the engine's life");
        } else if let Err(e) = tx.try_send(job) {
            match e {
                mpsc::TrySendError::Full(job) => {
                    self.buf = job.data;
                    return Ok(false);
                }
                mpsc::TrySendError::Disconnected(_) => {
                    panic!("upload workers run for the engine's life")
                }
            }
        }
        self.buf = Plain::new(engine.core.chunk_bufs.take(engine.cfg.chunk_size));
        self.next_index += 1;
        self.in_flight += 1;
        while let Ok(r) = self.results.try_recv() {
            self.settle(engine, r);
        }
        self.check_failed().map(|()| true)
    }

    fn settle(
        &mut self,
        engine: &Engine,
        (index, result): (u64, Result<ChunkRecord, EngineError>),
    ) {
        self.in_flight -= 1;
        match result.and_then(|c| {
            engine.catalog.put_chunk(&self.rec.id, index, &c)?;
            Ok(c)
        }) {
            Ok(c) => {
                self.hashes.insert(index, c.hash);
            }
            Err(e) => {
                tracing::error!("{e}");
                let no_space = e.errno() == libc::ENOSPC;
                self.failed.get_or_insert_with(|| (e.to_string(), no_space));
            }
        }
    }

    /// Wait for the chunks already handed to the upload pool; report any failure so far.
    /// Commits nothing (see the FLUSH rule in `fuse.rs`).
    pub fn wait_in_flight(&mut self, engine: &Engine) -> Result<(), EngineError> {
        if self.must_wait(engine) {
            self.wait_room(engine)?;
        }
        while self.in_flight > 0 {
            let r = self.results.recv().expect("sender held by self");
            self.settle(engine, r);
        }
        self.check_failed()
    }

    /// Make everything written so far durable at every site and commit it (fsync, close).
    pub fn commit(&mut self, engine: &Engine) -> Result<(), EngineError> {
        if self.is_committed() {
            return Ok(());
        }
        if engine.is_retired(&self.rec.id) {
            // Unlinked (or renamed over) after an earlier commit while still held open: like
            // a Unix file without a name, it takes writes until closed and is never named
            // again; its shares go when its holder lets go (`Engine::reader_closed`).
            while self.in_flight > 0 {
                let r = self.results.recv().expect("sender held by self");
                self.settle(engine, r);
            }
            self.buf.clear();
            self.committed = Some(self.size);
            return Ok(());
        }
        if self.named_unflushed == Some(self.size) {
            // Named at this size already: only its durability is missing.
            engine.catalog.flush()?;
            self.named_unflushed = None;
            self.committed = Some(self.size);
            return Ok(());
        }
        if !self.buf.is_empty() {
            self.submit(engine)?;
        }
        while self.in_flight > 0 {
            let r = self.results.recv().expect("sender held by self");
            self.settle(engine, r);
        }
        self.check_failed()?;
        let leaves: Vec<Hash> = self.hashes.values().copied().collect();
        let root = merkle::root(&leaves);
        let replaced = {
            // The manifest is at every site before the catalog commit: a version the catalog
            // calls committed can always be found by a rebuild.
            // The manifest lock of the version this commit replaces too (if any, as named
            // now): a rewrite of that one's manifest (a chmod of it just before, `cp -p`)
            // then either finishes before this one takes its seq, or finds it retired. Else
            // it could take a later seq than this commit's, and a catalog rebuild would give
            // it the name.
            let replaced = engine
                .catalog
                .file(&self.rec.patient, &self.rec.name)
                .ok()
                .flatten()
                .map(|r| r.id)
                .filter(|id| *id != self.rec.id);
            let _guards = engine.manifest_locks(&self.rec.id, replaced.as_ref());
            let mut rec = engine
                .catalog
                .file_by_id(&self.rec.id)?
                .ok_or_else(|| CatalogError::NotWriting(merkle::hex(&self.rec.id)))?;
            rec.size = self.size;
            rec.mtime = match self.mtime_set.load(Ordering::SeqCst) {
                0 => crate::catalog::now_secs(),
                set => set,
            };
            let chunks = engine.catalog.chunks(&self.rec.id)?;
            if chunks.len() != leaves.len() {
                return Err(EngineError::Store {
                    file: self.label.clone(),
                    chunk: leaves.len() as u64,
                    reason: format!(
                        "{} chunk records in the catalog, {} chunks written",
                        chunks.len(),
                        leaves.len()
                    ),
                    no_space: false,
                });
            }
            engine.put_manifest(&rec, root, &chunks)?;
            match engine
                .catalog
                .commit_at(&self.rec.id, self.size, root, rec.mtime)
            {
                Ok(replaced) => replaced,
                Err(e) => {
                    // Applied but not made durable (the flush failed): the name points at
                    // this version at this size now, so it must not be discarded as a failed
                    // write; nor is it committed, so every later commit fails too until a
                    // flush succeeds. The caller hears of the failure.
                    let named = engine.catalog.named_version(&self.rec.id);
                    if named.is_ok_and(|r| r.is_some_and(|r| r.size == self.size)) {
                        self.named_unflushed = Some(self.size);
                    }
                    return Err(e.into());
                }
            }
        };
        if let Some(old) = replaced {
            engine.retire(&old);
        }
        engine.catalog.audit(
            "write",
            Some(&self.rec.patient),
            Some(&self.rec.name),
            // Not the Merkle root: the audit also goes to the log, and the root of a
            // one-chunk file is a plain SHA-256 of its bytes, which confirms a guess. The
            // catalog's file record keeps it.
            &format!("{} bytes, {} chunks", self.size, leaves.len()),
        );
        self.committed = Some(self.size);
        Ok(())
    }

    /// Drop an uncommitted version (failed write): nothing visible, its shares deleted by the
    /// discarder ([`Engine::wait_discards`] waits for them). Returns whether it was discarded
    /// (not if a commit of it, or one the catalog names, came first). A killed writer of a
    /// whole genome leaves tens of thousands of shares at each site: deleted here, they held
    /// the FUSE request thread that runs the RELEASE for minutes.
    pub fn abort(mut self, engine: &Engine) -> bool {
        while self.in_flight > 0 {
            let r = self.results.recv().expect("sender held by self");
            self.settle(engine, r);
        }
        let discard = self.committed.is_none() && self.named_unflushed.is_none();
        if discard {
            engine.discard_later(self.rec.clone());
        }
        discard
    }
}

type CacheKey = (FileId, u64);

/// Takes a chunk out of the cache's `fetching` set if its fetch panics (a thread that could
/// not be spawned, say): else every later read of the chunk would wait for it for good.
struct Unmark<'a> {
    cache: &'a ChunkCache,
    key: CacheKey,
    armed: bool,
}

impl Drop for Unmark<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = self.cache.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.fetching.remove(&self.key);
            self.cache.ready.notify_all();
        }
    }
}

struct CacheEntry {
    data: Arc<Plain>,
    patient: String,
    used: u64,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<CacheKey, CacheEntry>,
    fetching: HashSet<CacheKey>,
    bytes: usize,
    tick: u64,
}

/// Rebuilt chunks, bounded by bytes, least recently used out first, wiped per patient.
struct ChunkCache {
    inner: Mutex<CacheInner>,
    ready: Condvar,
    budget: usize,
}

impl ChunkCache {
    fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(CacheInner::default()),
            ready: Condvar::new(),
            budget,
        }
    }

    fn contains(&self, key: &CacheKey) -> bool {
        let inner = self.inner.lock().expect("cache");
        inner.map.contains_key(key) || inner.fetching.contains(key)
    }

    /// The cached chunk, or `fetch()`'s (only one fetch per chunk at a time). A fetched chunk
    /// is kept only if `keep()` says so, asked under the cache lock: a consent's end removes
    /// the grant before its wipe takes that lock, so a chunk is either refused here or wiped
    /// there, never left behind.
    fn get_or_fetch(
        &self,
        key: CacheKey,
        patient: &str,
        fetch: impl FnOnce() -> Result<Plain, EngineError>,
        keep: impl FnOnce() -> bool,
    ) -> Result<Arc<Plain>, EngineError> {
        let mut inner = self.inner.lock().expect("cache");
        loop {
            inner.tick += 1;
            let tick = inner.tick;
            if let Some(e) = inner.map.get_mut(&key) {
                e.used = tick;
                return Ok(e.data.clone());
            }
            if !inner.fetching.contains(&key) {
                break;
            }
            inner = self
                .ready
                .wait_timeout(inner, Duration::from_secs(1))
                .expect("cache")
                .0;
        }
        inner.fetching.insert(key);
        drop(inner);
        let started = Instant::now();
        let mut unmark = Unmark {
            cache: self,
            key,
            armed: true,
        };
        let result = fetch();
        unmark.armed = false;
        let mut inner = self.inner.lock().expect("cache");
        inner.fetching.remove(&key);
        self.ready.notify_all();
        let data = Arc::new(result?);
        if data.len() <= self.budget && keep() {
            inner.bytes += data.len();
            let used = inner.tick;
            inner.map.insert(
                key,
                CacheEntry {
                    data: data.clone(),
                    patient: patient.to_string(),
                    used,
                },
            );
            while inner.bytes > self.budget {
                let oldest = inner
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(k, _)| *k)
                    .expect("non-empty while over budget");
                let e = inner.map.remove(&oldest).expect("present");
                inner.bytes -= e.data.len();
            }
        }
        tracing::trace!("fetched chunk in {:?}", started.elapsed());
        Ok(data)
    }

    /// Drop every cached chunk of a patient (the buffers zeroize when their last reader ends).
    fn wipe(&self, patient: &str) {
        let mut inner = self.inner.lock().expect("cache");
        let before = inner.map.len();
        let mut freed = 0;
        inner.map.retain(|_, e| {
            let keep = e.patient != patient;
            if !keep {
                freed += e.data.len();
            }
            keep
        });
        inner.bytes -= freed;
        tracing::info!(
            patient,
            chunks = before - inner.map.len(),
            "wiped cached plaintext"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item runs, results come back in the items' order, the first runs on the calling
    /// thread and the others on their own (a put waiting on a slow site never holds up
    /// another site's put).
    #[test]
    fn in_parallel_runs_all_at_once_in_order_the_first_here() {
        let here = std::thread::current().id();
        let barrier = std::sync::Barrier::new(3);
        let got = in_parallel(&[10, 20, 30], |&x| {
            // All three must be running at once to get past this.
            barrier.wait();
            (x + 1, std::thread::current().id() == here)
        });
        assert_eq!(got, vec![(11, true), (21, false), (31, false)]);
        assert!(in_parallel(&[] as &[u8], |_| ()).is_empty());
    }

    /// Shares fetched under a consent that ended while they were out of the pool (a read
    /// under way when the card was pulled) come back wiped: any k of them rebuild a chunk.
    #[test]
    fn buffers_out_of_the_pool_at_a_wipe_come_back_wiped() {
        let pool = BufPool::new(4, false);
        let before = pool.mark();
        pool.give_since(vec![0xA5; 4096], before);
        let mark = pool.mark();
        let out = pool.pop();
        assert!(
            out.iter().all(|&b| b == 0xA5),
            "not wiped without a wipe_all"
        );
        pool.wipe_all();
        pool.give_since(out, mark);
        let back = pool.pop();
        assert!(
            back.is_empty(),
            "given back after the wipe: wiped and emptied"
        );
        assert!(back.capacity() >= 4096, "and kept for reuse");
        // SAFETY: every byte of the allocation was written (0xA5, then the wipe's zeros).
        let all = unsafe { std::slice::from_raw_parts(back.as_ptr(), 4096) };
        assert!(
            all.iter().all(|&b| b == 0),
            "emptied, but the share's bytes are still in the buffer"
        );
    }

    /// A fetch that panics leaves its chunk to the next reader, who fetches it again, instead
    /// of waiting for it for good.
    #[test]
    fn a_fetch_that_panics_does_not_hold_up_the_chunk() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let key = ([7u8; 16], 3);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = cache.get_or_fetch(key, "P1", || panic!("no thread"), || true);
        }));
        assert!(panicked.is_err());
        let (tx, rx) = mpsc::channel();
        let c = cache.clone();
        std::thread::spawn(move || {
            let got = c.get_or_fetch(key, "P1", || Ok(Plain::new(vec![1, 2, 3])), || true);
            let _ = tx.send(got.map(|p| p.to_vec()));
        });
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the next read of the chunk waited for the panicked fetch");
        assert_eq!(got.unwrap(), vec![1, 2, 3]);
    }

    /// A rebuilt chunk's buffer comes back to its pool wiped, and the next chunk gets it
    /// again as zeros without a second write; a longer chunk than the pool holds gets a
    /// fresh zeroed buffer.
    #[test]
    fn pooled_plaintext_is_wiped_reused_and_handed_out_as_zeros() {
        let pool = Arc::new(BufPool::new(2, true));
        let mut a = Plain::pooled(&pool, 4096);
        assert!(a.iter().all(|&b| b == 0));
        a.fill(0xA5);
        let ptr = a.as_ptr();
        drop(a);
        let b = Plain::pooled(&pool, 1000);
        assert_eq!(b.as_ptr(), ptr, "the buffer is reused");
        assert_eq!(b.len(), 1000);
        assert!(
            b.iter().all(|&x| x == 0),
            "plaintext left in a reused buffer"
        );
        // Its spare capacity was wiped too (what `take_zeroed` relies on).
        assert!(spare_is_zero(&b));
        drop(b);
        let c = Plain::pooled(&pool, 8192);
        assert_eq!(c.len(), 8192);
        assert!(c.iter().all(|&x| x == 0));
    }

    /// Free share buffers hold the last shares fetched (they are not wiped between uses):
    /// when a consent ends they are wiped and let go, so no k shares of a chunk read under it
    /// stay behind in the pool.
    /// A (2,3) engine of 64 KiB chunks over in-memory sites, its catalog at `path`.
    fn mem_engine(path: &std::path::Path) -> Arc<Engine> {
        use crate::sites::{MemSite, ShareSite};
        let catalog = Arc::new(crate::catalog::Catalog::open(path).unwrap());
        let consent = ConsentRegistry::new(catalog.clone());
        let sites: Vec<Arc<dyn ShareSite>> = (0..3)
            .map(|i| Arc::new(MemSite::new(&format!("s{i}"))) as Arc<dyn ShareSite>)
            .collect();
        let cfg = EngineConfig {
            k: 2,
            n: 3,
            chunk_size: 64 << 10,
            readahead: 0,
            ..EngineConfig::default()
        };
        Engine::new(catalog, consent, sites, cfg).unwrap()
    }

    /// A read-ahead fetches a version only while it is open or named: one replaced and then
    /// closed is having its shares deleted.
    #[test]
    fn read_ahead_skips_a_version_neither_open_nor_named() {
        let dir = tempfile::tempdir().unwrap();
        let engine = mem_engine(&dir.path().join("c"));
        engine.catalog.add_patient("P1").unwrap();
        let write = |byte: u8| {
            let mut w = engine.create("P1", "f", 0o644).unwrap();
            w.write(&engine, 0, &[byte; 1000]).unwrap();
            w.commit(&engine).unwrap();
            engine.catalog.file("P1", "f").unwrap().unwrap()
        };
        let old = write(1);
        assert!(engine.still_read(&old), "named");
        engine.reader_opened(&old.id);
        let new = write(2);
        assert!(engine.still_read(&old), "replaced, but held open");
        assert!(engine.still_read(&new));
        engine.reader_closed(&old.id);
        assert!(
            !engine.still_read(&old),
            "replaced and closed: being deleted"
        );
    }

    #[test]
    fn share_buffers_are_let_go_when_a_consent_ends() {
        let dir = tempfile::tempdir().unwrap();
        let engine = mem_engine(&dir.path().join("c"));
        let catalog = engine.catalog.clone();
        catalog.add_patient("P1").unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = engine.create("P1", "f", 0o644).unwrap();
        w.write(&engine, 0, &data).unwrap();
        w.commit(&engine).unwrap();
        let rec = engine.catalog.file("P1", "f").unwrap().unwrap();
        let chunks = engine.catalog.chunks(&rec.id).unwrap();
        engine
            .consent
            .grant("P1", Some(Duration::from_secs(60)), "test");
        let got = engine.read(&rec, &chunks, 0, 100_000).unwrap();
        assert_eq!(&got[..], &data[..100_000]);
        let pooled = || engine.core.share_bufs.bufs.lock().unwrap().len();
        assert!(pooled() >= 2, "the read's shares went back to the pool");
        engine.consent.end("P1", "test");
        assert_eq!(pooled(), 0);
    }

    /// A rebuild's restored seqs, and every manifest written, are kept in the catalog: an
    /// engine opened on it later (a mount after `catalog rebuild`, a restart with the clock
    /// set back) writes manifests that sort after them.
    #[test]
    fn manifest_seqs_go_on_from_the_catalogs_whatever_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let open = || mem_engine(&path);
        let engine = open();
        // A restored manifest written by a clock a day ahead of this one.
        let ahead = engine.next_seq() + 86_400 * 1_000_000_000;
        engine.catalog.raise_manifest_seq(ahead).unwrap();
        engine.catalog.raise_manifest_seq(5).unwrap();
        assert_eq!(
            engine.catalog.manifest_seq().unwrap(),
            ahead,
            "never lowered"
        );
        engine.catalog.flush().unwrap();
        drop(engine);
        let engine = open();
        let next = engine.next_seq();
        assert!(next > ahead, "{next} <= {ahead}");
        // A manifest written now raises it in turn.
        engine.catalog.add_patient("P1").unwrap();
        let mut w = engine.create("P1", "f", 0o644).unwrap();
        w.write(&engine, 0, b"x").unwrap();
        w.commit(&engine).unwrap();
        assert!(engine.catalog.manifest_seq().unwrap() > next);
    }

    /// A commit whose catalog flush fails after its transaction applied: the writer hears
    /// of the failure, but the version its name now points at keeps its shares and reads
    /// back (before, the writer's abort discarded it and the file read as empty).
    #[test]
    fn a_commit_that_applied_but_could_not_flush_is_not_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let engine = mem_engine(&dir.path().join("c"));
        engine.catalog.add_patient("P1").unwrap();
        let old: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let mut w = engine.create("P1", "f", 0o644).unwrap();
        w.write(&engine, 0, &old).unwrap();
        w.commit(&engine).unwrap();
        let new: Vec<u8> = (0..4 * 65_536u32).map(|i| (i % 251) as u8).collect();
        let mut w = engine.create("P1", "f", 0o644).unwrap();
        w.write(&engine, 0, &new).unwrap();
        w.wait_in_flight(&engine).unwrap();
        engine.catalog.fail_flushes();
        assert!(
            w.commit(&engine).is_err(),
            "the writer hears of the failure"
        );
        assert!(
            w.commit(&engine).is_err(),
            "and again at a retry: nothing was made durable"
        );
        assert!(!w.abort(&engine), "not discarded");
        let rec = engine.catalog.file("P1", "f").unwrap().unwrap();
        assert_eq!(
            rec.size,
            new.len() as u64,
            "the name points at the new version"
        );
        let chunks = engine.catalog.chunks(&rec.id).unwrap();
        assert_eq!(chunks.len(), new.len().div_ceil(64 << 10));
        engine
            .consent
            .grant("P1", Some(Duration::from_secs(60)), "test");
        let got = engine.read(&rec, &chunks, 0, new.len()).unwrap();
        assert_eq!(&got[..], &new[..]);
    }

    fn spare_is_zero(p: &Plain) -> bool {
        // SAFETY: bytes of the allocation that `wipe` initialised to zero.
        let all = unsafe { std::slice::from_raw_parts(p.as_ptr(), p.capacity()) };
        all[p.len()..].iter().all(|&x| x == 0)
    }
}
