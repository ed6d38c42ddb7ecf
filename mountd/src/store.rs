//! The share store: extents on a volume, an index in sled, one durable write per share.
//!
//! Commit protocol of a put (see `docs/design.md` ("mountd") for the crash argument):
//! 1. allocate an extent (in memory; the allocator is rebuilt from the index at open);
//! 2. make sure the extent's regions are recorded as open in the index, durably (an index
//!    flush when one is not: once per region of 256 MiB or more, see [`lazy`]);
//! 3. write `[header | share]` with ONE durable write;
//! 4. insert the index entry, and return Ok: the share is durable, and a crash before the
//!    entry's flush leaves it in an open region, where `open` finds it again;
//! 5. the flusher thread flushes the index for all the puts of the last 20 ms at once, then
//!    tombstones and frees the extents they replaced.
//!
//! A replaced extent is recorded in the index's `retiring` tree before the new entry goes in,
//! and the record is dropped only once its header is durably overwritten: `open` finishes any
//! tombstone a crash interrupted, so an older generation never outlives its key in a volume
//! scan (where it would come back in `rebuild-index` after the key is deleted). Deletes still
//! flush the index before they return.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

mod gate;
mod lazy;
use gate::WriteGate;
use lazy::Committer;

use nix::fcntl::{Flock, FlockArg};
use qgenome::catalog::durable::{open_sled, SledSync};

use crate::alloc::{AllocError, Allocator};
use crate::layout::{
    share_sum, IndexEntry, LayoutError, ShareHeader, ShareKey, ShareMeta, Superblock, HEADER_LEN,
    INDEX_ENTRY_LEN, SHARE_KEY_LEN,
};
use crate::volume::{BlockDevice, IoBuf, VolumeError, WriteTimes};

/// Generations are reserved in the index this many at a time, so none is ever reused.
const GEN_BATCH: u64 = 1 << 16;
/// The largest allocation unit `format` gives a volume (64 MiB): `rebuild-index` reads whole
/// units, in requests of at most [`crate::volume::MAX_REQUEST`].
pub const MAX_ALLOC_UNIT: u32 = 64 << 20;
const META_VOLUME_ID: &[u8] = b"volume_id";

/// The id of the volume the index at `index` names, if it can be read and names one (the
/// caller holds the state directory's lock).
pub fn index_volume_id(index: &Path) -> Option<Vec<u8>> {
    let db = open_index(sled::Config::new().path(index)).ok()?;
    let named = db.open_tree("meta").ok()?.get(META_VOLUME_ID).ok()??;
    Some(named.to_vec())
}

/// The retiring records of the index at `index` (replaced shares, and puts refused after
/// their bytes landed, whose headers were still to be zeroed), by offset: what a rebuild must
/// not bring back. A record of its key's live entry is left out: `open` drops such a record
/// (a replace whose insert failed after its record was written), the share being the one
/// acknowledged. Best effort: an index that does not open, or a record that does not decode,
/// gives nothing (a rebuild is for an index that may be damaged).
fn retiring_of(index: &Path) -> Retiring {
    let Some(db) = index
        .exists()
        .then(|| open_index(sled::Config::new().path(index)).ok())
        .flatten()
    else {
        return Retiring::new();
    };
    match (db.open_tree("retiring"), db.open_tree("shares")) {
        (Ok(retiring), Ok(shares)) => retiring_records(&retiring, &shares),
        _ => Retiring::new(),
    }
}

/// Retiring records by offset, as a volume scan takes them ([`scan`]).
type Retiring = std::collections::BTreeMap<u64, (ShareKey, IndexEntry)>;

/// The records of `retiring` that are not their key's live entry in `shares` (see
/// [`retiring_of`]), by offset. Best effort: one that cannot be read or decoded is left out
/// (`open` reports it, in `finish_retiring`).
fn retiring_records(retiring: &sled::Tree, shares: &sled::Tree) -> Retiring {
    let mut out = Retiring::new();
    for (_, record) in retiring.iter().flatten() {
        let Ok((key, e)) = decode_retiring(&record) else {
            continue;
        };
        let live = shares
            .get(key.encode())
            .ok()
            .flatten()
            .and_then(|v| IndexEntry::decode(&v).ok());
        if live != Some(e) {
            out.insert(e.offset, (key, e));
        }
    }
    out
}

const META_GEN_RESERVED: &[u8] = b"gen_reserved";
/// This index's tag (u32 LE, nonzero): `Superblock::index_tag` names the volume's index.
const META_INDEX_TAG: &[u8] = b"index_tag";

/// Errors from the store; each names the site, volume, index directory or share at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("volume {path}: no superblock ({source}); format it first")]
    NoSuperblock { path: PathBuf, source: LayoutError },
    /// A superblock is there but cannot be used: damaged, of another format version, or
    /// for another sector size. Its shares may all be intact.
    #[error("volume {path}: its superblock cannot be used ({source}); the shares after it may be intact: do not format it unless they are to be discarded")]
    BadSuperblock { path: PathBuf, source: LayoutError },
    #[error("volume {path}: cannot format: {source}")]
    Format { path: PathBuf, source: LayoutError },
    #[error("volume {path}: superblock says {volume_len} bytes but the device has {device_len}")]
    DeviceShrank {
        path: PathBuf,
        volume_len: u64,
        device_len: u64,
    },
    #[error("index {dir}: {source}")]
    Index { dir: PathBuf, source: sled::Error },
    #[error("index {dir} is in use by another process (a qgenome-mountd serving this site, or a rebuild-index or format of it); stop that first")]
    InUse { dir: PathBuf },
    #[error("index {dir}: cannot prepare the state directory: {source}")]
    StateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("index {dir} belongs to volume {found}, not to {volume} (volume id {expected})")]
    StateMismatch {
        dir: PathBuf,
        volume: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "index {dir}: no share index there for volume {volume} (site {site}), which holds \
         shares; refusing to serve it as empty. Check state_dir; if the index is lost, \
         rebuild it from the volume: qgenome-mountd rebuild-index --volume {volume} --state {dir}"
    )]
    NoIndex {
        dir: PathBuf,
        volume: PathBuf,
        site: String,
    },
    #[error(
        "index {dir} is not the index of volume {volume} (site {site}): the volume's shares \
         were written through another index since (a stale or copied state directory?); \
         refusing it. Use the volume's state_dir, or rebuild the index from the volume: \
         qgenome-mountd rebuild-index --volume {volume} --state {dir}"
    )]
    StaleIndex {
        dir: PathBuf,
        volume: PathBuf,
        site: String,
    },
    #[error("index {dir}: cannot start the thread that flushes it: {source}")]
    Flusher {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("index {dir} is corrupt: {reason}")]
    CorruptIndex { dir: PathBuf, reason: String },
    #[error("site {site}: volume {volume} full: {key} needs {needed} bytes, {free} free (largest free extent {largest_free})")]
    VolumeFull {
        site: String,
        volume: PathBuf,
        key: ShareKey,
        needed: u64,
        free: u64,
        largest_free: u64,
    },
    #[error("site {site}: no share file {key}")]
    NotFound { site: String, key: ShareKey },
    #[error("site {site}: share file {key} is damaged: {reason}")]
    Damaged {
        site: String,
        key: ShareKey,
        reason: String,
    },
    #[error("site {site}: refused share file {key}: {reason}")]
    InvalidShare {
        site: String,
        key: ShareKey,
        reason: String,
    },
}

/// Options for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The largest share accepted.
    pub max_share_len: u64,
    /// sled's page cache.
    pub index_cache_bytes: u64,
    /// Share writes at the volume at once (at least 1); more puts wait for a place, in the
    /// order they came, with the rest of their work done beside the writes ([`gate`]).
    pub write_depth: usize,
}

/// [`StoreOptions::write_depth`] unless set: the depth at which this VM's disk writes at full
/// speed (docs/design.md, "The volume's write depth").
pub const DEFAULT_WRITE_DEPTH: usize = 4;

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_share_len: 64 << 20,
            index_cache_bytes: 64 << 20,
            write_depth: DEFAULT_WRITE_DEPTH,
        }
    }
}

/// Options for [`Store::format`].
#[derive(Debug, Clone, Default)]
pub struct FormatOptions {
    /// Allocation unit in bytes (default: the block size).
    pub alloc_unit: Option<u32>,
}

/// A share read back and verified. The bytes stay in the aligned buffer they were read into.
pub struct ShareData {
    pub key: ShareKey,
    pub meta: ShareMeta,
    pub generation: u64,
    buf: IoBuf,
    start: usize,
    len: usize,
}

impl ShareData {
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }

    /// The share bytes, to be sealed where they lie before they are sent.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut_slice()[self.start..self.start + self.len]
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes().to_vec()
    }
}

impl fmt::Debug for ShareData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareData")
            .field("key", &self.key)
            .field("meta", &self.meta)
            .field("generation", &self.generation)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// A share as the index placed it when [`Store::locate`] looked: what
/// [`Store::read_located`] reads.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    key: ShareKey,
    entry: IndexEntry,
    read_len: usize,
}

impl Located {
    /// Bytes the read holds in memory (the share with its header block and padding).
    pub fn read_len(&self) -> usize {
        self.read_len
    }
}

/// A buffer to fill with share bytes and hand to [`Store::put_buf`] (no copy on the way).
pub struct ShareBuf {
    buf: IoBuf,
    start: usize,
    len: usize,
    /// The share's sum, given by whoever filled the buffer ([`ShareBuf::set_sum`]).
    sum: Option<[u8; 16]>,
}

impl ShareBuf {
    pub fn as_slice(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }

    /// The share's bytes, to fill. Forgets a sum set before: it may no longer be theirs.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.sum = None;
        &mut self.buf.as_mut_slice()[self.start..self.start + self.len]
    }

    /// The [`share_sum`] of the bytes as filled, computed while they were written here
    /// ([`crate::layout::ShareSummer`]), so that [`Store::put_buf`] need not read the whole
    /// share again. Trusted as given; forgotten by any later [`ShareBuf::as_mut_slice`].
    pub fn set_sum(&mut self, sum: [u8; 16]) {
        self.sum = Some(sum);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for ShareBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Successful puts and the time they took, summed ([`Store::put_times`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutTimes {
    pub puts: u64,
    /// In [`Store::put_buf`], from its call to its return.
    pub store_ns: u64,
    /// Of that, waiting for a place among the writes at the volume
    /// ([`StoreOptions::write_depth`]).
    pub write_queue_ns: u64,
    /// The volume's durable writes (the puts', and any other: tombstones, retires).
    pub volume: WriteTimes,
}

impl PutTimes {
    /// What was added since `before`.
    pub fn since(&self, before: &PutTimes) -> PutTimes {
        PutTimes {
            puts: self.puts - before.puts,
            store_ns: self.store_ns - before.store_ns,
            write_queue_ns: self.write_queue_ns - before.write_queue_ns,
            volume: self.volume.since(&before.volume),
        }
    }
}

/// The health the store reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Ok,
    /// Some read since open failed verification; run a scrub.
    Damaged,
}

/// Capacity and usage.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreStat {
    pub site: String,
    pub volume_id: String,
    pub capacity: u64,
    pub free: u64,
    pub largest_free: u64,
    pub shares: u64,
    pub damaged_reads: u64,
    pub health: Health,
}

/// A damaged share found by [`Store::scrub`].
#[derive(Debug, Clone)]
pub struct Damage {
    pub key: ShareKey,
    pub offset: u64,
    pub reason: String,
}

/// What a scrub read and found.
#[derive(Debug, Clone, Default)]
pub struct ScrubReport {
    pub checked: u64,
    pub bytes: u64,
    pub damaged: Vec<Damage>,
}

/// What [`Store::rebuild_index`] found on the volume.
#[derive(Debug, Clone, Default)]
pub struct RebuildReport {
    pub scanned_bytes: u64,
    pub shares: u64,
    /// Older generations of a key also found on the volume, and shares the previous index
    /// had recorded as retiring: not indexed, and recorded as retiring in the new index, so
    /// that the next start zeroes their headers (as after a replace).
    pub superseded: u64,
    /// Valid headers whose share bytes failed checksum (torn or damaged; not indexed).
    pub torn: u64,
    /// Where the previous index was moved, if there was one.
    pub old_index: Option<PathBuf>,
    /// The highest generation in any valid header (the new index reserves above it).
    pub max_generation_seen: u64,
}

struct Gens {
    next: u64,
    reserved: u64,
}

/// The share store of one site on one volume.
pub struct Store<D: BlockDevice> {
    /// What puts, deletes and the index flusher thread share.
    c: Arc<Committer<D>>,
    /// The index flusher (see [`lazy`]), stopped and joined on drop.
    flusher: Option<std::thread::JoinHandle<()>>,
    sb: Superblock,
    dir: PathBuf,
    shares: sled::Tree,
    meta: sled::Tree,
    gens: Mutex<Gens>,
    damaged_reads: AtomicU64,
    opts: StoreOptions,
    /// This index's tag (`Superblock::index_tag`).
    index_tag: u32,
    /// The volume's superblock names this index (its `index_tag` is ours).
    tagged: AtomicBool,
    /// Held while the superblock is rewritten with our tag.
    tagging: Mutex<()>,
    /// Valid shares the open regions held that the index lacked, found by `open`.
    recovered: u64,
    /// Puts that succeeded, the nanoseconds they took, and those they waited at the gate
    /// ([`Store::put_times`]).
    put_clock: [AtomicU64; 3],
    /// The share writes let through to the volume at once.
    gate: WriteGate,
    /// The state directory's lock, held while the store is open (dropped last).
    _state_lock: Flock<std::fs::File>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The volume's superblock, checked against the device's size.
pub fn read_superblock<D: BlockDevice>(dev: &D) -> Result<Superblock, StoreError> {
    let len = (dev.alignment().step() as usize).max(4096);
    let buf = dev.read_at(dev.alloc_buf(len), 0)?;
    let sb = Superblock::decode(buf.as_slice()).map_err(|source| match source {
        LayoutError::BadMagic { .. } => StoreError::NoSuperblock {
            path: dev.path().to_path_buf(),
            source,
        },
        source => StoreError::BadSuperblock {
            path: dev.path().to_path_buf(),
            source,
        },
    })?;
    if sb.volume_len > dev.size() {
        return Err(StoreError::DeviceShrank {
            path: dev.path().to_path_buf(),
            volume_len: sb.volume_len,
            device_len: dev.size(),
        });
    }
    if sb.block_size % dev.alignment().offset != 0 {
        return Err(StoreError::BadSuperblock {
            path: dev.path().to_path_buf(),
            source: LayoutError::Invalid {
                field: "block size",
                reason: format!(
                    "{} is not a multiple of the device alignment {}",
                    sb.block_size,
                    dev.alignment().offset
                ),
            },
        });
    }
    Ok(sb)
}

/// Rewrite block 0 with `sb` (one durable write of one block, the superblock in its first
/// 160 bytes: within the first sector).
fn write_superblock<D: BlockDevice>(dev: &D, sb: &Superblock) -> Result<(), StoreError> {
    let mut buf = dev.alloc_buf(sb.block_size as usize);
    buf.as_mut_slice().fill(0);
    buf.as_mut_slice()[..crate::layout::SUPERBLOCK_LEN].copy_from_slice(&sb.encode());
    dev.write_at(buf, 0, true)?;
    Ok(())
}

/// Durably overwrites the header block of the extent at `offset` with zeros, so that no
/// volume scan (`rebuild-index`) sees a share there again: for a delete, a replace, and the
/// older generations a rebuild finds.
fn tombstone<D: BlockDevice>(dev: &D, sb: &Superblock, offset: u64) -> Result<(), VolumeError> {
    dev.write_at(dev.alloc_buf(sb.block_size as usize), offset, true)?;
    Ok(())
}

/// A retiring record: the share key, then the index entry its replaced extent had.
fn retiring_record(key: &ShareKey, e: &IndexEntry) -> [u8; SHARE_KEY_LEN + INDEX_ENTRY_LEN] {
    let mut r = [0u8; SHARE_KEY_LEN + INDEX_ENTRY_LEN];
    r[..SHARE_KEY_LEN].copy_from_slice(&key.encode());
    r[SHARE_KEY_LEN..].copy_from_slice(&e.encode());
    r
}

/// The key and replaced entry of a [`retiring_record`]; the reason if it is not one.
fn decode_retiring(record: &[u8]) -> Result<(ShareKey, IndexEntry), String> {
    if record.len() != SHARE_KEY_LEN + INDEX_ENTRY_LEN {
        return Err(format!("{} bytes", record.len()));
    }
    let key = ShareKey::decode(&record[..SHARE_KEY_LEN]).map_err(|e| e.to_string())?;
    let e = IndexEntry::decode(&record[SHARE_KEY_LEN..]).map_err(|e| e.to_string())?;
    Ok((key, e))
}

/// Finishes the tombstones a crash interrupted (see the module's commit protocol). For each
/// retiring record whose extent is no longer its key's entry, the extent's header is durably
/// overwritten if it is still the replaced one (if the extent was reused since, its header is
/// another share's and stays); then the record goes. Returns how many headers it overwrote,
/// and the extents of the records it had to keep (their zeroing failed): those stay allocated
/// until a later delete or start finishes them, so no new share is written where a retry would
/// zero it.
fn finish_retiring<D: BlockDevice>(
    dev: &D,
    sb: &Superblock,
    dir: &Path,
    shares: &sled::Tree,
    retiring: &sled::Tree,
) -> Result<(u64, Vec<IndexEntry>), StoreError> {
    let ix = |source| StoreError::Index {
        dir: dir.to_path_buf(),
        source,
    };
    let bs = sb.block_size as usize;
    let mut finished = 0;
    let mut kept = Vec::new();
    for item in retiring.iter() {
        let (at, record) = item.map_err(ix)?;
        let corrupt = |reason: String| StoreError::CorruptIndex {
            dir: dir.to_path_buf(),
            reason: format!("retiring record {}: {reason}", hex(&at)),
        };
        let (key, e) = decode_retiring(&record).map_err(corrupt)?;
        if e.offset < sb.data_start
            || e.offset
                .checked_add(bs as u64)
                .is_none_or(|end| end > sb.volume_len)
        {
            return Err(corrupt(format!(
                "offset {} outside the data area",
                e.offset
            )));
        }
        let live = shares
            .get(key.encode())
            .map_err(ix)?
            .and_then(|v| IndexEntry::decode(&v).ok());
        if live != Some(e) {
            let done = (|| -> Result<bool, StoreError> {
                let header = dev.read_at(dev.alloc_buf(bs), e.offset)?;
                if ShareHeader::decode(header.as_slice())
                    .is_ok_and(|h| e.matches(&h, &key, &sb.volume_id))
                {
                    tombstone(dev, sb, e.offset)?;
                    return Ok(true);
                }
                Ok(false)
            })();
            match done {
                Ok(true) => finished += 1,
                Ok(false) => {}
                // A superseded share is no reason to keep the site down: the record stays
                // for the next start (its exact header check makes a retry safe even once
                // the extent is reused).
                Err(err) => {
                    tracing::warn!(site = %sb.site, "{key}: zeroing the header of the share it replaced at {}: {err}; the extent stays allocated, retried at the key's delete and at the next start", e.offset);
                    kept.push(e);
                    continue;
                }
            }
        }
        retiring.remove(at).map_err(ix)?;
    }
    Ok((finished, kept))
}

/// Whether `offset..offset+len` overlaps one of `live` (sorted by offset, disjoint).
fn overlaps_live(live: &[(u64, u64)], offset: u64, len: u64) -> bool {
    let after = live.partition_point(|&(o, _)| o < offset + len);
    after > 0 && {
        let (o, l) = live[after - 1];
        o + l > offset
    }
}

/// An exclusive lock on `dir/lock`, held by whoever has the index open: a second process on
/// the same index (a daemon, `rebuild-index`, `format`) is refused instead of working beside
/// the first, whose commits would go into an index moved aside or replaced under it.
pub fn lock_state_dir(dir: &Path) -> Result<Flock<std::fs::File>, StoreError> {
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StoreError::StateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| match e {
        nix::errno::Errno::EWOULDBLOCK => StoreError::InUse {
            dir: dir.to_path_buf(),
        },
        e => StoreError::StateDir {
            dir: dir.to_path_buf(),
            source: e.into(),
        },
    })
}

/// A random nonzero index tag.
fn new_index_tag() -> std::io::Result<u32> {
    loop {
        let mut b = [0u8; 4];
        getrandom::getrandom(&mut b).map_err(std::io::Error::other)?;
        let t = u32::from_le_bytes(b);
        if t != 0 {
            return Ok(t);
        }
    }
}

impl<D: BlockDevice> Store<D> {
    /// Writes a fresh superblock (new random volume id) to `dev`. Existing shares become
    /// unreachable; a previous index no longer matches the volume and is refused at open.
    pub fn format(dev: &D, site: &str, opts: &FormatOptions) -> Result<Superblock, StoreError> {
        let mut volume_id = [0u8; 16];
        getrandom::getrandom(&mut volume_id).map_err(|e| StoreError::Format {
            path: dev.path().to_path_buf(),
            source: LayoutError::Invalid {
                field: "volume id",
                reason: e.to_string(),
            },
        })?;
        let sb = Self::superblock_for(dev, site, opts, volume_id)?;
        let block = sb.block_size;
        let mut buf = dev.alloc_buf(block as usize);
        buf.as_mut_slice()[..crate::layout::SUPERBLOCK_LEN].copy_from_slice(&sb.encode());
        dev.write_at(buf, 0, true)?;
        Ok(sb)
    }

    /// Checks what [`Store::format`] would check (the site name, the allocation unit, the
    /// device's size and alignment) and writes nothing: for a caller that must know the
    /// format will go through before it discards anything.
    pub fn check_format(dev: &D, site: &str, opts: &FormatOptions) -> Result<(), StoreError> {
        Self::superblock_for(dev, site, opts, [0; 16]).map(drop)
    }

    fn superblock_for(
        dev: &D,
        site: &str,
        opts: &FormatOptions,
        volume_id: [u8; 16],
    ) -> Result<Superblock, StoreError> {
        let block = dev.alignment().step().max(4096).next_power_of_two();
        let au = opts.alloc_unit.unwrap_or(block);
        let format_error = |source| StoreError::Format {
            path: dev.path().to_path_buf(),
            source,
        };
        // A rebuild reads the volume a window of whole units at a time, in single requests.
        if au > MAX_ALLOC_UNIT {
            return Err(format_error(LayoutError::Invalid {
                field: "allocation unit",
                reason: format!("{au} bytes (at most {MAX_ALLOC_UNIT})"),
            }));
        }
        Superblock::new(volume_id, site, block, au, dev.size(), now_secs()).map_err(format_error)
    }

    /// Opens the store on a formatted volume with its index in `state_dir`. The free space is
    /// recomputed from the index.
    ///
    /// An index is created only for a volume to which no share was written since format (its
    /// superblock's `index_tag` is 0). Once one was, the volume is opened only with the index
    /// its superblock names: without an index (`NoIndex`) or with another one (`StaleIndex`)
    /// it is refused, naming the directory and suggesting `rebuild-index`, never served as
    /// empty.
    pub fn open(dev: D, state_dir: &Path, opts: StoreOptions) -> Result<Self, StoreError> {
        let sb = read_superblock(&dev)?;
        let dir = state_dir.to_path_buf();
        let no_index = || StoreError::NoIndex {
            dir: dir.clone(),
            volume: dev.path().to_path_buf(),
            site: sb.site.clone(),
        };
        if sb.index_tag != 0 && !dir.join("index").exists() {
            return Err(no_index());
        }
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::StateDir {
            dir: dir.clone(),
            source,
        })?;
        let state_lock = lock_state_dir(&dir)?;
        let ix = |source| StoreError::Index {
            dir: dir.clone(),
            source,
        };
        let db = open_index(
            sled::Config::new()
                .path(dir.join("index"))
                .cache_capacity(opts.index_cache_bytes),
        )
        .map_err(ix)?;
        let sync = SledSync::open(&dir.join("index")).map_err(|e| ix(sled::Error::Io(e)))?;
        let shares = db.open_tree("shares").map_err(ix)?;
        let meta = db.open_tree("meta").map_err(ix)?;
        let retiring = db.open_tree("retiring").map_err(ix)?;
        match meta.get(META_VOLUME_ID).map_err(ix)? {
            Some(v) if v.as_ref() == sb.volume_id => {}
            Some(v) => {
                return Err(StoreError::StateMismatch {
                    dir,
                    volume: dev.path().to_path_buf(),
                    expected: hex(&sb.volume_id),
                    found: hex(&v),
                })
            }
            None => {
                if !shares.is_empty() {
                    return Err(StoreError::CorruptIndex {
                        dir,
                        reason: "shares without a volume id".into(),
                    });
                }
                if sb.index_tag != 0 {
                    return Err(no_index());
                }
                meta.insert(META_VOLUME_ID, &sb.volume_id[..]).map_err(ix)?;
            }
        }
        let tag = match meta.get(META_INDEX_TAG).map_err(ix)? {
            Some(v) => Some(u32::from_le_bytes(v.as_ref().try_into().map_err(|_| {
                StoreError::CorruptIndex {
                    dir: dir.clone(),
                    reason: "index tag is not 4 bytes".into(),
                }
            })?)),
            None => None,
        };
        let index_tag = match tag {
            Some(t) if sb.index_tag == 0 || t == sb.index_tag => t,
            None if sb.index_tag == 0 => {
                // An index made before tags existed, or just now.
                let t = new_index_tag().map_err(|e| StoreError::StateDir {
                    dir: dir.clone(),
                    source: e,
                })?;
                meta.insert(META_INDEX_TAG, &t.to_le_bytes()).map_err(ix)?;
                t
            }
            _ => {
                return Err(StoreError::StaleIndex {
                    dir,
                    volume: dev.path().to_path_buf(),
                    site: sb.site.clone(),
                })
            }
        };
        let mut live = Vec::new();
        for item in shares.iter() {
            let (k, v) = item.map_err(ix)?;
            let corrupt = |e: LayoutError| StoreError::CorruptIndex {
                dir: dir.clone(),
                reason: e.to_string(),
            };
            let key = ShareKey::decode(&k).map_err(corrupt)?;
            let e = IndexEntry::decode(&v).map_err(|e| StoreError::CorruptIndex {
                dir: dir.clone(),
                reason: format!("entry of {key}: {e}"),
            })?;
            // Reads size their buffers from share_len: a damaged one must stop here, not
            // make a GET allocate whatever it says.
            if e.share_len == 0
                || e.share_len > sb.volume_len
                || sb.extent_len(e.share_len) != e.extent_len
            {
                return Err(StoreError::CorruptIndex {
                    dir: dir.clone(),
                    reason: format!(
                        "entry of {key}: a share of {} bytes does not fill an extent of {}",
                        e.share_len, e.extent_len
                    ),
                });
            }
            live.push((e.offset, e.extent_len));
        }
        // Shares acknowledged before a crash whose entries were not flushed: indexed before
        // the tombstones are finished (what they replace gets a record) and the allocator
        // is built.
        let open_regions = db.open_tree(lazy::OPEN_TREE).map_err(ix)?;
        let recovered = recover_open_regions(
            &dev,
            &sb,
            &dir,
            &shares,
            &retiring,
            &open_regions,
            &mut live,
        )?;
        // Before the allocator: an extent whose tombstone cannot be finished now stays
        // allocated to its record. If a live share overlaps it (an index from before this
        // rule, which let such an extent be reused), the live share owns the space and its
        // header: the record goes, unfinished, since there is nothing of the old share left.
        let (finished, kept) = finish_retiring(&dev, &sb, &dir, &shares, &retiring)?;
        if finished > 0 {
            tracing::info!(site = %sb.site, finished, "finished tombstones of replaced shares interrupted by a crash");
        }
        live.sort_unstable();
        let mut reserved_for_records = Vec::new();
        for e in kept {
            if overlaps_live(&live, e.offset, e.extent_len) {
                retiring.remove(e.offset.to_be_bytes()).map_err(ix)?;
            } else {
                reserved_for_records.push((e.offset, e.extent_len));
            }
        }
        live.extend(reserved_for_records);
        let alloc =
            Allocator::from_live(sb.data_start, sb.volume_len, u64::from(sb.alloc_unit), live)
                .map_err(|e: AllocError| StoreError::CorruptIndex {
                    dir: dir.clone(),
                    reason: e.to_string(),
                })?;
        // Generations below the stored reservation may have been used before a crash: skip them.
        let reserved =
            match meta.get(META_GEN_RESERVED).map_err(ix)? {
                Some(v) => u64::from_le_bytes(v.as_ref().try_into().map_err(|_| {
                    StoreError::CorruptIndex {
                        dir: dir.clone(),
                        reason: "generation reservation is not 8 bytes".into(),
                    }
                })?),
                None => 1,
            };
        let next = reserved;
        let reserved = next + GEN_BATCH;
        meta.insert(META_GEN_RESERVED, &reserved.to_le_bytes())
            .map_err(ix)?;
        sync.flush(&db).map_err(ix)?;
        let has_shares = !shares.is_empty();
        let c = Arc::new(Committer::new(
            dev,
            sb.clone(),
            dir.clone(),
            db,
            sync,
            retiring,
            open_regions,
            alloc,
        ));
        let flusher = {
            let c = Arc::clone(&c);
            std::thread::Builder::new()
                .name("qgenome-index".into())
                .spawn(move || c.run())
                .map_err(|source| StoreError::Flusher {
                    dir: dir.clone(),
                    source,
                })?
        };
        let store = Self {
            _state_lock: state_lock,
            index_tag,
            tagged: AtomicBool::new(sb.index_tag == index_tag),
            tagging: Mutex::new(()),
            c,
            flusher: Some(flusher),
            sb,
            dir,
            shares,
            meta,
            gens: Mutex::new(Gens { next, reserved }),
            damaged_reads: AtomicU64::new(0),
            recovered,
            put_clock: Default::default(),
            gate: WriteGate::new(opts.write_depth),
            opts,
        };
        // A volume whose shares were written before index tags existed: tag it now.
        if has_shares {
            store.tag_volume()?;
        }
        Ok(store)
    }

    /// Name this index in the volume's superblock (durably, once): from then on the volume
    /// is only opened with it.
    fn tag_volume(&self) -> Result<(), StoreError> {
        if self.tagged.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = lock(&self.tagging);
        if self.tagged.load(Ordering::Acquire) {
            return Ok(());
        }
        write_superblock(
            &self.c.dev,
            &Superblock {
                index_tag: self.index_tag,
                ..self.sb.clone()
            },
        )?;
        self.tagged.store(true, Ordering::Release);
        Ok(())
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn site(&self) -> &str {
        &self.sb.site
    }

    pub fn device(&self) -> &D {
        &self.c.dev
    }

    fn ix(&self, source: sled::Error) -> StoreError {
        StoreError::Index {
            dir: self.dir.clone(),
            source,
        }
    }

    fn key_lock(&self, key: &ShareKey) -> &RwLock<()> {
        self.c.key_lock(key)
    }

    fn next_generation(&self) -> Result<u64, StoreError> {
        let mut g = lock(&self.gens);
        if g.next >= g.reserved {
            let reserved = g.reserved + GEN_BATCH;
            self.meta
                .insert(META_GEN_RESERVED, &reserved.to_le_bytes())
                .map_err(|e| self.ix(e))?;
            self.c.sync.flush(&self.c.db).map_err(|e| self.ix(e))?;
            g.reserved = reserved;
        }
        g.next += 1;
        Ok(g.next - 1)
    }

    /// Group commit: returns once an index flush that started after the caller's inserts (made
    /// before this call) has finished.
    fn commit(&self) -> Result<(), StoreError> {
        self.c.commit()
    }

    fn invalid(&self, key: ShareKey, reason: impl Into<String>) -> StoreError {
        StoreError::InvalidShare {
            site: self.sb.site.clone(),
            key,
            reason: reason.into(),
        }
    }

    /// A buffer for a share of `len` bytes, to be filled and passed to [`Store::put_buf`].
    ///
    /// Only the share range is left to the caller; the header block and the padding after the
    /// share are zeroed here (the rest of the buffer is not cleared first: it is all written).
    pub fn share_buf(&self, len: usize) -> ShareBuf {
        let write_len = self.sb.write_len(len as u64) as usize;
        let start = self.sb.block_size as usize;
        let mut buf = self.c.dev.alloc_buf_dirty(write_len);
        let b = buf.as_mut_slice();
        b[..start].fill(0);
        b[start + len..].fill(0);
        ShareBuf {
            buf,
            start,
            len,
            sum: None,
        }
    }

    /// Stores a share; durable (and readable after any crash) once this returns Ok. Putting an
    /// existing key replaces it atomically: readers see the old or the new share, never a mix.
    pub fn put(&self, key: ShareKey, meta: ShareMeta, data: &[u8]) -> Result<(), StoreError> {
        let mut b = self.share_buf(data.len());
        b.as_mut_slice().copy_from_slice(data);
        self.put_buf(key, meta, b)
    }

    /// [`Store::put`] from a buffer obtained with [`Store::share_buf`].
    pub fn put_buf(
        &self,
        key: ShareKey,
        meta: ShareMeta,
        share: ShareBuf,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let queued = self.put_share(key, meta, share)?;
        self.put_clock[0].fetch_add(1, Ordering::Relaxed);
        crate::volume::add_nanos(&self.put_clock[1], started.elapsed());
        crate::volume::add_nanos(&self.put_clock[2], queued);
        Ok(())
    }

    /// How many puts succeeded, and where their time went, since the store was opened: what
    /// `qgenome-mountd bench` shows of a put's time in the store.
    pub fn put_times(&self) -> PutTimes {
        PutTimes {
            puts: self.put_clock[0].load(Ordering::Relaxed),
            store_ns: self.put_clock[1].load(Ordering::Relaxed),
            write_queue_ns: self.put_clock[2].load(Ordering::Relaxed),
            volume: self.c.dev.write_times(),
        }
    }

    /// [`Store::put_buf`]'s work; returns how long the put waited at the gate.
    fn put_share(
        &self,
        key: ShareKey,
        meta: ShareMeta,
        share: ShareBuf,
    ) -> Result<std::time::Duration, StoreError> {
        meta.validate(&key)
            .map_err(|e| self.invalid(key, e.to_string()))?;
        let len = share.len as u64;
        if len == 0 || len > self.opts.max_share_len {
            return Err(self.invalid(
                key,
                format!("{len} bytes (allowed 1..={})", self.opts.max_share_len),
            ));
        }
        if share.start != self.sb.block_size as usize
            || share.buf.len() as u64 != self.sb.write_len(len)
        {
            return Err(self.invalid(key, "buffer not from share_buf of this store"));
        }
        // A volume that refuses durable writes (a failed flush) gets no allocation either;
        // nor does an index whose sync failed (its commit would refuse the put only after
        // the share took an extent, for good, and became readable).
        if let Some(e) = self.c.dev.durable_writes_refused() {
            return Err(e.into());
        }
        self.c.check()?;
        // Before the first share reaches the volume, the volume names this index.
        self.tag_volume()?;
        let write_lock = || {
            self.key_lock(&key)
                .write()
                .unwrap_or_else(|e| e.into_inner())
        };
        let mut _guard = write_lock();
        let extent_len = self.sb.extent_len(len);
        let mut settled = false;
        let offset = loop {
            let mut a = lock(&self.c.alloc);
            if let Some(offset) = a.allocate(extent_len) {
                break offset;
            }
            // Extents replaced by puts acknowledged in the last moments are freed by the
            // flusher: once, settle them and try again (without the key's lock, which the
            // flusher's retires take).
            if !settled && self.c.retires_waiting() {
                drop(a);
                drop(_guard);
                self.c.settle()?;
                _guard = write_lock();
                settled = true;
                continue;
            }
            return Err(StoreError::VolumeFull {
                site: self.sb.site.clone(),
                volume: self.c.dev.path().to_path_buf(),
                key,
                needed: extent_len,
                free: a.free_bytes(),
                largest_free: a.largest_free(),
            });
        };
        // Until the index entry is inserted, a failure gives the extent back.
        let release = |e: StoreError| {
            lock(&self.c.alloc).free(offset, extent_len);
            e
        };
        let generation = self.next_generation().map_err(release)?;
        // The extent's regions are durably open before a byte of it is written: a crash
        // before the index entry below is flushed leaves the share for `open` to find there.
        let regions = self.c.enter(offset, extent_len).map_err(release)?;
        let mut buf = share.buf;
        let start = share.start;
        let header = ShareHeader {
            volume_id: self.sb.volume_id,
            key,
            meta,
            share_len: len,
            generation,
            extent_len,
            share_sum: {
                let bytes = &buf.as_slice()[start..start + share.len];
                let sum = share.sum.unwrap_or_else(|| share_sum(bytes));
                debug_assert_eq!(
                    sum,
                    share_sum(bytes),
                    "{key}: the sum set is not the share's"
                );
                sum
            },
        };
        buf.as_mut_slice()[..HEADER_LEN].copy_from_slice(&header.encode());
        let entry = IndexEntry::from_header(&header, offset);
        // Once the share's write was issued, its header may be valid on the volume: a failure
        // from then on zeroes it before giving the extent back, or a later `rebuild-index`
        // would find a share the index never had (and that a delete never reaches). If even
        // that write fails (a volume that refuses durable writes after a failed flush, say),
        // the extent stays allocated, and a retiring record has the next start zero it (it is
        // not its key's entry, and its header is exactly this one).
        let unwrite = |e: StoreError| {
            self.c.release(regions.clone());
            match tombstone(&self.c.dev, &self.sb, offset) {
                Ok(()) => {
                    lock(&self.c.alloc).free(offset, extent_len);
                }
                Err(t) => {
                    let recorded = self
                        .c
                        .retiring
                        .insert(offset.to_be_bytes(), &retiring_record(&key, &entry)[..])
                        .map_err(|x| self.ix(x))
                        .and_then(|_| self.commit());
                    let then = match recorded {
                        Ok(()) => "the next start zeroes it".to_string(),
                        Err(r) => format!("recording it for the next start failed too ({r}); a rebuild-index may find it"),
                    };
                    tracing::warn!(
                        site = %self.sb.site,
                        "{key}: zeroing the header of a share whose put failed ({e}): {t}; its extent at {offset} stays allocated, and {then}"
                    );
                }
            }
            e
        };
        // The header block after HEADER_LEN and the padding after the share are zero:
        // share_buf zeroed them and only the share range was handed out.
        // A failed write may still have put the header (and maybe every byte) on the volume.
        // The write waits for its place among the volume's (`write_depth`).
        let queued_at = Instant::now();
        let writing = self.gate.enter();
        let queued = queued_at.elapsed();
        let written = self.c.dev.write_at(buf, offset, true);
        drop(writing);
        written.map_err(|e| unwrite(e.into()))?;
        // The extent this put replaces is recorded as retiring before the new entry goes in
        // (both are flushed by the same flush, in this order): a crash before its tombstone
        // is durable leaves the record for `open` to finish. The key's write lock keeps the
        // entry read here the one the insert replaces.
        let old = self
            .shares
            .get(key.encode())
            .map_err(|e| unwrite(self.ix(e)))?
            .and_then(|v| IndexEntry::decode(&v).ok());
        if let Some(old) = &old {
            self.c
                .retiring
                .insert(old.offset.to_be_bytes(), &retiring_record(&key, old)[..])
                .map_err(|e| unwrite(self.ix(e)))?;
        }
        if let Err(e) = self.shares.insert(key.encode(), &entry.encode()[..]) {
            if let Some(old) = &old {
                // Harmless if it stays (`open` sees the entry still live), but not left behind.
                let _ = self.c.retiring.remove(old.offset.to_be_bytes());
            }
            return Err(unwrite(self.ix(e)));
        }
        // From here the index may reference the extent: never give it back on failure. The
        // share is durable, and so is its region's record: the put is done. The flusher makes
        // the entry durable, then zeroes and frees the replaced extent (until that flush the
        // durable index still names it, so it must stay whole and allocated).
        self.c.acknowledged(regions, old.map(|o| (key, o)));
        Ok(queued)
    }

    /// Finish the retiring records of `key` (replaced extents whose tombstone failed), so
    /// that deleting the key leaves no older generation for a volume scan to bring back.
    ///
    /// Returns the extents it zeroed, to be freed by the caller after its own flush: one
    /// retired by a replace not yet flushed is still named by the durable index, and given out
    /// again before that flush, a crash would leave the index naming another share's extent
    /// (and the recovery scan, which skips what the index names, never finding that share).
    fn retire_leftovers(
        &self,
        key: &ShareKey,
        live: &IndexEntry,
    ) -> Result<Vec<IndexEntry>, StoreError> {
        let mut left = Vec::new();
        for item in self.c.retiring.iter() {
            let (_, record) = item.map_err(|e| self.ix(e))?;
            // A record of the live extent (a put whose insert and cleanup both failed) is not
            // a leftover: the delete zeroes and frees that one. A record that does not decode
            // is left for `open`, which reports it.
            match decode_retiring(&record) {
                Ok((k, e)) if k == *key && e != *live => left.push(e),
                _ => {}
            }
        }
        let mut zeroed = Vec::new();
        for e in left {
            if self.c.retire_checked(key, &e)? {
                zeroed.push(e);
            }
        }
        Ok(zeroed)
    }

    fn entry(&self, key: &ShareKey) -> Result<IndexEntry, StoreError> {
        let v = self.shares.get(key.encode()).map_err(|e| self.ix(e))?;
        let v = v.ok_or_else(|| StoreError::NotFound {
            site: self.sb.site.clone(),
            key: *key,
        })?;
        IndexEntry::decode(&v).map_err(|e| StoreError::CorruptIndex {
            dir: self.dir.clone(),
            reason: format!("entry of {key}: {e}"),
        })
    }

    /// Reads a share and verifies its header and checksum; a mismatch is an error, never data.
    pub fn get(&self, key: &ShareKey) -> Result<ShareData, StoreError> {
        let _guard = self.key_lock(key).read().unwrap_or_else(|e| e.into_inner());
        let e = self.entry(key)?;
        self.read_extent(key, &e)
    }

    /// Where the index puts a share: the first half of [`Store::read_located`], which a caller
    /// that must not block its thread (the daemon's connection tasks) awaits.
    pub fn locate(&self, key: &ShareKey) -> Result<Located, StoreError> {
        let entry = self.entry(key)?;
        Ok(Located {
            key: *key,
            entry,
            read_len: self.sb.write_len(entry.share_len) as usize,
        })
    }

    /// Reads a located share without its key's lock, awaiting the volume instead of blocking.
    /// The bytes are served only if they verify exactly as [`Store::get`] checks them (header
    /// equal to the index entry, generation included, and the share's checksum). `Ok(None)`
    /// when they do not: a put or delete of the key raced with the read (the extent may have
    /// been freed and reused meanwhile), or the share is damaged. The caller then asks
    /// [`Store::get`], which reads under the key's lock and tells the two apart.
    pub async fn read_located(&self, l: &Located) -> Result<Option<ShareData>, StoreError> {
        let buf = self.c.dev.alloc_buf_dirty(l.read_len);
        let buf = self
            .c
            .dev
            .read_pending(buf, l.entry.offset)
            .into_buf()
            .await?;
        Ok(self.verify_extent(&l.key, &l.entry, buf).ok())
    }

    fn damaged(&self, key: &ShareKey, reason: String) -> StoreError {
        self.damaged_reads.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(site = %self.sb.site, share = %key, %reason, "damaged share");
        StoreError::Damaged {
            site: self.sb.site.clone(),
            key: *key,
            reason,
        }
    }

    fn read_extent(&self, key: &ShareKey, e: &IndexEntry) -> Result<ShareData, StoreError> {
        let write_len = self.sb.write_len(e.share_len) as usize;
        // Not zeroed first: the read fills every byte or fails (and the share's checksum is
        // checked below either way).
        let buf = self
            .c
            .dev
            .read_at(self.c.dev.alloc_buf_dirty(write_len), e.offset)?;
        self.verify_extent(key, e, buf)
            .map_err(|reason| self.damaged(key, reason))
    }

    /// The share in `buf`, read from the extent of index entry `e`, if its header matches the
    /// entry and its bytes their checksum; otherwise why not.
    fn verify_extent(
        &self,
        key: &ShareKey,
        e: &IndexEntry,
        buf: IoBuf,
    ) -> Result<ShareData, String> {
        let h = ShareHeader::decode(buf.as_slice())
            .map_err(|err| format!("header at offset {}: {err}", e.offset))?;
        if !e.matches(&h, key, &self.sb.volume_id) {
            return Err(format!(
                "header at offset {} does not match the index (generation {} vs {})",
                e.offset, h.generation, e.generation
            ));
        }
        let start = self.sb.block_size as usize;
        let len = e.share_len as usize;
        if share_sum(&buf.as_slice()[start..start + len]) != e.share_sum {
            return Err(format!(
                "share bytes at offset {} fail their checksum",
                e.offset + start as u64
            ));
        }
        Ok(ShareData {
            key: *key,
            meta: e.meta,
            generation: e.generation,
            buf,
            start,
            len,
        })
    }

    /// Deletes a share; once this returns it is gone from the index and from a volume scan.
    pub fn delete(&self, key: &ShareKey) -> Result<(), StoreError> {
        // As at a put: an index whose sync failed cannot commit the removal, and a volume
        // that refuses durable writes cannot make the tombstone durable. Refused before the
        // share is touched: a delete that fails leaves the share as it was, readable.
        if let Some(e) = self.c.dev.durable_writes_refused() {
            return Err(e.into());
        }
        self.c.check()?;
        let _guard = self
            .key_lock(key)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let e = self.entry(key)?;
        // Older generations left by a replace whose tombstone failed (or that waits for the
        // flusher), then this one; all freed after the flush below.
        let zeroed = self.retire_leftovers(key, &e)?;
        // Header first, durably: a crash after it leaves an index entry that reads as damaged
        // (the caller asked for it gone), never a deleted share that a rebuild brings back.
        tombstone(&self.c.dev, &self.sb, e.offset)?;
        self.shares
            .remove(key.encode())
            .map_err(|err| self.ix(err))?;
        // A record of this extent itself (a put whose insert and cleanup both failed) goes
        // with it: left behind, it would name space that is free once this returns.
        self.c
            .retiring
            .remove(e.offset.to_be_bytes())
            .map_err(|err| self.ix(err))?;
        self.commit()?;
        let mut alloc = lock(&self.c.alloc);
        for z in zeroed.iter().chain([&e]) {
            alloc.free(z.offset, z.extent_len);
        }
        Ok(())
    }

    /// Every indexed share and its entry, in key order.
    pub fn list(&self) -> impl Iterator<Item = Result<(ShareKey, IndexEntry), StoreError>> + '_ {
        self.list_after(None)
    }

    /// Indexed shares with keys strictly after `after` (from the start if None), in key order.
    pub fn list_after(
        &self,
        after: Option<&ShareKey>,
    ) -> impl Iterator<Item = Result<(ShareKey, IndexEntry), StoreError>> + '_ {
        use std::ops::Bound;
        let lower = match after {
            Some(k) => Bound::Excluded(k.encode().to_vec()),
            None => Bound::Unbounded,
        };
        self.shares
            .range::<Vec<u8>, _>((lower, Bound::Unbounded))
            .map(move |item| {
                let (k, v) = item.map_err(|e| self.ix(e))?;
                let corrupt = |e: LayoutError| StoreError::CorruptIndex {
                    dir: self.dir.clone(),
                    reason: e.to_string(),
                };
                Ok((
                    ShareKey::decode(&k).map_err(corrupt)?,
                    IndexEntry::decode(&v).map_err(corrupt)?,
                ))
            })
    }

    /// Makes every index flush from now on fail, as after a failed sync of the index (tests).
    #[doc(hidden)]
    pub fn fail_index_flushes(&self) {
        self.c.sync.fail_from_now();
    }

    /// How many shares `open` found in the open regions that the index lacked (acknowledged
    /// before a crash, their entries not yet flushed).
    pub fn recovered_at_open(&self) -> u64 {
        self.recovered
    }

    /// Flushes the index: every put acknowledged before this call is indexed durably when it
    /// returns, and the extents such puts replaced are zeroed and free (the flusher thread
    /// does both on its own within 20 ms).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.c.settle()
    }

    pub fn stat(&self) -> StoreStat {
        // A full scan of the index (sled counts by iterating): before the allocator's lock,
        // which every put takes.
        let shares = self.shares.len() as u64;
        let a = lock(&self.c.alloc);
        let damaged_reads = self.damaged_reads.load(Ordering::Relaxed);
        StoreStat {
            site: self.sb.site.clone(),
            volume_id: hex(&self.sb.volume_id),
            capacity: a.capacity(),
            free: a.free_bytes(),
            largest_free: a.largest_free(),
            shares,
            damaged_reads,
            health: if damaged_reads == 0 {
                Health::Ok
            } else {
                Health::Damaged
            },
        }
    }

    /// Re-reads and verifies every indexed share; damaged ones are reported, not fatal.
    pub fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let mut report = ScrubReport::default();
        for item in self.list() {
            let (key, e) = item?;
            report.checked += 1;
            report.bytes += e.share_len;
            match self.read_extent(&key, &e) {
                Ok(_) => {}
                Err(StoreError::Damaged { reason, .. }) => report.damaged.push(Damage {
                    key,
                    offset: e.offset,
                    reason,
                }),
                // A read the device failed, or refused as this entry asks it (a damaged
                // entry's length, say), is this share's damage; the ring stopping is the
                // scrub's own, which it stops at (reporting every share after as damaged
                // would send an operator to restore shares that are whole).
                Err(StoreError::Volume(
                    v @ (VolumeError::Io { .. }
                    | VolumeError::NoProgress { .. }
                    | VolumeError::Request { .. }
                    | VolumeError::Injected { .. }),
                )) => report.damaged.push(Damage {
                    key,
                    offset: e.offset,
                    reason: v.to_string(),
                }),
                Err(other) => return Err(other),
            }
        }
        Ok(report)
    }

    /// Rebuilds the index in `state_dir` from the share headers on the volume (when the index is
    /// lost or corrupt). The previous index, if any, is moved aside, not deleted.
    pub fn rebuild_index(dev: &D, state_dir: &Path) -> Result<RebuildReport, StoreError> {
        let sb = read_superblock(dev)?;
        let dir = state_dir.to_path_buf();
        let io = |source| StoreError::StateDir {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        // Never beside a daemon still committing into the index moved aside below.
        let _state_lock = lock_state_dir(&dir)?;
        let index = dir.join("index");
        // An index there that names another volume is another site's (a mistyped --state):
        // moved aside, it would leave that site refusing to start. One that cannot be read, or
        // names no volume, is what a rebuild is for.
        if let Some(v) = index
            .exists()
            .then(|| index_volume_id(&index))
            .flatten()
            .filter(|v| v[..] != sb.volume_id)
        {
            return Err(StoreError::StateMismatch {
                dir,
                volume: dev.path().to_path_buf(),
                expected: hex(&sb.volume_id),
                found: hex(&v),
            });
        }
        let mut report = RebuildReport::default();
        // What the index in place had still to zero is not brought back (a put refused after
        // its bytes landed would otherwise win over the acknowledged share it was to
        // replace). With no index in place, the one a rebuild stopped between its two
        // renames left (the old index moved aside, this one not yet in its place).
        let building = dir.join("index.new");
        let retiring = retiring_of(if index.exists() { &index } else { &building });
        // The scan first: one that fails (an unreadable block, say) leaves the index in place.
        let (found, superseded) = scan(
            dev,
            &sb,
            &[(sb.data_start, sb.volume_len)],
            &[],
            &retiring,
            &mut report,
        )?;
        // The new index is built and made durable beside the old one before the old index
        // moves aside: a failure in any of it leaves the index there was (once, a failed
        // tombstone left the site no index). Nothing on the volume is zeroed here: the older
        // generations go into the new index as retiring records, zeroed at its first start.
        // Zeroed here, a rebuild stopped before the swap (a crash, a failed rename) would
        // leave the old index in use with shares it names destroyed.
        let ix = |source| StoreError::Index {
            dir: dir.clone(),
            source,
        };
        if building.exists() {
            std::fs::remove_dir_all(&building).map_err(io)?;
        }
        let built = (|| -> Result<u32, StoreError> {
            let db = open_index(sled::Config::new().path(&building)).map_err(ix)?;
            let sync = SledSync::open(&building).map_err(|e| ix(sled::Error::Io(e)))?;
            let shares = db.open_tree("shares").map_err(ix)?;
            let meta = db.open_tree("meta").map_err(ix)?;
            let retiring = db.open_tree("retiring").map_err(ix)?;
            let mut max_gen = 0;
            for (key, e) in &found {
                shares.insert(key.encode(), &e.encode()[..]).map_err(ix)?;
                max_gen = max_gen.max(e.generation);
            }
            // An older generation left on the volume (its replace's tombstone lost with the
            // old index) would come back in the next rebuild once its key is deleted.
            for (key, e) in &superseded {
                retiring
                    .insert(e.offset.to_be_bytes(), &retiring_record(key, e)[..])
                    .map_err(ix)?;
            }
            max_gen = max_gen.max(report.max_generation_seen);
            meta.insert(META_VOLUME_ID, &sb.volume_id[..]).map_err(ix)?;
            meta.insert(META_GEN_RESERVED, &(max_gen + 1).to_le_bytes())
                .map_err(ix)?;
            // The rebuilt index is the volume's index from now on (a crash before the
            // superblock names it leaves the volume refusing it: rebuild again).
            let tag = new_index_tag().map_err(io)?;
            meta.insert(META_INDEX_TAG, &tag.to_le_bytes())
                .map_err(ix)?;
            sync.flush(&db).map_err(ix)?;
            Ok(tag)
        })();
        let tag = match built {
            Ok(tag) => tag,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&building);
                return Err(e);
            }
        };
        report.superseded = superseded.len() as u64;
        if index.exists() {
            // A name of its own, also for a second rebuild within the same second.
            let secs = now_secs();
            let aside = (0..)
                .map(|n| match n {
                    0 => dir.join(format!("index.old-{secs}")),
                    n => dir.join(format!("index.old-{secs}-{n}")),
                })
                .find(|p| !p.exists())
                .expect("an unused name");
            std::fs::rename(&index, &aside).map_err(io)?;
            report.old_index = Some(aside);
        }
        std::fs::rename(&building, &index).map_err(io)?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        write_superblock(
            dev,
            &Superblock {
                index_tag: tag,
                ..sb
            },
        )?;
        report.shares = found.len() as u64;
        Ok(report)
    }
}

impl<D: BlockDevice> Drop for Store<D> {
    /// The flusher's last round: the puts acknowledged since its previous flush are indexed
    /// durably, and every region is closed, so the next start scans nothing.
    fn drop(&mut self) {
        self.c.stop();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
    }
}

/// Opens an index with `config`. The state directory's own lock (taken first) keeps other
/// processes out, so a sled lock held here is this process's (an index just dropped, seen
/// after a `rebuild_index` followed at once by an open): [`open_sled`] waits for it.
fn open_index(config: sled::Config) -> sled::Result<sled::Db> {
    open_sled(&config)
}

/// The newest valid extent of each key a scan found.
type Newest = std::collections::BTreeMap<ShareKey, IndexEntry>;
/// Extents a scan found valid but does not index, with their keys.
type Superseded = Vec<(ShareKey, IndexEntry)>;

/// Scans `ranges` of the data area (sorted, disjoint, on allocation units) for valid extents:
/// every allocation unit not inside an accepted extent or one of `skip` (sorted, disjoint) is
/// tried as a header; a header counts only if it belongs to this volume, fits the geometry and
/// its share bytes match its checksum. The newest generation of each key wins, except over an
/// extent `retiring` names exactly (which an index had still to zero); the older ones found,
/// and those, come second.
fn scan<D: BlockDevice>(
    dev: &D,
    sb: &Superblock,
    ranges: &[(u64, u64)],
    skip: &[(u64, u64)],
    retiring: &Retiring,
    report: &mut RebuildReport,
) -> Result<(Newest, Superseded), StoreError> {
    let au = u64::from(sb.alloc_unit);
    let window = (8u64 << 20).div_ceil(au) * au;
    let bs = sb.block_size as usize;
    // The end of the `skip` extent holding `u`, if one does.
    let skipped = |u: u64| {
        let i = skip.partition_point(|&(o, _)| o <= u);
        (i > 0 && skip[i - 1].0 + skip[i - 1].1 > u).then(|| skip[i - 1].0 + skip[i - 1].1)
    };
    let mut found = Newest::new();
    let mut superseded = Vec::new();
    for &(start, end) in ranges {
        let mut pos = start;
        while pos < end {
            if let Some(next) = skipped(pos) {
                pos = next;
                continue;
            }
            let wlen = window.min(end - pos);
            let win = dev.read_at(dev.alloc_buf(wlen as usize), pos)?;
            report.scanned_bytes += wlen;
            let mut u = pos;
            while u < pos + wlen {
                if let Some(next) = skipped(u) {
                    u = next;
                    continue;
                }
                let at = (u - pos) as usize;
                let Ok(h) = ShareHeader::decode(&win.as_slice()[at..at + HEADER_LEN]) else {
                    u += au;
                    continue;
                };
                if !h.fits(sb, u) {
                    u += au;
                    continue;
                }
                let wl = sb.write_len(h.share_len);
                let len = h.share_len as usize;
                let ok = if u + wl <= pos + wlen {
                    share_sum(&win.as_slice()[at + bs..at + bs + len]) == h.share_sum
                } else {
                    let b = dev.read_at(dev.alloc_buf(wl as usize), u)?;
                    share_sum(&b.as_slice()[bs..bs + len]) == h.share_sum
                };
                if !ok {
                    report.torn += 1;
                    u += au;
                    continue;
                }
                report.max_generation_seen = report.max_generation_seen.max(h.generation);
                let e = IndexEntry::from_header(&h, u);
                match found.get(&h.key) {
                    _ if retiring.get(&u) == Some(&(h.key, e)) => superseded.push((h.key, e)),
                    Some(prev) if prev.generation > e.generation => superseded.push((h.key, e)),
                    Some(prev) => {
                        superseded.push((h.key, *prev));
                        found.insert(h.key, e);
                    }
                    None => {
                        found.insert(h.key, e);
                    }
                }
                u += h.extent_len;
            }
            pos = u.max(pos + wlen);
        }
    }
    Ok((found, superseded))
}

/// Indexes the valid shares a crash left in the open regions (see [`lazy`]) that the index
/// lacks: acknowledged puts whose entries were not flushed yet (and puts that finished their
/// write but not their acknowledgement: whole, checksummed, exactly what was sent). What the
/// index names is skipped; a found share newer than its key's entry replaces it, and the entry
/// it replaces (or a found share older than the entry) gets a retiring record, zeroed by
/// `finish_retiring` right after. Then no region is open. Returns how many it indexed; `live`
/// (the index's extents) gets theirs in place of what they replace.
fn recover_open_regions<D: BlockDevice>(
    dev: &D,
    sb: &Superblock,
    dir: &Path,
    shares: &sled::Tree,
    retiring: &sled::Tree,
    open: &sled::Tree,
    live: &mut Vec<(u64, u64)>,
) -> Result<u64, StoreError> {
    let ix = |source| StoreError::Index {
        dir: dir.to_path_buf(),
        source,
    };
    if open.is_empty() {
        return Ok(0);
    }
    let rl = lazy::region_len(u64::from(sb.alloc_unit));
    let mut ranges = Vec::new();
    for item in open.iter() {
        let (k, _) = item.map_err(ix)?;
        let r = <[u8; 8]>::try_from(k.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::CorruptIndex {
                dir: dir.to_path_buf(),
                reason: format!("open region record {} is not 8 bytes", hex(&k)),
            })?;
        let start = r
            .checked_mul(rl)
            .and_then(|o| o.checked_add(sb.data_start))
            .filter(|&o| o < sb.volume_len)
            .ok_or_else(|| StoreError::CorruptIndex {
                dir: dir.to_path_buf(),
                reason: format!("open region {r} lies past the end of the volume"),
            })?;
        ranges.push((start, (start + rl).min(sb.volume_len)));
    }
    live.sort_unstable();
    let records = retiring_records(retiring, shares);
    let mut report = RebuildReport::default();
    let (found, mut retire) = scan(dev, sb, &ranges, live, &records, &mut report)?;
    let mut index = Vec::new();
    for (key, e) in found {
        let entry = shares
            .get(key.encode())
            .map_err(ix)?
            .and_then(|v| IndexEntry::decode(&v).ok());
        match entry {
            Some(old) if old.generation >= e.generation => retire.push((key, e)),
            old => {
                if let Some(old) = old {
                    retire.push((key, old));
                    live.retain(|&x| x != (old.offset, old.extent_len));
                }
                live.push((e.offset, e.extent_len));
                index.push((key, e));
            }
        }
    }
    // The records first, as a put does: sled may persist any prefix of these before the
    // flush at the end of `open`, and an entry persisted without the record of what it
    // replaces would leave that extent's header valid in space nothing names.
    for (key, e) in &retire {
        retiring
            .insert(e.offset.to_be_bytes(), &retiring_record(key, e)[..])
            .map_err(ix)?;
    }
    for (key, e) in &index {
        shares.insert(key.encode(), &e.encode()[..]).map_err(ix)?;
    }
    let indexed = index.len() as u64;
    open.clear().map_err(ix)?;
    tracing::info!(
        site = %sb.site,
        regions = ranges.len(),
        scanned_bytes = report.scanned_bytes,
        indexed,
        superseded = retire.len(),
        torn = report.torn,
        "indexed the shares acknowledged before a crash whose index entries were not flushed"
    );
    Ok(indexed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{Alignment, MemVolume};

    const A: Alignment = Alignment {
        offset: 512,
        mem: 512,
    };

    /// However many threads put at once, `write_depth` share writes are at the volume at a
    /// time (the rest of each put runs beside them), every put is stored, and the waits are
    /// counted.
    #[test]
    fn puts_from_many_threads_reach_the_volume_write_depth_at_a_time() {
        for depth in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let v = Arc::new(MemVolume::new("mem-vol", 64 << 20, A));
            Store::format(&v, "site-a", &FormatOptions::default()).unwrap();
            let opts = StoreOptions {
                write_depth: depth,
                ..StoreOptions::default()
            };
            let s = Store::open(v.clone(), dir.path(), opts).unwrap();
            v.slow_writes(std::time::Duration::from_millis(30));
            let key = |t: u8, i: u64| ShareKey {
                file_id: [t + 1; 16],
                chunk: i,
                share: 0,
            };
            let meta = ShareMeta {
                k: 2,
                n: 3,
                secret_len: 4096,
            };
            std::thread::scope(|sc| {
                for t in 0..6u8 {
                    let s = &s;
                    sc.spawn(move || {
                        for i in 0..3 {
                            s.put(key(t, i), meta, &[t; 4096]).unwrap();
                        }
                    });
                }
            });
            assert_eq!(v.writes_at_once(), depth, "write_depth {depth}");
            let times = s.put_times();
            assert_eq!(times.puts, 18);
            // 18 writes of 30 ms, `depth` at a time, from 6 threads: the threads waited at
            // the gate for far longer than one write in all.
            assert!(
                times.write_queue_ns >= 30_000_000,
                "six threads, {depth} at a time: {times:?}"
            );
            for t in 0..6u8 {
                for i in 0..3 {
                    assert_eq!(s.get(&key(t, i)).unwrap().bytes(), &[t; 4096][..]);
                }
            }
        }
    }

    /// A retiring record of its key's live entry (a replace whose index insert failed after
    /// its record was written, and whose cleanup failed too, flushed by another put's commit)
    /// does not keep that share out of a rebuild: it is the acknowledged share, and `open`
    /// drops such a record. The rebuild used to leave it out and zero it at the next start.
    #[test]
    fn a_rebuild_keeps_a_live_share_its_index_holds_a_retiring_record_of() {
        let dir = tempfile::tempdir().unwrap();
        let v = MemVolume::new("mem-vol", 16 << 20, A);
        Store::format(&v, "site-a", &FormatOptions::default()).unwrap();
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        let k = ShareKey {
            file_id: [3; 16],
            chunk: 1,
            share: 0,
        };
        let meta = ShareMeta {
            k: 2,
            n: 3,
            secret_len: 1 << 20,
        };
        s.put(k, meta, &[7u8; 5000]).unwrap();
        let e = s.entry(&k).unwrap();
        s.c.retiring
            .insert(e.offset.to_be_bytes(), &retiring_record(&k, &e)[..])
            .unwrap();
        s.commit().unwrap();
        let image = s.device().image();
        drop(s);
        let v = MemVolume::from_image("mem-vol", image, A);
        let r = Store::rebuild_index(&v, dir.path()).unwrap();
        assert_eq!((r.shares, r.superseded), (1, 0));
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.get(&k).unwrap().bytes(), &[7u8; 5000][..]);
    }

    fn k(chunk: u64) -> ShareKey {
        ShareKey {
            file_id: [5; 16],
            chunk,
            share: 1,
        }
    }

    const META: ShareMeta = ShareMeta {
        k: 2,
        n: 3,
        secret_len: 1 << 20,
    };

    /// A crash after puts were acknowledged, before the flush of their index entries: the
    /// index lost them (removed here by hand, as the crash would have) while their regions
    /// stayed open, and the next start finds them there. A replace found newer than the lost
    /// index's entry wins, and the extent it replaced is zeroed and freed; a delete (flushed
    /// before it returns) stays deleted.
    #[test]
    fn puts_whose_index_entries_a_crash_lost_are_found_in_their_open_regions() {
        let dir = tempfile::tempdir().unwrap();
        let v = MemVolume::new("mem-vol", 16 << 20, A);
        Store::format(&v, "site-a", &FormatOptions::default()).unwrap();
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        let (old, new, gone) = (k(0), k(1), k(2));
        s.put(old, META, &[1u8; 5000]).unwrap();
        s.flush().unwrap();
        let before = s.entry(&old).unwrap();
        let free_with_one = s.stat().free;
        s.c.hold(true);
        s.put(new, META, &[2u8; 7000]).unwrap();
        s.put(old, META, &[3u8; 5000]).unwrap();
        s.put(gone, META, &[4u8; 100]).unwrap();
        s.delete(&gone).unwrap();
        // What the crash loses: the entries not flushed, and the replace's retiring record.
        s.shares.remove(new.encode()).unwrap();
        s.shares.insert(old.encode(), &before.encode()[..]).unwrap();
        s.c.retiring.remove(before.offset.to_be_bytes()).unwrap();
        assert!(!s.c.open.is_empty(), "the puts' region is open");
        let image = s.device().image();
        drop(s);

        let v = MemVolume::from_image("mem-vol", image, A);
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.recovered_at_open(), 2);
        assert_eq!(s.get(&new).unwrap().bytes(), &[2u8; 7000][..]);
        let got = s.get(&old).unwrap();
        assert_eq!(got.bytes(), &[3u8; 5000][..]);
        assert!(got.generation > before.generation);
        assert!(matches!(s.get(&gone), Err(StoreError::NotFound { .. })));
        // The replaced extent is free again and its header zeroed: a rebuild finds the two
        // shares and nothing older.
        let extent = |len| s.sb.extent_len(len);
        assert_eq!(
            s.stat().free,
            free_with_one + extent(5000) - extent(5000) - extent(7000)
        );
        assert!(s.c.open.is_empty(), "no region is open after the start");
        let image = s.device().image();
        drop(s);
        let v = MemVolume::from_image("mem-vol", image, A);
        let r = Store::rebuild_index(&v, dir.path()).unwrap();
        assert_eq!((r.shares, r.superseded), (2, 0));
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.recovered_at_open(), 0);
    }

    /// A sum set by whoever filled a share's buffer (the site sums what it decrypts as it
    /// arrives) is forgotten once the bytes are handed out for writing again: the header
    /// never carries a sum of bytes the share no longer has.
    #[test]
    fn a_share_sum_set_before_the_bytes_changed_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let v = MemVolume::new("mem-vol", 16 << 20, A);
        Store::format(&v, "site-a", &FormatOptions::default()).unwrap();
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        let mut b = s.share_buf(6000);
        b.as_mut_slice().fill(9);
        b.set_sum(share_sum(&[9u8; 6000]));
        s.put_buf(k(0), META, b).unwrap();
        assert_eq!(s.get(&k(0)).unwrap().bytes(), &[9u8; 6000][..]);
        let mut b = s.share_buf(6000);
        b.as_mut_slice().fill(9);
        b.set_sum(share_sum(&[9u8; 6000]));
        b.as_mut_slice()[0] = 1;
        s.put_buf(k(1), META, b).unwrap();
        let got = s.get(&k(1)).unwrap();
        assert_eq!((got.bytes()[0], &got.bytes()[1..]), (1, &[9u8; 5999][..]));
    }

    /// The region a put opened is closed once its entry is durable and no put came for a
    /// while, and by a store's drop: an idle site or an orderly stop leaves nothing to scan.
    #[test]
    fn regions_close_when_idle_and_at_drop() {
        let dir = tempfile::tempdir().unwrap();
        let v = MemVolume::new("mem-vol", 16 << 20, A);
        Store::format(&v, "site-a", &FormatOptions::default()).unwrap();
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        s.put(k(0), META, &[1u8; 5000]).unwrap();
        assert!(!s.c.open.is_empty());
        let start = std::time::Instant::now();
        while !s.c.open.is_empty() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the idle region was not closed"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        s.put(k(1), META, &[2u8; 5000]).unwrap();
        assert!(!s.c.open.is_empty());
        let image = s.device().image();
        drop(s);
        let index = sled::open(dir.path().join("index")).unwrap();
        assert!(index.open_tree(lazy::OPEN_TREE).unwrap().is_empty());
        drop(index);
        let v = MemVolume::from_image("mem-vol", image, A);
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.recovered_at_open(), 0);
        assert_eq!(s.get(&k(1)).unwrap().bytes(), &[2u8; 5000][..]);
    }

    /// A replace on a full volume: the extent the previous replace freed is still waiting for
    /// the flusher (held here), and the put settles it instead of failing with VolumeFull.
    #[test]
    fn a_replace_on_a_full_volume_settles_the_extents_replaced_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let v = MemVolume::new("mem-vol", 16 << 20, A);
        Store::format(&v, "site-a", &FormatOptions::default()).unwrap();
        let s = Store::open(v, dir.path(), StoreOptions::default()).unwrap();
        let share = |b: u8| vec![b; 1 << 20];
        let mut n = 0;
        while s.put(k(n), META, &share(1)).is_ok() {
            n += 1;
        }
        assert!(n >= 3, "{n} shares fit");
        s.delete(&k(0)).unwrap();
        s.c.hold(true);
        s.put(k(1), META, &share(2)).unwrap();
        s.put(k(2), META, &share(3))
            .expect("the second replace gets the extent the first one replaced");
        assert_eq!(s.get(&k(1)).unwrap().bytes(), &share(2)[..]);
        assert_eq!(s.get(&k(2)).unwrap().bytes(), &share(3)[..]);
        // The extent the second replace freed, then nothing.
        s.put(k(n + 1), META, &share(4)).unwrap();
        assert!(matches!(
            s.put(k(n + 2), META, &share(5)),
            Err(StoreError::VolumeFull { .. })
        ));
    }
}
