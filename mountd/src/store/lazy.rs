//! Index commits: group flushes of the index, and the index entries of puts made durable
//! after their acknowledgement.
//!
//! A put is acknowledged once its share (header and bytes, one durable write) is on the volume;
//! its index entry is made durable by the next flush of the index, which this module's thread
//! runs every [`FLUSH_INTERVAL`] while puts come in. A crash in between loses the entry, not the
//! share: before a put writes into a region of the volume, the region is recorded in the
//! index's `open` tree and that record flushed, and `Store::open` scans the open regions for
//! valid headers the index lacks ([`super::recover_open_regions`]). The record goes once every
//! put into the region is indexed durably and nobody has put there for [`CLOSE_AFTER`].
//!
//! So a put costs one device flush (the volume's) on its way to the acknowledgement instead of
//! two (the volume's, then the index's), and the index flushes once for a whole batch of puts.
//!
//! The extent a put replaces is zeroed and freed only after the flush that makes the new entry
//! durable: until then the durable index still names it, and a crash must find it whole (and a
//! recovery scan skips what the index names, so it must not hold another share yet).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{decode_retiring, lock, tombstone, StoreError};
use crate::alloc::Allocator;
use crate::layout::{IndexEntry, ShareHeader, ShareKey, Superblock};
use crate::volume::BlockDevice;
use qgenome::catalog::durable::SledSync;

/// Regions are at least this long (a whole number of allocation units): a crash leaves at most
/// a few to scan, and a put opens a new one (one extra index flush) every this many bytes.
const REGION_MIN: u64 = 256 << 20;
/// Pause between two flushes of the flusher: the puts acknowledged meanwhile share one.
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// A region is closed once its puts are all indexed durably and none came for this long.
const CLOSE_AFTER: Duration = Duration::from_secs(1);
/// Index tree of open regions: region number (big-endian u64) -> nothing.
pub(super) const OPEN_TREE: &str = "open";
const KEY_LOCKS: usize = 64;

/// The length of a region on a volume with allocation unit `au`.
pub(super) fn region_len(au: u64) -> u64 {
    REGION_MIN.div_ceil(au) * au
}

#[derive(Debug)]
struct Region {
    /// Puts into the region whose index entry is not yet flushed (or still being written).
    pending: u32,
    /// Its record in the `open` tree is durable, and no removal of it is pending.
    durable: bool,
    /// Its record was removed; the removal is durable at the next flush.
    closing: bool,
    last_used: Instant,
}

/// An acknowledged put whose index entry waits for a flush.
struct Waiting {
    seq: u64,
    regions: RangeInclusive<u64>,
    /// The extent it replaced, zeroed and freed once the flush is done.
    replaced: Option<(ShareKey, IndexEntry)>,
}

#[derive(Default)]
struct State {
    waiting: Vec<Waiting>,
    /// Replaced extents a round took from `waiting` and is still zeroing and freeing.
    retiring: usize,
    regions: BTreeMap<u64, Region>,
    stop: bool,
    /// A round failed (its flush, or its index update): the index is fail-stop from then on
    /// (as `SledSync` is after a failed sync), puts and deletes are refused, nothing more is
    /// flushed, and what waits stays for the next start's recovery.
    failed: Option<String>,
    /// Tests: the flusher does nothing while set.
    held: bool,
}

/// What the store's put and delete paths and the flusher thread share.
pub(super) struct Committer<D: BlockDevice> {
    pub(super) dev: D,
    pub(super) sb: Superblock,
    pub(super) dir: std::path::PathBuf,
    pub(super) db: sled::Db,
    pub(super) sync: SledSync,
    pub(super) retiring: sled::Tree,
    pub(super) open: sled::Tree,
    pub(super) alloc: Mutex<Allocator>,
    key_locks: Vec<RwLock<()>>,
    /// Highest commit sequence number known flushed.
    flushed: Mutex<u64>,
    /// Commit sequence numbers handed out (after the index inserts they follow).
    applied: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
    /// Held through a whole round, so that a `settle` returns only after the flusher's round
    /// it may have raced with has finished its retires too.
    rounds: Mutex<()>,
    region_len: u64,
}

impl<D: BlockDevice> Committer<D> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        dev: D,
        sb: Superblock,
        dir: std::path::PathBuf,
        db: sled::Db,
        sync: SledSync,
        retiring: sled::Tree,
        open: sled::Tree,
        alloc: Allocator,
    ) -> Self {
        let region_len = region_len(u64::from(sb.alloc_unit));
        Self {
            dev,
            sb,
            dir,
            db,
            sync,
            retiring,
            open,
            alloc: Mutex::new(alloc),
            key_locks: (0..KEY_LOCKS).map(|_| RwLock::new(())).collect(),
            flushed: Mutex::new(0),
            applied: AtomicU64::new(0),
            state: Mutex::default(),
            wake: Condvar::new(),
            rounds: Mutex::new(()),
            region_len,
        }
    }

    pub(super) fn ix(&self, source: sled::Error) -> StoreError {
        StoreError::Index {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Refuses once the index cannot be made durable: its sync failed, or a round of the
    /// flusher did (its error named).
    pub(super) fn check(&self) -> Result<(), StoreError> {
        self.sync.check().map_err(|e| self.ix(e))?;
        if let Some(why) = &lock(&self.state).failed {
            return Err(self.ix(sled::Error::Io(std::io::Error::other(format!(
                "an earlier flush of the index failed ({why}); restart the site"
            )))));
        }
        Ok(())
    }

    /// Whether extents replaced by acknowledged puts wait for the flusher (a put that finds
    /// the volume full settles them first).
    pub(super) fn retires_waiting(&self) -> bool {
        let st = lock(&self.state);
        st.retiring > 0 || st.waiting.iter().any(|w| w.replaced.is_some())
    }

    pub(super) fn key_lock(&self, key: &ShareKey) -> &RwLock<()> {
        let mut h = key.chunk ^ u64::from(key.share).rotate_left(40);
        for (i, b) in key.file_id.iter().enumerate() {
            h ^= u64::from(*b) << ((i % 8) * 8);
        }
        h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.key_locks[(h >> 58) as usize % KEY_LOCKS]
    }

    /// Group commit: returns once an index flush that started after the caller's inserts (made
    /// before this call) has finished.
    pub(super) fn commit(&self) -> Result<(), StoreError> {
        let seq = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
        let mut flushed = lock(&self.flushed);
        if *flushed >= seq {
            return Ok(());
        }
        let target = self.applied.load(Ordering::SeqCst);
        self.sync.flush(&self.db).map_err(|e| self.ix(e))?;
        *flushed = target;
        Ok(())
    }

    /// The regions `offset..offset + len` lies in, each recorded durably as open (flushing the
    /// index if one was not) and counted as holding one more pending put. Undone by
    /// [`Committer::release`] if the put fails, or by the flush after [`Committer::acknowledged`].
    pub(super) fn enter(&self, offset: u64, len: u64) -> Result<RangeInclusive<u64>, StoreError> {
        let first = (offset - self.sb.data_start) / self.region_len;
        let last = (offset + len - 1 - self.sb.data_start) / self.region_len;
        let regions = first..=last;
        let now = Instant::now();
        let mut opening = Vec::new();
        {
            let mut st = lock(&self.state);
            for r in regions.clone() {
                let reg = st.regions.entry(r).or_insert(Region {
                    pending: 0,
                    durable: false,
                    closing: false,
                    last_used: now,
                });
                reg.pending += 1;
                reg.last_used = now;
                if !reg.durable {
                    opening.push(r);
                }
            }
            // Inserted under the lock: the flusher removes records under it too, so a removal
            // never lands after this insert.
            for &r in &opening {
                if let Err(e) = self.open.insert(r.to_be_bytes(), &[][..]) {
                    drop(st);
                    self.release(regions);
                    return Err(self.ix(e));
                }
                st.regions.get_mut(&r).expect("entered").closing = false;
            }
        }
        if !opening.is_empty() {
            if let Err(e) = self.commit() {
                self.release(regions);
                return Err(e);
            }
            let mut st = lock(&self.state);
            for r in opening {
                if let Some(reg) = st.regions.get_mut(&r) {
                    reg.durable = true;
                }
            }
        }
        Ok(regions)
    }

    /// A put that [`Committer::enter`]ed `regions` failed: it holds them no longer.
    pub(super) fn release(&self, regions: RangeInclusive<u64>) {
        let mut st = lock(&self.state);
        for r in regions {
            if let Some(reg) = st.regions.get_mut(&r) {
                reg.pending -= 1;
            }
        }
    }

    /// A put into `regions` inserted its index entry (replacing `replaced`, if any) and is
    /// acknowledged: the flusher makes the entry durable, then zeroes and frees `replaced`.
    pub(super) fn acknowledged(
        &self,
        regions: RangeInclusive<u64>,
        replaced: Option<(ShareKey, IndexEntry)>,
    ) {
        let seq = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
        let mut st = lock(&self.state);
        st.waiting.push(Waiting {
            seq,
            regions,
            replaced,
        });
        if st.waiting.len() == 1 {
            self.wake.notify_one();
        }
    }

    /// Tests: stop (or resume) the flusher's work, as a crash would before its next flush.
    #[cfg(test)]
    pub(super) fn hold(&self, held: bool) {
        lock(&self.state).held = held;
        self.wake.notify_one();
    }

    /// Tells the flusher to finish: a last flush, and every region closed.
    pub(super) fn stop(&self) {
        lock(&self.state).stop = true;
        self.wake.notify_one();
    }

    /// The flusher thread's loop, until [`Committer::stop`].
    pub(super) fn run(&self) {
        let mut last = Instant::now();
        loop {
            let (stop, held) = {
                let mut st = lock(&self.state);
                while !st.stop
                    && (st.held
                        || st.failed.is_some()
                        || (st.waiting.is_empty()
                            && !st.regions.values().any(|r| {
                                r.pending == 0 && r.durable && r.last_used.elapsed() >= CLOSE_AFTER
                            })))
                {
                    // Woken by a put; on its own every so often, for regions to close.
                    st = self
                        .wake
                        .wait_timeout(st, CLOSE_AFTER / 2)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                (st.stop, st.held)
            };
            if stop {
                // Held (a test's crash): gone without a flush. Else the waiting puts first,
                // so that the regions they held are free to close in the second round.
                if !held {
                    self.log_failure(self.round(false, false));
                    self.log_failure(self.round(true, false));
                }
                return;
            }
            // Puts acknowledged within the interval share the flush.
            let since = last.elapsed();
            if since < FLUSH_INTERVAL {
                std::thread::sleep(FLUSH_INTERVAL - since);
            }
            last = Instant::now();
            if lock(&self.state).held {
                continue;
            }
            self.log_failure(self.round(false, false));
        }
    }

    fn log_failure(&self, r: Result<(), StoreError>) {
        if let Err(e) = r {
            let mut st = lock(&self.state);
            if st.failed.is_none() {
                tracing::error!(
                    site = %self.sb.site,
                    "index flush failed: {e}; puts and deletes are refused from now on, and the shares acknowledged since the last flush are found again by the next start"
                );
                st.failed = Some(e.to_string());
            }
        }
    }

    /// Flushes the index, then zeroes and frees the extents replaced by the puts it made
    /// durable: once this returns, every put acknowledged before it is indexed durably and
    /// whatever it replaced is gone.
    pub(super) fn settle(&self) -> Result<(), StoreError> {
        let r = self.round(false, true);
        if r.is_err() {
            self.log_failure(r);
            return self.check();
        }
        r
    }

    /// Closes idle regions (all that hold no pending put when `all`), flushes the index if
    /// anything waits for it (or if `force`), and finishes what the flush made durable.
    fn round(&self, all: bool, force: bool) -> Result<(), StoreError> {
        let _round = lock(&self.rounds);
        self.check()?;
        let mut closing = Vec::new();
        let waiting = {
            let mut st = lock(&self.state);
            for (&r, reg) in st.regions.iter_mut() {
                if reg.pending == 0
                    && reg.durable
                    && (all || reg.last_used.elapsed() >= CLOSE_AFTER)
                {
                    self.open.remove(r.to_be_bytes()).map_err(|e| self.ix(e))?;
                    reg.durable = false;
                    reg.closing = true;
                    closing.push(r);
                }
            }
            !st.waiting.is_empty()
        };
        if !force && !waiting && closing.is_empty() {
            return Ok(());
        }
        self.commit()?;
        let flushed = *lock(&self.flushed);
        let replaced: Vec<(ShareKey, IndexEntry)> = {
            let mut st = lock(&self.state);
            let State {
                waiting,
                regions,
                retiring,
                ..
            } = &mut *st;
            let mut done = Vec::new();
            waiting.retain_mut(|w| {
                if w.seq > flushed {
                    return true;
                }
                for r in w.regions.clone() {
                    if let Some(reg) = regions.get_mut(&r) {
                        reg.pending -= 1;
                    }
                }
                done.extend(w.replaced.take());
                false
            });
            for r in closing {
                if regions
                    .get(&r)
                    .is_some_and(|g| g.closing && !g.durable && g.pending == 0)
                {
                    regions.remove(&r);
                }
            }
            *retiring += done.len();
            done
        };
        for (key, old) in replaced {
            let r = self.retire_replaced(&key, &old);
            lock(&self.state).retiring -= 1;
            if let Err(e) = r {
                tracing::warn!(
                    site = %self.sb.site,
                    "{key}: zeroing the replaced share's header at {}: {e}; retried at the key's delete and at the next start",
                    old.offset
                );
            }
        }
        Ok(())
    }

    /// Zeroes and frees the extent a put replaced, now that the new entry is durable, if its
    /// retiring record is still there (a delete of the key may have finished it first, and the
    /// space may hold another share since).
    fn retire_replaced(&self, key: &ShareKey, old: &IndexEntry) -> Result<(), StoreError> {
        let _guard = self
            .key_lock(key)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let record = self
            .retiring
            .get(old.offset.to_be_bytes())
            .map_err(|e| self.ix(e))?;
        if record.and_then(|r| decode_retiring(&r).ok()) != Some((*key, *old)) {
            return Ok(());
        }
        // The new entry is durable (this runs after its flush): nothing durable names the
        // extent any more, so it is free at once.
        if self.retire_checked(key, old)? {
            lock(&self.alloc).free(old.offset, old.extent_len);
        }
        Ok(())
    }

    /// Zeroes a retiring extent if its header is still the replaced share's, and drops its
    /// record; true if it zeroed it: the extent is then the record's, and the caller frees it
    /// once no durable index can name it (a delete, only after its own flush: the replace
    /// that retired it may not be flushed yet, and the durable index still name it). Else
    /// the record just goes: the space is not its to free.
    pub(super) fn retire_checked(
        &self,
        key: &ShareKey,
        e: &IndexEntry,
    ) -> Result<bool, StoreError> {
        let header = self
            .dev
            .read_at(self.dev.alloc_buf(self.sb.block_size as usize), e.offset)?;
        let ours = ShareHeader::decode(header.as_slice())
            .is_ok_and(|h| e.matches(&h, key, &self.sb.volume_id));
        if ours {
            // Durably overwritten first, so a volume scan no longer sees it; a failure keeps
            // the record for `open`.
            tombstone(&self.dev, &self.sb, e.offset)?;
        }
        self.retiring
            .remove(e.offset.to_be_bytes())
            .map_err(|err| self.ix(err))?;
        Ok(ours)
    }
}
