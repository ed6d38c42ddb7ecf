//! Key streams: the sending and the receiving end of one (link, direction).
//!
//! Sender: key is reserved ahead in windows; "reserved up to X" is persisted (fdatasync)
//! before any byte below X is used, and a restart resumes at the persisted X, so a crash
//! wastes at most one window and never reuses a byte. Receiver: before accepting a frame
//! whose key ends above its persisted window end W it persists a new W; in memory it keeps
//! the exact consumed ranges; after a restart everything below W counts as consumed.
//! Both ends destroy used key (and, on open, everything below the resume point).
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::ledger::{FileLedger, LedgerStore, Role};
use super::seal::{self, SealError};
use super::{hex, LinkError};
use crate::keys::{Direction, KeyError, KeySource, PoolFile};
use crate::wire::frame::{
    key_len_for, key_position, FrameError, FrameHeader, HEADER_LEN, KEY_BLOCK, MAC_KEY_LEN,
    MAX_PAYLOAD_LEN, TAG_LEN,
};

/// Bytes of ciphertext [`FrameGrant::seal_parts_to`] hands out at a time: sealed a
/// [`seal::CHUNK`] at a time (each piece XORed and hashed while in cache), written to the
/// socket four pieces at once, still in L2. Measured against one piece per write (session 9,
/// docs/benchmarks.md): `qgenome bench e2e --size 1G` store +7% (per CPU-second +8%),
/// `qgenome-mountd bench` put per CPU-second +7%; two pieces and eight (the whole 1 MiB
/// share) both measured below four.
pub const EMIT_TILE: usize = 4 * seal::CHUNK;

/// Tunables of a stream end.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Key reserved per ledger write. A crash wastes at most this much key.
    pub window: u64,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self { window: 64 << 20 }
    }
}

/// `<dir>/<link>.<direction>.ledger`
pub fn ledger_path(dir: &Path, link: &str, direction: Direction) -> PathBuf {
    dir.join(format!("{link}.{direction}.ledger"))
}

/// Common state of both ends.
struct End {
    key: Arc<dyn KeySource>,
    ledger: Box<dyn LedgerStore>,
    window: u64,
    /// Persisted ledger value.
    persisted: u64,
}

/// One frame's key range in a key source.
struct RangeKey<'a> {
    key: &'a dyn KeySource,
    base: u64,
}

/// Reads and lends key by the frame's own offsets (the MAC key, then the pad), placed in its
/// blocks by [`key_position`]; the seal never asks for bytes across a slot
/// ([`seal::FrameKey::contiguous`]), and a request that would is refused outright.
impl seal::FrameKey for RangeKey<'_> {
    type Error = KeyError;
    fn read(&mut self, rel: u64, buf: &mut [u8]) -> Result<(), KeyError> {
        let (at, run) = key_position(rel);
        assert!(buf.len() as u64 <= run, "a key read across a MAC key slot");
        self.key.read_at(self.base + at, buf)
    }
    fn mapped(&self, rel: u64, len: usize) -> Option<&[u8]> {
        let (at, run) = key_position(rel);
        assert!(len as u64 <= run, "a key loan across a MAC key slot");
        self.key.mapped(self.base + at, len)
    }
    fn contiguous(&self, rel: u64) -> u64 {
        key_position(rel).1
    }
}

impl End {
    fn link(&self) -> &str {
        &self.key.info().link
    }

    /// Validate the ledger against the pool, then destroy all key below the resume point.
    fn new(
        key: Box<dyn KeySource>,
        ledger: Box<dyn LedgerStore>,
        opts: &StreamOptions,
    ) -> Result<Self, LinkError> {
        let value = ledger.value();
        let key_len = key.len();
        let link = key.info().link.clone();
        if value > key_len {
            return Err(LinkError::LedgerBeyondPool {
                link,
                path: ledger.location().to_path_buf(),
                pool: key.location().to_path_buf(),
                value,
                key_len,
            });
        }
        if value < key_len && key_destroyed_at(key.as_ref(), value)? {
            return Err(LinkError::StaleLedger {
                link,
                path: ledger.location().to_path_buf(),
                pool: key.location().to_path_buf(),
                value,
            });
        }
        let end = Self {
            key: Arc::from(key),
            ledger,
            window: opts.window.max(1),
            persisted: value,
        };
        end.key.destroy(0..value)?;
        end.key.sync()?;
        Ok(end)
    }

    /// Persist a window end covering `need_end` (before any key below it is used).
    fn cover(&mut self, need_end: u64) -> Result<(), LinkError> {
        if need_end <= self.persisted {
            return Ok(());
        }
        let new = need_end
            .max(self.persisted.saturating_add(self.window))
            .min(self.key.len());
        self.key.reserve(new)?;
        // Durable destruction of the previous window's key rides on the ledger cadence.
        self.key.sync()?;
        self.ledger.store(new)?;
        self.persisted = new;
        Ok(())
    }

    fn seal_error(&self, e: SealError<KeyError>, offset: u64) -> LinkError {
        seal_error(self.key.as_ref(), e, offset)
    }
}

/// Hand used key `r` to the pool's destruction. A failure (this range's, or one the
/// destroyer met earlier and reports now) does not fail the frame that used it: the range
/// counts as used whatever happens, the pool keeps every range it failed on, and its next
/// sync, which every new window's reservation waits for, destroys them or stops the stream
/// with the error.
fn destroy_used(key: &dyn KeySource, r: Range<u64>) {
    if let Err(e) = key.destroy(r.clone()) {
        tracing::warn!(
            "link {}: destroying used key {}..{} of {}: {e}; retried before the next window is reserved",
            key.info().link,
            r.start,
            r.end,
            key.location().display()
        );
    }
}

fn seal_error(key: &dyn KeySource, e: SealError<KeyError>, offset: u64) -> LinkError {
    match e {
        SealError::Key(k) => k.into(),
        SealError::KeyDestroyed => LinkError::KeyDestroyed {
            link: key.info().link.clone(),
            pool: key.location().to_path_buf(),
            offset,
        },
        SealError::BadTag => LinkError::BadTag {
            link: key.info().link.clone(),
            offset,
        },
    }
}

/// True if the key at `offset` reads as zeros (32 bytes of random key are all zero with
/// probability 2^-256): it was destroyed, so a ledger pointing here is stale.
fn key_destroyed_at(key: &dyn KeySource, offset: u64) -> Result<bool, LinkError> {
    let n = (key.len() - offset).min(MAC_KEY_LEN) as usize;
    let mut b = Zeroizing::new([0u8; MAC_KEY_LEN as usize]);
    key.read_at(offset, &mut b[..n])?;
    // Constant time: these are the next frame's MAC key bytes when the ledger is current.
    Ok(bool::from(b[..n].ct_eq(&[0u8; MAC_KEY_LEN as usize][..n])))
}

/// Refuse a window (`StreamOptions::window`) larger than the key of the pool at `pool`
/// (`key_len` bytes): each restart of a stream may destroy up to a window of unused key, so a
/// slip such as "64G" for "64M" would throw the whole pool away at the first restart.
pub fn check_window(link: &str, pool: &Path, key_len: u64, window: u64) -> Result<(), LinkError> {
    if window > key_len {
        return Err(LinkError::WindowTooLarge {
            link: link.to_string(),
            pool: pool.to_path_buf(),
            window,
            key_len,
        });
    }
    Ok(())
}

/// Open and lock the ledger at `path` for the stream `key` holds; create it only when there is
/// none and the key is untouched (its first bytes not destroyed).
///
/// A new ledger starts at the second key block, which is destroyed first, durably, before
/// the ledger exists and any key is read. So a pool once used always shows it, and a ledger
/// lost (deleted, or a second key directory reaching the same pool through a symlink) is
/// refused as missing. Starting at 0, the first block was destroyed only once its frame had
/// been used, in the background, and durably only at the next window: a process killed
/// within that time left the pool looking untouched, and a new ledger would have used the
/// same key again. (A crash between the destruction and the ledger leaves a pool refused as
/// missing its ledger: the safe side, as after a lost ledger.)
pub fn open_ledger(path: &Path, role: Role, key: &dyn KeySource) -> Result<FileLedger, LinkError> {
    let info = key.info();
    match FileLedger::open(path, &info.link, role, info.stream_id)? {
        Some(l) => Ok(l),
        None => {
            if !key.is_empty() && key_destroyed_at(key, 0)? {
                return Err(LinkError::LedgerMissing {
                    link: info.link.clone(),
                    path: path.to_path_buf(),
                    pool: key.location().to_path_buf(),
                });
            }
            let start = crate::wire::frame::KEY_BLOCK.min(key.len());
            key.destroy(0..start)?;
            key.sync()?;
            FileLedger::create(path, &info.link, role, info.stream_id, start)
        }
    }
}

type Parts = (Box<dyn KeySource>, Box<dyn LedgerStore>);

/// Open a pool file and its ledger (creating the ledger only for an untouched pool).
fn open_files(
    dir: &Path,
    link: &str,
    direction: Direction,
    role: Role,
) -> Result<Parts, LinkError> {
    let end = match role {
        Role::Sender => direction.sender(),
        Role::Receiver => direction.receiver(),
    };
    let pool = PoolFile::open(dir, link, direction, end)?;
    let ledger = open_ledger(&ledger_path(dir, link, direction), role, &pool)?;
    Ok((Box::new(pool), Box::new(ledger)))
}

/// Key left in one stream at one end, from the pool header and the ledger (read only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    /// "sender" or "receiver".
    pub role: &'static str,
    pub key_len: u64,
    pub ledger_value: u64,
    /// Key bytes above the ledger value: what this stream can still use after a restart.
    pub remaining: u64,
}

/// Status of the stream of `link` in `direction` held in `dir` (whichever end it is).
pub fn status(dir: &Path, link: &str, direction: Direction) -> Result<StreamStatus, LinkError> {
    let path = crate::keys::pool::pool_path(dir, link, direction);
    let hdr = PoolFile::read_header(&path, link)?;
    // A pool cut short on its way to the far site: as opening it would say.
    let actual = std::fs::metadata(&path)
        .map_err(|source| KeyError::Io {
            link: link.to_string(),
            path: path.clone(),
            op: "stat pool",
            source,
        })?
        .len();
    crate::keys::pool::check_len(link, &path, hdr.key_len, actual)?;
    let role = if hdr.end == direction.sender() {
        "sender"
    } else {
        "receiver"
    };
    let lpath = ledger_path(dir, link, direction);
    let value = match super::ledger::peek(&lpath, link)? {
        // Never opened: its ledger will start past the first key block (`open_ledger`).
        None => crate::wire::frame::KEY_BLOCK.min(hdr.key_len),
        Some(s) if s.stream_id != hdr.stream_id => {
            return Err(LinkError::LedgerForeign {
                link: link.to_string(),
                path: lpath,
            })
        }
        Some(s) => s.value,
    };
    Ok(StreamStatus {
        role,
        key_len: hdr.key_len,
        ledger_value: value,
        remaining: hdr.key_len.saturating_sub(value),
    })
}

/// Where a sealed frame's key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFrame {
    pub key_range: Range<u64>,
}

/// Why [`FrameGrant::seal_parts_to`] failed: the link, or the writing (`E`) of the frame.
#[derive(Debug)]
pub enum SealWriteError<E> {
    Link(LinkError),
    Write(E),
}

impl<E> From<LinkError> for SealWriteError<E> {
    fn from(e: LinkError) -> Self {
        Self::Link(e)
    }
}

/// The sending end of one (link, direction).
pub struct SendStream {
    end: End,
    next: u64,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream")
            .field("link", &self.end.link())
            .field("pool", &self.end.key.location())
            .field("next", &self.next)
            .field("reserved_until", &self.end.persisted)
            .finish()
    }
}

impl SendStream {
    /// Open the sending end of `link` in `direction` from the pool and ledger in `dir`.
    pub fn from_dir(
        dir: &Path,
        link: &str,
        direction: Direction,
        opts: StreamOptions,
    ) -> Result<Self, LinkError> {
        let (key, ledger) = open_files(dir, link, direction, Role::Sender)?;
        Self::with_parts(key, ledger, opts)
    }

    /// A sending end over any key source and ledger store.
    pub fn with_parts(
        key: Box<dyn KeySource>,
        ledger: Box<dyn LedgerStore>,
        opts: StreamOptions,
    ) -> Result<Self, LinkError> {
        let end = End::new(key, ledger, &opts)?;
        let next = end.persisted;
        Ok(Self { end, next })
    }

    /// Seal `payload` into `out` (resized to the frame; its capacity is reused).
    pub fn seal(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<SealedFrame, LinkError> {
        self.seal_parts(&[payload], out)
    }

    /// [`seal`](Self::seal) of the concatenation of `parts`, without building it (a message
    /// head and the share it carries, say).
    pub fn seal_parts(
        &mut self,
        parts: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<SealedFrame, LinkError> {
        self.grant(parts.iter().map(|p| p.len()).sum())?
            .seal_parts(parts, out)
    }

    /// Check that a frame of `payload_len` bytes fits the rest of the pool, persist a window
    /// covering it, and take its key range: from here the range counts as used, whatever
    /// happens. The grant seals the frame without this stream: a link's connections hold
    /// their stream only for this call, and seal (and send) their frames side by side.
    pub fn grant(&mut self, payload_len: usize) -> Result<FrameGrant, LinkError> {
        let link = || self.end.link().to_string();
        if payload_len as u64 > MAX_PAYLOAD_LEN {
            return Err(LinkError::PayloadTooLarge {
                link: link(),
                len: payload_len,
            });
        }
        let need = key_len_for(payload_len as u64).expect("bounded payload");
        // Frames start on a key block; what lies before the next one (after a restart or a
        // skip) is never used, and goes with this frame's range below.
        let start = self.next.next_multiple_of(KEY_BLOCK);
        let remaining = self.end.key.len().saturating_sub(start);
        if need > remaining {
            return Err(LinkError::Exhausted {
                link: link(),
                pool: self.end.key.location().to_path_buf(),
                needed: need,
                remaining,
            });
        }
        let range = start..start + need;
        self.end.cover(range.end)?;
        let header = FrameHeader {
            stream_id: self.end.key.info().stream_id,
            key_offset: range.start,
            payload_len: payload_len as u64,
        };
        if start > self.next {
            destroy_used(self.end.key.as_ref(), self.next..start);
        }
        self.next = range.end;
        Ok(FrameGrant {
            key: self.end.key.clone(),
            header,
            range,
            spent: false,
        })
    }

    /// Move the next key offset forward to `offset` (e.g. to `consumed_until` of a
    /// receiver's `KeyAlreadyUsed`). Skipped key is destroyed. Never moves back.
    pub fn skip_to(&mut self, offset: u64) -> Result<(), LinkError> {
        if offset < self.next {
            return Err(LinkError::SkipBackwards {
                link: self.end.link().to_string(),
                from: self.next,
                to: offset,
            });
        }
        let offset = offset.min(self.end.key.len());
        self.end.cover(offset)?;
        // Skipped from here on, whatever the destruction gives: a pad must never be read
        // from key handed to the destroyer (a punched pad reads as zeros).
        let skipped = self.next..offset;
        self.next = offset;
        destroy_used(self.end.key.as_ref(), skipped);
        Ok(())
    }

    /// Key bytes not yet used.
    pub fn remaining(&self) -> u64 {
        self.end.key.len() - self.next
    }

    /// Wait until all used key is destroyed and the destruction is durable.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        Ok(self.end.key.sync()?)
    }

    /// Key offset the next frame will use.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Persisted "reserved up to" value.
    pub fn reserved_until(&self) -> u64 {
        self.end.persisted
    }
}

/// One frame's key range, taken from a [`SendStream`] ([`SendStream::grant`]): the frame is
/// sealed with it while the stream is free for other frames. Each method seals one frame of
/// exactly the granted length and destroys the range; a grant dropped unused destroys it too
/// (taken key counts as used whatever happens).
pub struct FrameGrant {
    key: Arc<dyn KeySource>,
    header: FrameHeader,
    range: Range<u64>,
    spent: bool,
}

impl std::fmt::Debug for FrameGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameGrant")
            .field("link", &self.key.info().link)
            .field("key_range", &self.range)
            .finish()
    }
}

impl FrameGrant {
    fn key(&self) -> RangeKey<'_> {
        RangeKey {
            key: self.key.as_ref(),
            base: self.range.start,
        }
    }

    fn check_len(&self, len: usize) {
        assert_eq!(
            len as u64, self.header.payload_len,
            "a frame grant seals exactly the payload length it was granted for"
        );
    }

    /// The range was used (sealed with, or lost to a failure): destroy it.
    fn used(mut self, sealed: Result<(), SealError<KeyError>>) -> Result<SealedFrame, LinkError> {
        self.spent = true;
        let range = self.range.clone();
        destroy_used(self.key.as_ref(), range.clone());
        sealed.map_err(|e| seal_error(self.key.as_ref(), e, range.start))?;
        Ok(SealedFrame { key_range: range })
    }

    /// Seal the concatenation of `parts` into `out` (resized to the frame; its capacity is
    /// reused), without building it (a message head and the share it carries, say).
    pub fn seal_parts(self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<SealedFrame, LinkError> {
        self.check_len(parts.iter().map(|p| p.len()).sum());
        let r = seal::seal(&self.header, parts, out, &mut self.key());
        self.used(r)
    }

    /// Seal the concatenation of `parts` and hand the frame to `emit` as it is sealed, a
    /// `tile` at a time (resized to [`EMIT_TILE`]; its capacity is reused), so that the
    /// frame is never whole in memory and each piece of ciphertext goes out while in cache.
    /// `emit` gets the frame's pieces in order, three at a time: the header (empty after the
    /// first call), a tile, and the tag (empty before the last call). Once `emit` fails it is
    /// not called again, and what it wrote of the frame is unfinished. The tile is wiped when
    /// sealing fails (it may hold key then).
    pub fn seal_parts_to<E>(
        self,
        parts: &[&[u8]],
        tile: &mut Vec<u8>,
        mut emit: impl FnMut(&[&[u8]; 3]) -> Result<(), E>,
    ) -> Result<SealedFrame, SealWriteError<E>> {
        self.check_len(parts.iter().map(|p| p.len()).sum());
        let mut failed = None;
        let r = (|| {
            let key = &mut self.key();
            let mut sealer = seal::Sealer::new(&self.header, parts, key)?;
            let head = *sealer.header();
            tile.resize(EMIT_TILE, 0);
            let mut first = true;
            loop {
                let t = &mut tile[..sealer.remaining().min(EMIT_TILE)];
                if let Err(e) = sealer.next(t, key) {
                    zeroize::Zeroize::zeroize(&mut tile[..]);
                    return Err(e);
                }
                let h = if first { &head[..] } else { &[][..] };
                first = false;
                if sealer.remaining() > 0 {
                    if let Err(e) = emit(&[h, t, &[]]) {
                        failed = Some(e);
                        return Ok(());
                    }
                    continue;
                }
                let tag = sealer.finish();
                if let Err(e) = emit(&[h, t, &tag]) {
                    failed = Some(e);
                }
                return Ok(());
            }
        })();
        let sealed = self.used(r)?;
        match failed {
            Some(e) => Err(SealWriteError::Write(e)),
            None => Ok(sealed),
        }
    }

    /// Seal the payload in `body` (its pieces, in order) in place: the frame is the header
    /// returned, `body`, then the tag returned, to be written out as they are (a share read
    /// from a volume goes out from the buffer it was read into, never copied into a frame).
    /// When sealing fails `body` is wiped.
    pub fn seal_in_place(
        self,
        body: &mut [&mut [u8]],
    ) -> Result<([u8; HEADER_LEN], [u8; TAG_LEN]), LinkError> {
        self.check_len(body.iter().map(|b| b.len()).sum());
        let header = self.header.encode();
        let r = seal::seal_in_place(&self.header, body, &mut self.key());
        let tag = r.as_ref().ok().copied();
        self.used(r.map(|_| ()))?;
        Ok((header, tag.expect("used() is Ok only when sealing was")))
    }
}

impl Drop for FrameGrant {
    fn drop(&mut self) {
        if !self.spent {
            // Never sealed with (a panic, say): destroyed all the same; an error here is the
            // pool's, and the next use of it reports it.
            let _ = self.key.destroy(self.range.clone());
        }
    }
}

/// Disjoint, coalesced half-open ranges.
#[derive(Debug, Default, Clone)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// The end of a stored range overlapping `r`, if any.
    pub fn overlap(&self, r: &Range<u64>) -> Option<u64> {
        let (_, &end) = self.map.range(..r.end).next_back()?;
        (end > r.start).then_some(end)
    }

    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let absorbed: Vec<u64> = self.map.range(start..=end).map(|(&s, _)| s).collect();
        for s in absorbed {
            end = end.max(self.map.remove(&s).expect("present"));
        }
        self.map.insert(start, end);
    }

    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    /// Fill the lowest gaps until at most `max` ranges are left: the key in them then counts
    /// as used. Each gap is key a sender used for a frame the receiver never accepted (a
    /// connection cut mid-frame, a refused frame); filled, a late frame there is refused as a
    /// replay, which is the safe side, and the set stays bounded however many connections
    /// are cut. Returns the gaps filled.
    pub fn fill_lowest_gaps(&mut self, max: usize) -> Vec<Range<u64>> {
        let mut filled = Vec::new();
        while self.map.len() > max.max(1) {
            let mut it = self.map.iter();
            let (&s1, &e1) = it.next().expect("more than one range");
            let (&s2, &e2) = it.next().expect("more than one range");
            self.map.remove(&s2);
            self.map.insert(s1, e2);
            filled.push(e1..s2);
        }
        filled
    }

    /// Fill every gap that ends at or below `floor`; returns the gaps filled.
    pub fn fill_gaps_below(&mut self, floor: u64) -> Vec<Range<u64>> {
        let mut filled = Vec::new();
        loop {
            let mut it = self.map.iter();
            let (Some((&s1, &e1)), Some((&s2, &e2))) = (it.next(), it.next()) else {
                break;
            };
            if s2 > floor {
                break;
            }
            self.map.remove(&s2);
            self.map.insert(s1, e2);
            filled.push(e1..s2);
        }
        filled
    }

    /// The end of the highest range (0 if none).
    pub fn top(&self) -> u64 {
        self.map.last_key_value().map_or(0, |(_, &e)| e)
    }
}

/// Most disjoint consumed ranges a receiving end keeps (see [`RangeSet::fill_lowest_gaps`]).
pub const MAX_CONSUMED_RANGES: usize = 4096;

/// How long a gap in a receiving end's consumed key may stay (see [`RecvStream`]).
pub const GAP_LIFETIME: Duration = Duration::from_secs(300);

/// The receiving end of one (link, direction).
///
/// A gap below the highest consumed byte is key the sender used for a frame that has not
/// arrived: one still on its way, or one that never will (a connection cut mid-frame, a
/// frame dropped on the way). The sender destroyed its copy; the receiver's would outlive
/// it, and decrypt a recorded frame if the pool were taken later. So gaps die of age: the
/// sender grants key in increasing order, so once a frame ending at T is accepted, every
/// frame below T was granted before it; [`GAP_LIFETIME`] later (far past any frame's
/// timeout) the gaps below T are filled and their key destroyed, and a frame still to come
/// there is refused as a replay (its sender retries on fresh key).
pub struct RecvStream {
    end: End,
    consumed: RangeSet,
    /// Key ranges of frames admitted and being opened outside the stream's lock
    /// ([`RecvStream::admit`]): no other frame over them is admitted meanwhile.
    opening: Vec<Range<u64>>,
    /// (when, the highest consumed byte then), oldest first, at most one per
    /// `gap_lifetime / 8`.
    tops: VecDeque<(Instant, u64)>,
    /// The newest such pair, kept aside until it is its turn in `tops`.
    pending: Option<(Instant, u64)>,
    gap_lifetime: Duration,
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvStream")
            .field("link", &self.end.link())
            .field("pool", &self.end.key.location())
            .field("window_end", &self.end.persisted)
            .finish()
    }
}

/// A frame [`RecvStream::admit`]ted: its key range reserved, to be verified and decrypted
/// with [`AdmittedFrame::open`] outside the stream, then given to [`RecvStream::finish`].
#[must_use = "a frame admitted and never finished keeps its key range from every later frame"]
pub struct AdmittedFrame {
    header: FrameHeader,
    range: Range<u64>,
    key: Arc<dyn KeySource>,
}

impl std::fmt::Debug for AdmittedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmittedFrame")
            .field("key_range", &self.range)
            .finish_non_exhaustive()
    }
}

/// An [`AdmittedFrame`]'s ciphertext opened as it arrives ([`AdmittedFrame::opener`]).
pub struct FrameOpen<'a>(seal::InPlaceOpen<RangeKey<'a>>);

impl FrameOpen<'_> {
    /// Decrypts the next piece of the frame's ciphertext in place (hashed first). Unverified
    /// until [`FrameOpen::finish`]: on its failure the caller wipes every piece.
    pub fn update(&mut self, piece: &mut [u8]) -> Result<(), SealError<KeyError>> {
        self.0.update(piece)
    }

    /// Checks the tag once the whole ciphertext went through [`FrameOpen::update`]; the
    /// result goes to [`RecvStream::finish`].
    pub fn finish(self, tag: &[u8]) -> Result<(), SealError<KeyError>> {
        self.0.finish(tag)
    }
}

impl AdmittedFrame {
    /// Opens the frame piece by piece as its ciphertext arrives, instead of at once with
    /// [`AdmittedFrame::open`].
    pub fn opener(&self) -> Result<FrameOpen<'_>, SealError<KeyError>> {
        seal::InPlaceOpen::new(
            &self.header,
            RangeKey {
                key: self.key.as_ref(),
                base: self.range.start,
            },
        )
        .map(FrameOpen)
    }

    /// Verifies the frame's tag and decrypts `body` (its ciphertext, in pieces) in place with
    /// the frame's key; on any failure every piece of `body` is wiped. Nothing is accepted
    /// until [`RecvStream::finish`].
    pub fn open(&self, body: &mut [&mut [u8]], tag: &[u8]) -> Result<(), SealError<KeyError>> {
        let r = seal::open_in_place(
            &self.header,
            body,
            tag,
            &mut RangeKey {
                key: self.key.as_ref(),
                base: self.range.start,
            },
        );
        if r.is_err() {
            body.iter_mut().for_each(|b| zeroize::Zeroize::zeroize(*b));
        }
        r
    }
}

impl RecvStream {
    /// Open the receiving end of `link` in `direction` from the pool and ledger in `dir`.
    pub fn from_dir(
        dir: &Path,
        link: &str,
        direction: Direction,
        opts: StreamOptions,
    ) -> Result<Self, LinkError> {
        let (key, ledger) = open_files(dir, link, direction, Role::Receiver)?;
        Self::with_parts(key, ledger, opts)
    }

    /// A receiving end over any key source and ledger store.
    pub fn with_parts(
        key: Box<dyn KeySource>,
        ledger: Box<dyn LedgerStore>,
        opts: StreamOptions,
    ) -> Result<Self, LinkError> {
        let end = End::new(key, ledger, &opts)?;
        let mut consumed = RangeSet::default();
        consumed.insert(0..end.persisted);
        Ok(Self {
            end,
            consumed,
            opening: Vec::new(),
            tops: VecDeque::new(),
            pending: None,
            gap_lifetime: GAP_LIFETIME,
        })
    }

    /// Verify and decrypt a whole `frame` into `out` (resized to the payload; the ciphertext is
    /// copied there and opened in place). On any error `out` is left empty and wiped; key is
    /// marked consumed only after the tag verified.
    pub fn open(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<SealedFrame, LinkError> {
        let header = match FrameHeader::parse_frame(frame) {
            Ok(h) => h,
            Err(source) => {
                out.clear();
                return Err(self.bad_frame(source));
            }
        };
        let (head, rest) = frame.split_at(HEADER_LEN);
        let (ct, tag) = rest.split_at(header.payload_len as usize);
        // Grown without leaving the last message's plaintext in a freed block.
        crate::resize_wiped(out, ct.len());
        out.copy_from_slice(ct);
        let head: &[u8; HEADER_LEN] = head.try_into().expect("parse_frame checked the length");
        let r = self.open_in_place(head, &mut [out.as_mut_slice()], tag);
        if r.is_err() {
            out.clear();
        }
        r
    }

    /// Open a frame received in pieces: its header `head`, its ciphertext read straight into
    /// `body` (say a message head, then a share in the store buffer it is written from),
    /// and its `tag`. Verified and decrypted in place, so the payload is not copied. On any
    /// error every piece of `body` is wiped; key is marked consumed only after the tag
    /// verified.
    pub fn open_in_place(
        &mut self,
        head: &[u8; HEADER_LEN],
        body: &mut [&mut [u8]],
        tag: &[u8],
    ) -> Result<SealedFrame, LinkError> {
        let r = self.open_in_place_inner(head, body, tag);
        if r.is_err() {
            body.iter_mut().for_each(|b| zeroize::Zeroize::zeroize(*b));
        }
        r
    }

    fn open_in_place_inner(
        &mut self,
        head: &[u8; HEADER_LEN],
        body: &mut [&mut [u8]],
        tag: &[u8],
    ) -> Result<SealedFrame, LinkError> {
        let body_len = body.iter().map(|b| b.len() as u64).sum::<u64>();
        let frame = self.admit(head, body_len, tag.len())?;
        let opened = frame.open(body, tag);
        self.finish(frame, opened)
    }

    /// The first of the three steps of [`RecvStream::open_in_place`], for a receiver that
    /// verifies and decrypts outside the stream's lock (several connections of one link at
    /// once): checks the header of a frame whose ciphertext is `body_len` bytes and whose tag
    /// `tag_len`, and reserves its key range, which no other frame is admitted over until
    /// [`RecvStream::finish`]. Then [`AdmittedFrame::open`], without the stream, then
    /// `finish` with its result, which alone marks the key used (or refuses the frame). A
    /// frame admitted and never finished keeps its range from every later frame.
    pub fn admit(
        &mut self,
        head: &[u8; HEADER_LEN],
        body_len: u64,
        tag_len: usize,
    ) -> Result<AdmittedFrame, LinkError> {
        let header = FrameHeader::parse_prefix(head, MAX_PAYLOAD_LEN)
            .map_err(|source| self.bad_frame(source))?;
        if body_len != header.payload_len || tag_len != TAG_LEN {
            return Err(self.bad_frame(FrameError::LengthMismatch {
                declared: header.payload_len,
                actual: (body_len + tag_len as u64).saturating_sub(TAG_LEN as u64),
            }));
        }
        let range = self.admit_range(&header)?;
        self.opening.push(range.clone());
        Ok(AdmittedFrame {
            header,
            range,
            key: Arc::clone(&self.end.key),
        })
    }

    /// The last step of an open begun with [`RecvStream::admit`]: `opened` is what
    /// [`AdmittedFrame::open`] gave. A frame whose tag verified has its key used and destroyed
    /// from now on; one that did not frees its range (as [`RecvStream::open_in_place`]
    /// does: the key was not used, and a forged frame must not burn it).
    pub fn finish(
        &mut self,
        frame: AdmittedFrame,
        opened: Result<(), SealError<KeyError>>,
    ) -> Result<SealedFrame, LinkError> {
        if let Some(i) = self.opening.iter().position(|r| *r == frame.range) {
            self.opening.swap_remove(i);
        }
        if let Err(e) = opened {
            // Its gap filled as dead while it was opened: the key is never used now, and
            // its destruction was left to this frame.
            if self.consumed.overlap(&frame.range).is_some() {
                destroy_used(self.end.key.as_ref(), frame.range.clone());
            }
            return Err(self.end.seal_error(e, frame.range.start));
        }
        self.accept(frame.range)
    }

    fn bad_frame(&self, source: FrameError) -> LinkError {
        LinkError::BadFrame {
            link: self.end.link().to_string(),
            source,
        }
    }

    /// The key range of a frame with `header`, once it is known to be of this stream, inside
    /// the pool, not yet used and not being opened; reserved.
    fn admit_range(&mut self, header: &FrameHeader) -> Result<Range<u64>, LinkError> {
        let link = self.end.link().to_string();
        let info = self.end.key.info();
        if header.stream_id != info.stream_id {
            return Err(LinkError::WrongStream {
                link,
                expected: hex(&info.stream_id),
                found: hex(&header.stream_id),
            });
        }
        let range = header
            .key_range()
            .map_err(|source| self.bad_frame(source))?;
        if range.end > self.end.key.len() {
            return Err(LinkError::OutsidePool {
                link,
                pool: self.end.key.location().to_path_buf(),
                start: range.start,
                end: range.end,
                key_len: self.end.key.len(),
            });
        }
        let opening = self
            .opening
            .iter()
            .find(|r| r.start < range.end && range.start < r.end)
            .map(|r| r.end);
        if let Some(consumed_until) = self.consumed.overlap(&range).or(opening) {
            return Err(LinkError::KeyAlreadyUsed {
                link,
                stream: hex(&info.stream_id),
                offset: range.start,
                consumed_until,
            });
        }
        self.end.key.reserve(range.end)?;
        Ok(range)
    }

    /// A frame whose tag verified: its key counts as used from now on, and is destroyed.
    fn accept(&mut self, range: Range<u64>) -> Result<SealedFrame, LinkError> {
        self.end.cover(range.end)?;
        self.consumed.insert(range.clone());
        self.destroy_dead_gaps();
        destroy_used(self.end.key.as_ref(), range.clone());
        Ok(SealedFrame { key_range: range })
    }

    /// Fills the gaps past their lifetime (see [`RecvStream::dead_gaps`]) and destroys their
    /// key, except what frames being opened outside the lock still read: their own
    /// [`RecvStream::finish`] destroys that (a frame admitted before its gap was filled is
    /// still the one frame over its key).
    fn destroy_dead_gaps(&mut self) {
        for gap in self.dead_gaps() {
            let mut from = gap.start;
            let mut opening: Vec<&Range<u64>> = self
                .opening
                .iter()
                .filter(|r| r.start < gap.end && gap.start < r.end)
                .collect();
            opening.sort_by_key(|r| r.start);
            for r in opening {
                if r.start > from {
                    destroy_used(self.end.key.as_ref(), from..r.start);
                }
                from = from.max(r.end);
            }
            if from < gap.end {
                destroy_used(self.end.key.as_ref(), from..gap.end);
            }
        }
    }

    /// Fill the gaps past their lifetime, and the lowest ones past [`MAX_CONSUMED_RANGES`];
    /// returns them, to be destroyed.
    fn dead_gaps(&mut self) -> Vec<Range<u64>> {
        let now = Instant::now();
        let top = self.consumed.top();
        let every = self.gap_lifetime / 8;
        if let Some(p) = self.pending {
            if self
                .tops
                .back()
                .is_none_or(|&(t, _)| now.duration_since(t) >= every)
            {
                self.tops.push_back(p);
                self.pending = None;
            }
        }
        let known = self.pending.or(self.tops.back().copied());
        if known.is_none_or(|(_, t)| top > t) {
            self.pending = Some((now, top));
        }
        let mut floor = 0;
        while let Some(&(t, top)) = self.tops.front() {
            if now.duration_since(t) < self.gap_lifetime {
                break;
            }
            floor = top;
            self.tops.pop_front();
        }
        let mut dead = self.consumed.fill_gaps_below(floor);
        dead.extend(self.consumed.fill_lowest_gaps(MAX_CONSUMED_RANGES));
        dead
    }

    /// Destroy the key of gaps past their lifetime now, without a frame: a link that falls
    /// silent would otherwise keep them until its next frame (called on a timer).
    pub fn expire_gaps(&mut self) {
        self.destroy_dead_gaps();
    }

    /// How long a gap may stay ([`GAP_LIFETIME`] unless set here).
    pub fn set_gap_lifetime(&mut self, lifetime: Duration) {
        self.gap_lifetime = lifetime;
    }

    /// Wait until all used key is destroyed and the destruction is durable.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        Ok(self.end.key.sync()?)
    }

    /// Persisted window end: after a restart, all key below it counts as consumed.
    pub fn window_end(&self) -> u64 {
        self.end.persisted
    }

    /// Key bytes above the highest consumed byte (what the sender can still use).
    pub fn remaining(&self) -> u64 {
        self.end.key.len() - self.consumed.top()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MemKeySource;
    use crate::link::ledger::MemLedger;
    use proptest::prelude::*;

    /// The two ends of one direction over `len` bytes of key in memory, ledgers in memory.
    fn mem_ends(len: usize, window: u64) -> (SendStream, RecvStream) {
        let (a, b) = MemKeySource::pair("t", Direction::AtoB, len);
        let opts = StreamOptions { window };
        let tx = SendStream::with_parts(Box::new(a), Box::new(MemLedger::new("a")), opts.clone())
            .unwrap();
        let rx = RecvStream::with_parts(Box::new(b), Box::new(MemLedger::new("b")), opts).unwrap();
        (tx, rx)
    }

    /// The split open of a frame (admitted under the stream's lock, opened outside it,
    /// finished under it again): while one copy of a frame is being opened, another (a replay
    /// racing the original) is not admitted; a copy that fails its tag leaves the key unused,
    /// so the genuine frame still opens, and only once.
    #[test]
    fn a_frame_being_opened_outside_the_stream_is_not_admitted_twice() {
        let (mut tx, mut rx) = mem_ends(64 * 1024, 1000);
        let mut f = Vec::new();
        tx.seal(b"one share of a chunk", &mut f).unwrap();
        let head: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
        let (ct, tag) = f[HEADER_LEN..].split_at(f.len() - HEADER_LEN - TAG_LEN);
        let len = ct.len() as u64;
        let first = rx.admit(&head, len, TAG_LEN).unwrap();
        assert!(matches!(
            rx.admit(&head, len, TAG_LEN),
            Err(LinkError::KeyAlreadyUsed { .. })
        ));
        let mut forged = ct.to_vec();
        forged[0] ^= 1;
        let opened = first.open(&mut [&mut forged], tag);
        assert!(matches!(
            rx.finish(first, opened),
            Err(LinkError::BadTag { .. })
        ));
        assert!(forged.iter().all(|&b| b == 0), "a forged frame is wiped");
        let mut body = ct.to_vec();
        let again = rx.admit(&head, len, TAG_LEN).unwrap();
        let opened = again.open(&mut [&mut body], tag);
        rx.finish(again, opened).unwrap();
        assert_eq!(body, b"one share of a chunk");
        assert!(matches!(
            rx.admit(&head, len, TAG_LEN),
            Err(LinkError::KeyAlreadyUsed { .. })
        ));
    }

    /// A frame's gap past its lifetime is filled and its key destroyed, but not while the
    /// frame is being opened outside the lock: its key stays whole until its `finish`.
    #[test]
    fn a_dead_gap_keeps_the_key_of_a_frame_being_opened() {
        let (mut tx, mut rx) = mem_ends(64 * 1024, 1000);
        rx.set_gap_lifetime(Duration::ZERO);
        let mut frames = Vec::new();
        for p in [&b"first"[..], b"late frame", b"third", b"fourth"] {
            let mut f = Vec::new();
            tx.seal(p, &mut f).unwrap();
            frames.push(f);
        }
        let parts = |f: &[u8]| {
            let head: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
            let (ct, tag) = f[HEADER_LEN..].split_at(f.len() - HEADER_LEN - TAG_LEN);
            (head, ct.to_vec(), tag.to_vec())
        };
        let mut out = Vec::new();
        rx.open(&frames[0], &mut out).unwrap();
        let (head, mut late, tag) = parts(&frames[1]);
        let admitted = rx.admit(&head, late.len() as u64, TAG_LEN).unwrap();
        for f in &frames[2..] {
            rx.open(f, &mut out).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        rx.expire_gaps();
        assert!(
            rx.consumed.overlap(&admitted.range).is_some(),
            "the late frame's gap was filled as dead"
        );
        let opened = admitted.open(&mut [&mut late], &tag);
        rx.finish(admitted, opened)
            .expect("the late frame's key was kept for it");
        assert_eq!(late, b"late frame");
    }

    /// A frame over many key blocks (whose MAC key slots the pad skips) opened piece by piece
    /// through its admission, cut across those slots, as the site opens a share arriving off
    /// the socket: the payload, once; a bit flipped in a late piece fails at the tag.
    #[test]
    fn an_admitted_frame_opened_piece_by_piece_across_key_slots() {
        let (mut tx, mut rx) = mem_ends(256 * 1024, 1000);
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
        for flip in [Some(17_001), None] {
            let mut f = Vec::new();
            tx.seal(&payload, &mut f).unwrap();
            if let Some(at) = flip {
                f[HEADER_LEN + at] ^= 0x02;
            }
            let head: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
            let (ct, tag) = f[HEADER_LEN..].split_at_mut(payload.len());
            let frame = rx.admit(&head, ct.len() as u64, TAG_LEN).unwrap();
            let verdict = {
                let mut o = frame.opener().unwrap();
                for piece in ct.chunks_mut(1000) {
                    o.update(piece).unwrap();
                }
                o.finish(tag)
            };
            let r = rx.finish(frame, verdict);
            match flip {
                Some(_) => assert!(matches!(r, Err(LinkError::BadTag { .. }))),
                None => {
                    r.unwrap();
                    assert_eq!(ct, &payload[..]);
                }
            }
        }
    }

    #[test]
    fn mem_round_trip_replay_and_restart() {
        let (a, b) = MemKeySource::pair("t", Direction::AtoB, 64 * 1024);
        let (la, lb) = (MemLedger::new("a"), MemLedger::new("b"));
        let opts = StreamOptions { window: 1000 };
        let mut tx =
            SendStream::with_parts(Box::new(a), Box::new(la.clone()), opts.clone()).unwrap();
        let mut rx = RecvStream::with_parts(Box::new(b), Box::new(lb.clone()), opts).unwrap();
        let (mut f, mut o) = (Vec::new(), Vec::new());
        let mut frames = Vec::new();
        for len in [0usize, 1, 100, 700, 2000] {
            let p: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let r = tx.seal(&p, &mut f).unwrap();
            assert!(la.value() >= r.key_range.end, "ledger persisted before use");
            rx.open(&f, &mut o).unwrap();
            assert_eq!(o, p);
            assert!(lb.value() >= r.key_range.end);
            frames.push(f.clone());
        }
        for fr in &frames {
            assert!(matches!(
                rx.open(fr, &mut o),
                Err(LinkError::KeyAlreadyUsed { .. })
            ));
        }
        assert_eq!(tx.remaining(), rx.remaining());
    }

    /// An attacker who knows the plaintext of a frame the receiver never got (a stale
    /// answer, a dropped HELLO) knows its pad, at its places in the pool. No frame built on
    /// that, at any offset inside the frame's key range, is accepted: a forged frame's MAC
    /// key is the slot of the block it claims to start on, and no slot is ever pad. Nor does
    /// a refused forgery use key: the real frame opens afterwards.
    #[test]
    fn known_pad_of_an_undelivered_frame_forges_nothing() {
        let (mut tx, mut rx) = mem_ends(64 * 1024, 1 << 20);
        let known: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        let mut sent = Vec::new();
        let r = tx.seal(&known, &mut sent).unwrap();
        let ct = &sent[HEADER_LEN..HEADER_LEN + known.len()];
        let mut learnt = std::collections::BTreeMap::new();
        for (i, (c, p)) in ct.iter().zip(&known).enumerate() {
            let at = r.key_range.start + key_position(MAC_KEY_LEN + i as u64).0;
            learnt.insert(at, c ^ p);
        }
        let stream_id = FrameHeader::parse_frame(&sent).unwrap().stream_id;
        let payload = [0xEE; 16];
        let mut out = Vec::new();
        for o in r.key_range.clone() {
            let h = FrameHeader {
                stream_id,
                key_offset: o,
                payload_len: payload.len() as u64,
            };
            // The receiver's key for such a frame, with what was learnt where it can be, and
            // a guess elsewhere.
            let key: Vec<u8> = (0..MAC_KEY_LEN + payload.len() as u64)
                .map(|rel| *learnt.get(&(o + key_position(rel).0)).unwrap_or(&0x5a))
                .collect();
            let mut forged = Vec::new();
            seal::seal(&h, &[&payload], &mut forged, &mut &key[..]).unwrap();
            let opened = rx.open(&forged, &mut out);
            assert!(opened.is_err(), "a forged frame at {o} was accepted");
            assert!(out.is_empty());
        }
        rx.open(&sent, &mut out).unwrap();
        assert_eq!(out, known);
    }

    /// A sender starts each frame on a key block, also after a skip (or a restart) that left
    /// it inside one.
    #[test]
    fn frames_start_on_key_blocks() {
        let (mut tx, mut rx) = mem_ends(64 * 1024, 100);
        let (mut f, mut out) = (Vec::new(), Vec::new());
        let r = tx.seal(b"one", &mut f).unwrap();
        assert_eq!(r.key_range, 0..KEY_BLOCK);
        rx.open(&f, &mut out).unwrap();
        let r = tx.seal(&[7; 4065], &mut f).unwrap();
        assert_eq!(
            r.key_range,
            KEY_BLOCK..3 * KEY_BLOCK,
            "4065 bytes of pad take two blocks"
        );
        rx.open(&f, &mut out).unwrap();
        assert_eq!(out, [7; 4065]);
        tx.skip_to(5 * KEY_BLOCK + 100).unwrap();
        let r = tx.seal(b"two", &mut f).unwrap();
        assert_eq!(r.key_range, 6 * KEY_BLOCK..7 * KEY_BLOCK);
        rx.open(&f, &mut out).unwrap();
        assert_eq!(out, b"two");
    }

    /// A frame received in pieces and opened in place: the same checks as a whole frame.
    #[test]
    fn open_in_place_round_trip_replay_and_bad_lengths() {
        let (mut tx, mut rx) = mem_ends(10_000, 1000);
        let p: Vec<u8> = (0..777u32).map(|i| (i * 3) as u8).collect();
        let mut f = Vec::new();
        tx.seal(&p, &mut f).unwrap();
        let head: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
        let (ct, tag) = f[HEADER_LEN..].split_at(p.len());
        let in_place = |rx: &mut RecvStream, cut: usize, body_len: usize| {
            let mut body = ct[..body_len].to_vec();
            let (x, y) = body.split_at_mut(cut);
            let r = rx.open_in_place(&head, &mut [x, y], tag);
            (r, body)
        };
        // One byte short: refused as a frame of the wrong length, and nothing is consumed.
        let (r, body) = in_place(&mut rx, 7, p.len() - 1);
        assert!(matches!(r, Err(LinkError::BadFrame { .. })), "{r:?}");
        assert!(body.iter().all(|&x| x == 0));
        let (r, body) = in_place(&mut rx, 7, p.len());
        r.unwrap();
        assert_eq!(body, p);
        let (r, body) = in_place(&mut rx, 300, p.len());
        assert!(matches!(r, Err(LinkError::KeyAlreadyUsed { .. })), "{r:?}");
        assert!(
            body.iter().all(|&x| x == 0),
            "a refused frame leaves nothing behind"
        );
    }

    /// A frame handed out tile by tile as it is sealed opens like any other; a failed write
    /// stops the frame and still uses its key.
    #[test]
    fn seal_parts_to_streams_frames_that_open() {
        let (mut tx, mut rx) = mem_ends(4 * EMIT_TILE, 1 << 20);
        let head = b"head of 13 by";
        let share: Vec<u8> = (0..EMIT_TILE + 1000).map(|i| (i * 7) as u8).collect();
        let (mut tile, mut out) = (Vec::new(), Vec::new());
        for share in [&share[..], &share[..5], &[][..]] {
            let mut frame = Vec::new();
            let mut calls = 0;
            let grant = tx.grant(head.len() + share.len()).unwrap();
            grant
                .seal_parts_to(&[head, share], &mut tile, |p| {
                    assert_eq!(p[0].is_empty(), calls > 0, "the header comes first, once");
                    frame.extend(p.concat());
                    calls += 1;
                    Ok::<_, ()>(())
                })
                .unwrap();
            assert_eq!(calls, share.len().div_ceil(EMIT_TILE).max(1));
            rx.open(&frame, &mut out).unwrap();
            assert_eq!(out, [&head[..], share].concat());
        }
        // The writer fails on the first tile: not called again, and the key is used.
        let before = tx.remaining();
        let mut calls = 0;
        let grant = tx.grant(head.len() + share.len()).unwrap();
        let r = grant.seal_parts_to(&[head, &share], &mut tile, |_| {
            calls += 1;
            Err("peer gone")
        });
        assert!(matches!(r, Err(SealWriteError::Write("peer gone"))));
        assert_eq!(calls, 1);
        assert!(tx.remaining() < before);
    }

    /// Frames granted under the stream's lock and sealed outside it, four threads at once,
    /// take disjoint key, open in any order, and every granted range is destroyed: the sealed
    /// ones once sealed, one never sealed (dropped) all the same.
    #[test]
    fn grants_seal_side_by_side_on_disjoint_key_and_destroy_it() {
        let (a, b) = MemKeySource::pair("t", Direction::AtoB, 1 << 20);
        let watch = Watch::default();
        let destroyed = watch.destroyed.clone();
        let opts = StreamOptions { window: 64 << 10 };
        let tx = std::sync::Mutex::new(
            SendStream::with_parts(
                Box::new(Watched(a, watch)),
                Box::new(MemLedger::new("a")),
                opts.clone(),
            )
            .unwrap(),
        );
        let before = destroyed.lock().unwrap().len();
        let frames: Vec<(Vec<u8>, Vec<u8>, Range<u64>)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4u8)
                .map(|t| {
                    let tx = &tx;
                    s.spawn(move || {
                        (0..25u8)
                            .map(|i| {
                                let p = vec![t * 50 + i; 100 + 37 * i as usize];
                                let grant = tx.lock().unwrap().grant(p.len()).unwrap();
                                let mut f = Vec::new();
                                let sealed = grant.seal_parts(&[&p], &mut f).unwrap();
                                (p, f, sealed.key_range)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let mut ranges: Vec<_> = frames.iter().map(|f| f.2.clone()).collect();
        ranges.sort_by_key(|r| r.start);
        assert!(
            ranges.windows(2).all(|w| w[0].end <= w[1].start),
            "granted key overlaps"
        );
        let mut rx =
            RecvStream::with_parts(Box::new(b), Box::new(MemLedger::new("b")), opts).unwrap();
        let mut out = Vec::new();
        for (p, f, _) in frames.iter().rev() {
            rx.open(f, &mut out).unwrap();
            assert_eq!(&out, p);
        }
        let unused = tx.lock().unwrap().grant(10).unwrap();
        let unused_range = unused.range.clone();
        drop(unused);
        let mut seen: Vec<_> = destroyed.lock().unwrap()[before..].to_vec();
        seen.sort_by_key(|r| r.start);
        ranges.push(unused_range);
        assert_eq!(seen, ranges);
    }

    /// A ledger whose writes fail.
    struct BrokenLedger;
    impl LedgerStore for BrokenLedger {
        fn location(&self) -> &Path {
            Path::new("<broken>")
        }
        fn value(&self) -> u64 {
            0
        }
        fn store(&mut self, _: u64) -> Result<(), LinkError> {
            Err(LinkError::LedgerCorrupt {
                link: "t".into(),
                path: "<broken>".into(),
                reason: "injected".into(),
            })
        }
    }
    /// A key source that counts its reads and records the ranges it destroys; once
    /// `late_failure` is set, its destroys are carried out but answer with an error, as a
    /// pool's do when its destroyer failed on an earlier range.
    #[derive(Default, Clone)]
    struct Watch {
        reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        destroyed: std::sync::Arc<std::sync::Mutex<Vec<Range<u64>>>>,
        late_failure: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }
    struct Watched(MemKeySource, Watch);
    impl KeySource for Watched {
        fn info(&self) -> &crate::keys::StreamInfo {
            self.0.info()
        }
        fn location(&self) -> &Path {
            self.0.location()
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> Result<(), KeyError> {
            self.1
                .reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.read_at(o, b)
        }
        fn destroy(&self, r: Range<u64>) -> Result<crate::keys::Destroyed, KeyError> {
            self.1.destroyed.lock().unwrap().push(r.clone());
            let done = self.0.destroy(r)?;
            if !self
                .1
                .late_failure
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(done);
            }
            Err(KeyError::Io {
                link: "t".into(),
                op: "punch used key",
                path: "<pool>".into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            })
        }
    }

    /// A frame that never arrives leaves a gap whose key the receiver destroys once the gap
    /// is older than its lifetime (the sender destroyed its copy when it sealed the frame);
    /// before that, the frame is still taken.
    #[test]
    fn a_gap_left_by_a_frame_that_never_came_dies_of_age() {
        let (a, b) = MemKeySource::pair("t", Direction::AtoB, 100_000);
        let opts = StreamOptions { window: 4096 };
        let mut tx =
            SendStream::with_parts(Box::new(a), Box::new(MemLedger::new("a")), opts.clone())
                .unwrap();
        let watch = Watch::default();
        let destroyed = watch.destroyed.clone();
        let mut rx = RecvStream::with_parts(
            Box::new(Watched(b, watch)),
            Box::new(MemLedger::new("b")),
            opts,
        )
        .unwrap();
        // Long enough that the late frame below lands within it on a loaded machine.
        rx.set_gap_lifetime(Duration::from_secs(2));
        let frames: Vec<(Vec<u8>, Range<u64>)> = (0..5u8)
            .map(|i| {
                let mut f = Vec::new();
                let r = tx.seal(&[i; 100], &mut f).unwrap().key_range;
                (f, r)
            })
            .collect();
        let mut out = Vec::new();
        // Frame 1 is late, frame 2 never comes.
        rx.open(&frames[0].0, &mut out).unwrap();
        rx.open(&frames[3].0, &mut out).unwrap();
        rx.open(&frames[1].0, &mut out)
            .expect("a late frame within the lifetime");
        assert_eq!(out, [1u8; 100]);
        let gap = frames[2].1.clone();
        assert!(!destroyed.lock().unwrap().contains(&gap));
        std::thread::sleep(Duration::from_millis(2100));
        // No frame needed: the timer's sweep does it on a link fallen silent.
        rx.expire_gaps();
        assert!(
            destroyed.lock().unwrap().contains(&gap),
            "the dead gap's key was destroyed at the receiver"
        );
        rx.open(&frames[4].0, &mut out).unwrap();
        assert!(
            matches!(
                rx.open(&frames[2].0, &mut out),
                Err(LinkError::KeyAlreadyUsed { .. })
            ),
            "a frame in a dead gap is refused"
        );
        assert_eq!(rx.consumed.ranges().count(), 1, "no gap is left");
    }

    #[test]
    fn an_earlier_destruction_failure_neither_rewinds_a_skip_nor_loses_a_frame() {
        let (a, b) = MemKeySource::pair("t", Direction::AtoB, 100_000);
        let opts = StreamOptions { window: 4096 };
        let watch = Watch::default();
        let mut tx = SendStream::with_parts(
            Box::new(Watched(a, watch.clone())),
            Box::new(MemLedger::new("a")),
            opts.clone(),
        )
        .unwrap();
        let mut rx = RecvStream::with_parts(
            Box::new(Watched(b, watch.clone())),
            Box::new(MemLedger::new("b")),
            opts,
        )
        .unwrap();
        watch
            .late_failure
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tx.skip_to(500)
            .expect("the skip stands whatever the destroyer reports");
        assert_eq!(tx.next_offset(), 500, "no pad comes from the skipped key");
        let mut frame = Vec::new();
        let sealed = tx.seal(b"a share", &mut frame).expect("sealed");
        assert!(sealed.key_range.start >= 500, "{:?}", sealed.key_range);
        let mut out = Vec::new();
        rx.open(&frame, &mut out)
            .expect("an authentic frame is accepted");
        assert_eq!(out, b"a share");
        assert!(
            rx.open(&frame, &mut out).is_err(),
            "its key counts as used all the same"
        );
    }

    #[test]
    fn no_key_is_read_when_the_ledger_cannot_be_persisted() {
        let (a, b) = MemKeySource::pair("t", Direction::AtoB, 10_000);
        let watch = Watch::default();
        let reads = watch.reads.clone();
        let key = Watched(a, watch);
        let mut tx = SendStream::with_parts(
            Box::new(key),
            Box::new(BrokenLedger),
            StreamOptions::default(),
        )
        .unwrap();
        let before = reads.load(std::sync::atomic::Ordering::SeqCst);
        let mut f = vec![1, 2, 3];
        assert!(tx.seal(b"hello", &mut f).is_err());
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), before);
        drop(b);
        // The receiver neither accepts nor returns plaintext when it cannot persist.
        let (a, b) = MemKeySource::pair("t", Direction::AtoB, 10_000);
        let opts = StreamOptions::default();
        let mut tx =
            SendStream::with_parts(Box::new(a), Box::new(MemLedger::new("a")), opts.clone())
                .unwrap();
        tx.seal(b"hello", &mut f).unwrap();
        let mut rx = RecvStream::with_parts(Box::new(b), Box::new(BrokenLedger), opts).unwrap();
        let mut o = Vec::new();
        assert!(rx.open(&f, &mut o).is_err());
        assert!(o.is_empty());
    }

    proptest! {
        #[test]
        fn range_set_matches_model(ops in proptest::collection::vec((0u64..200, 0u64..30), 0..40), probe in (0u64..230, 1u64..30)) {
            let mut s = RangeSet::default();
            let mut model = vec![false; 260]; // probes reach 229 + 29
            for (a, l) in ops {
                s.insert(a..a + l);
                for x in a..a + l { model[x as usize] = true; }
            }
            let r = probe.0..probe.0 + probe.1;
            let hit = (r.start..r.end).any(|x| model[x as usize]);
            prop_assert_eq!(s.overlap(&r).is_some(), hit);
            let v: Vec<_> = s.ranges().collect();
            for w in v.windows(2) { prop_assert!(w[0].end < w[1].start); }
        }

        /// Filling the lowest gaps keeps at most `max` ranges, counts every byte that was
        /// used as used still, adds exactly the filled gaps, and leaves the ranges above them
        /// as they were.
        #[test]
        fn filling_gaps_bounds_the_set_and_never_frees_used_key(ops in proptest::collection::vec((0u64..200, 0u64..30), 0..40), max in 1usize..6) {
            let mut s = RangeSet::default();
            for (a, l) in ops { s.insert(a..a + l); }
            let before: Vec<_> = s.ranges().collect();
            let filled = s.fill_lowest_gaps(max);
            let after: Vec<_> = s.ranges().collect();
            prop_assert!(after.len() <= max);
            prop_assert_eq!(filled.len(), before.len() - after.len());
            let used = |set: &[Range<u64>], x: u64| set.iter().any(|r| r.contains(&x));
            for x in 0..260 {
                let now = used(&after, x);
                prop_assert_eq!(now, used(&before, x) || used(&filled, x));
            }
            if before.len() > max {
                prop_assert_eq!(&after[1..], &before[before.len() - after.len() + 1..]);
            } else {
                prop_assert_eq!(&after, &before);
            }
        }

        /// Filling the gaps below a floor fills exactly the gaps that end at or below it,
        /// and frees nothing.
        #[test]
        fn filling_gaps_below_a_floor_fills_those_and_only_those(ops in proptest::collection::vec((0u64..200, 0u64..30), 0..40), floor in 0u64..240) {
            let mut s = RangeSet::default();
            for (a, l) in ops { s.insert(a..a + l); }
            let before: Vec<_> = s.ranges().collect();
            let filled = s.fill_gaps_below(floor);
            let gaps: Vec<_> = before.windows(2).map(|w| w[0].end..w[1].start).collect();
            let want: Vec<_> = gaps.iter().filter(|g| g.end <= floor).cloned().collect();
            prop_assert_eq!(&filled, &want);
            let after: Vec<_> = s.ranges().collect();
            let used = |set: &[Range<u64>], x: u64| set.iter().any(|r| r.contains(&x));
            for x in 0..260 {
                prop_assert_eq!(used(&after, x), used(&before, x) || used(&filled, x));
            }
        }
    }
}
