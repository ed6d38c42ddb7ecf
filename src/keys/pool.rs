//! Pool files: pre-shared key for one direction of a link, as NICT's pre-stored QKD key.
//!
//! `provision` writes both ends of both directions of a new link: in each end's directory
//! `<link>.a2b.pool` and `<link>.b2a.pool`; the two files of one direction hold the same
//! key bytes and stream id and differ only in the `end` byte. Layout (one 4096-byte header
//! block, key from offset 4096 so destroyed key punches out on block boundaries):
//!
//! ```text
//! offset size field
//!      0    8 magic "QGKPOOL\0"
//!      8    2 format version, u16 LE (1)
//!     10    1 direction: 0 = a2b, 1 = b2a
//!     11    1 end holding this file: 0 = a, 1 = b
//!     12    4 reserved, zero
//!     16   16 stream id (random, shared by both ends of the direction)
//!     32    8 key offset in the file, u64 LE (4096)
//!     40    8 key length in bytes, u64 LE
//!     48    2 link name length, u16 LE (1..=64)
//!     50   64 link name, UTF-8, zero padded
//!    114 3950 zero
//!   4064   32 SHA-256 of bytes 0..4064
//!   4096    . key
//! ```
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use super::{Destroyed, KeyError, KeySource, StreamInfo};

pub const MAGIC: [u8; 8] = *b"QGKPOOL\0";
pub const VERSION: u16 = 1;
/// Size of the header block; key starts here.
pub const HEADER_LEN: u64 = 4096;
const SUM_AT: usize = 4064;
pub const MAX_LINK_NAME: usize = 64;

/// Direction of a link stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    AtoB,
    BtoA,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::AtoB, Direction::BtoA];
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::AtoB => "a2b",
            Direction::BtoA => "b2a",
        }
    }
    pub fn sender(self) -> End {
        match self {
            Direction::AtoB => End::A,
            Direction::BtoA => End::B,
        }
    }
    pub fn receiver(self) -> End {
        match self {
            Direction::AtoB => End::B,
            Direction::BtoA => End::A,
        }
    }
    fn code(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which end of a link a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    A,
    B,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            End::A => "a",
            End::B => "b",
        })
    }
}

/// `<dir>/<link>.<direction>.pool`
pub fn pool_path(dir: &Path, link: &str, direction: Direction) -> PathBuf {
    dir.join(format!("{link}.{direction}.pool"))
}

/// Link names become file names: 1..=64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_link_name(name: &str) -> Result<(), KeyError> {
    let bad = |reason| {
        Err(KeyError::InvalidLinkName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_LINK_NAME {
        return bad("must be 1 to 64 bytes");
    }
    if name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// The parsed pool header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolHeader {
    pub info: StreamInfo,
}

impl PoolHeader {
    pub fn encode(&self) -> Vec<u8> {
        let i = &self.info;
        let mut b = vec![0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10] = i.direction.code();
        b[11] = match i.end {
            End::A => 0,
            End::B => 1,
        };
        b[16..32].copy_from_slice(&i.stream_id);
        b[32..40].copy_from_slice(&HEADER_LEN.to_le_bytes());
        b[40..48].copy_from_slice(&i.key_len.to_le_bytes());
        b[48..50].copy_from_slice(&(i.link.len() as u16).to_le_bytes());
        b[50..50 + i.link.len()].copy_from_slice(i.link.as_bytes());
        let sum = Sha256::digest(&b[..SUM_AT]);
        b[SUM_AT..].copy_from_slice(&sum);
        b
    }

    /// Parse a header block read from `path` (named in errors only; no I/O here).
    pub fn decode(b: &[u8], path: &Path) -> Result<Self, KeyError> {
        let not = |reason: &str| KeyError::NotAPool {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if b.len() < HEADER_LEN as usize {
            return Err(not("shorter than the 4096-byte header"));
        }
        if b[0..8] != MAGIC {
            return Err(not("bad magic"));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        let name_len = u16::from_le_bytes([b[48], b[49]]) as usize;
        let link = if name_len <= MAX_LINK_NAME {
            String::from_utf8_lossy(&b[50..50 + name_len]).into_owned()
        } else {
            String::from("?")
        };
        if version > VERSION {
            return Err(KeyError::UnsupportedVersion {
                link,
                path: path.to_path_buf(),
                found: version,
                supported: VERSION,
            });
        }
        if Sha256::digest(&b[..SUM_AT])[..] != b[SUM_AT..HEADER_LEN as usize] {
            return Err(not("header checksum mismatch"));
        }
        if version != VERSION {
            return Err(not("unknown format version"));
        }
        let direction = match b[10] {
            0 => Direction::AtoB,
            1 => Direction::BtoA,
            _ => return Err(not("bad direction byte")),
        };
        let end = match b[11] {
            0 => End::A,
            1 => End::B,
            _ => return Err(not("bad end byte")),
        };
        if u64::from_le_bytes(b[32..40].try_into().expect("8")) != HEADER_LEN {
            return Err(not("unexpected key offset"));
        }
        check_link_name(&link).map_err(|_| not("bad link name"))?;
        Ok(Self {
            info: StreamInfo {
                link,
                direction,
                end,
                stream_id: b[16..32].try_into().expect("16"),
                key_len: u64::from_le_bytes(b[40..48].try_into().expect("8")),
            },
        })
    }
}

/// One pool file, opened for one end of one direction.
///
/// On 4 KiB pages (a disk, or a plain tmpfs) key is read with `pread`, straight into the
/// caller's buffer (the sealed frame being built): this measured faster than a shared mapping
/// (1.66 against 1.39 GB/s seal + open on tmpfs), which faults in every 4 KiB page and must
/// unmap every punched hole again. On a tmpfs of huge pages (the file's preferred I/O size is
/// 2 MiB or more, see [`super::tmpfs`]) the pool is also mapped read-only, and sealing XORs
/// the pad straight from the mapping ([`KeySource::mapped`]): one fault and one unmap per
/// 2 MiB, and no copy of the pad (see docs/design.md, "Pools in RAM").
pub struct PoolFile {
    file: File,
    path: PathBuf,
    info: StreamInfo,
    punch_unsupported: AtomicBool,
    /// The whole file, header included, when it lives on huge pages. Never written through;
    /// holes punched by the destroyer read as zeros (the file's size never changes).
    map: Option<memmap2::Mmap>,
    destroyer: Destroyer,
}

/// Map pools whose preferred I/O size (`st_blksize`) is at least this: a tmpfs mounted with
/// `huge=always` reports its huge page size there.
const MAP_MIN_BLKSIZE: u64 = 2 << 20;

impl std::fmt::Debug for PoolFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolFile")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

/// A pool file of `actual` bytes must hold its header and the `key_len` its header says.
pub(crate) fn check_len(
    link: &str,
    path: &Path,
    key_len: u64,
    actual: u64,
) -> Result<(), KeyError> {
    let expected = HEADER_LEN.saturating_add(key_len);
    if actual != expected {
        return Err(KeyError::Truncated {
            link: link.to_string(),
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(())
}

impl PoolFile {
    /// Open `<dir>/<link>.<direction>.pool` as held by `end`, checking that its header says
    /// exactly that and that the file is as long as its header says. Opens read-write
    /// (to destroy used key) but writes nothing.
    pub fn open(dir: &Path, link: &str, direction: Direction, end: End) -> Result<Self, KeyError> {
        check_link_name(link)?;
        let path = pool_path(dir, link, direction);
        let io = |op, source| KeyError::Io {
            link: link.to_string(),
            path: path.clone(),
            op,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("open pool", e))?;
        // One user per pool, whatever path reaches it (a symlink resolves to the same inode):
        // each user keeps its own ledger, so two would seal with the same key.
        // SAFETY: flock on an fd we own; held until the file (and the destroyer's clone of
        // it) is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => KeyError::InUse {
                    link: link.to_string(),
                    path,
                },
                _ => io("lock pool", e),
            });
        }
        let meta = file.metadata().map_err(|e| io("stat pool", e))?;
        // Provisioning makes pools 0600; a copy to the far site may not have kept that.
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                link: link.to_string(),
                path,
                mode,
            });
        }
        let actual = meta.len();
        let mut hdr = vec![0u8; HEADER_LEN as usize];
        let n = read_up_to(&file, &mut hdr).map_err(|e| io("read pool header", e))?;
        if n < HEADER_LEN as usize {
            return Err(KeyError::Truncated {
                link: link.to_string(),
                path,
                expected: HEADER_LEN,
                actual,
            });
        }
        let info = PoolHeader::decode(&hdr, &path)?.info;
        if info.link != link || info.direction != direction || info.end != end {
            return Err(KeyError::ForeignPool {
                link: link.to_string(),
                expected: format!("{direction} end {end}"),
                path,
                found: format!("link {:?} {} end {}", info.link, info.direction, info.end),
            });
        }
        check_len(link, &path, info.key_len, actual)?;
        let map = if std::os::unix::fs::MetadataExt::blksize(&meta) >= MAP_MIN_BLKSIZE {
            // SAFETY: a shared read-only mapping of a pool file this process opened; its size
            // was just checked against the header and pools are never truncated or written
            // in place (only punched, which reads back as zeros). Slices handed out are of
            // key ranges the stream has reserved and not yet destroyed.
            match unsafe { memmap2::Mmap::map(&file) } {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "pool not mapped, reading it with pread: {e}");
                    None
                }
            }
        } else {
            None
        };
        let destroyer = Destroyer::start(&file, &path);
        Ok(Self {
            destroyer,
            file,
            path,
            info,
            punch_unsupported: AtomicBool::new(false),
            map,
        })
    }

    /// Read and check just the header of the pool at `path` (read only).
    pub fn read_header(path: &Path, link: &str) -> Result<StreamInfo, KeyError> {
        let f = File::open(path).map_err(|source| KeyError::Io {
            link: link.to_string(),
            path: path.to_path_buf(),
            op: "open pool",
            source,
        })?;
        let mut hdr = vec![0u8; HEADER_LEN as usize];
        let n = read_up_to(&f, &mut hdr).map_err(|source| KeyError::Io {
            link: link.to_string(),
            path: path.to_path_buf(),
            op: "read pool header",
            source,
        })?;
        let info = PoolHeader::decode(&hdr[..n], path)?.info;
        if info.link != link {
            return Err(KeyError::ForeignPool {
                link: link.to_string(),
                expected: format!("link {link:?}"),
                path: path.to_path_buf(),
                found: format!("link {:?}", info.link),
            });
        }
        Ok(info)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> KeyError {
        KeyError::Io {
            link: self.info.link.clone(),
            path: self.path.clone(),
            op,
            source,
        }
    }
}

fn read_up_to(f: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Destroy `[off, off + len)` of the pool file now: punch a hole, or overwrite with zeros
/// where punching is unsupported (then remembered in `punch_unsupported`).
fn destroy_now(
    file: &File,
    path: &Path,
    punch_unsupported: &AtomicBool,
    off: u64,
    len: u64,
) -> Result<Destroyed, (&'static str, std::io::Error)> {
    if !punch_unsupported.load(Ordering::Relaxed) {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(Destroyed::Punched);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            tracing::warn!(path = %path.display(), "hole punching unsupported; overwriting used key with zeros");
            punch_unsupported.store(true, Ordering::Relaxed);
        } else {
            // ENOSPC (a punch may split an extent on a full disk), EIO...: overwrite this range
            // instead, which needs no new space; an error only if that fails too.
            tracing::warn!(path = %path.display(), offset = off, len, "punching used key failed ({e}); overwriting it with zeros");
        }
    }
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut at = off;
    while at < off + len {
        let n = ((off + len - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at)
            .map_err(|e| ("overwrite used key", e))?;
        at += n as u64;
    }
    Ok(Destroyed::Overwritten)
}

/// Used key the destroyer may fall behind by before `destroy` waits for it: keeps destruction
/// within a few frames of use, and makes a sustained rate include it when the destroyer cannot
/// keep up.
const DESTROY_LAG: u64 = 16 << 20;

/// The destroyer punches whole multiples of this, aligned, where it can: on a tmpfs of huge
/// pages (see [`super::tmpfs`]) a punch that ends inside a 2 MiB folio splits it first.
const DESTROY_ALIGN: u64 = 2 << 20;

/// How long used key may wait for its range to reach the next [`DESTROY_ALIGN`] boundary
/// before it is punched anyway (and `sync` punches it at once). Also how long the destroyer
/// stays awake with nothing to do before a new tail has to wake it.
const DESTROY_LINGER: std::time::Duration = std::time::Duration::from_millis(50);

/// Most used ranges held back at once; beyond that the oldest goes now (bounded memory).
const MAX_PENDING: usize = 64;

/// Used ranges held back until they cover whole [`DESTROY_ALIGN`] blocks. A stream uses its
/// key in order, but the frames of one link travel over several connections and are opened
/// in the order they arrive, so ranges come slightly out of order: they are kept as disjoint
/// pieces, merged as their neighbours arrive, and every whole aligned block a piece covers
/// is released at once. What is left short of a boundary waits for its neighbour, or until
/// it is [`DESTROY_LINGER`] old.
#[derive(Default, Debug)]
struct Coalesce {
    /// start -> (end, when the piece's oldest byte was used).
    pending: std::collections::BTreeMap<u64, (u64, std::time::Instant)>,
}

impl Coalesce {
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// When the oldest byte held back was used.
    fn oldest(&self) -> Option<std::time::Instant> {
        self.pending.values().map(|&(_, t)| t).min()
    }

    /// Add a range used at `now`; returns the ranges to punch now.
    fn add(&mut self, r: Range<u64>, now: std::time::Instant) -> Vec<Range<u64>> {
        let (mut start, mut end, mut since) = (r.start, r.end, now);
        if let Some((&s, &(e, t))) = self.pending.range(..=start).next_back() {
            if e >= start {
                self.pending.remove(&s);
                (start, end, since) = (s, end.max(e), since.min(t));
            }
        }
        while let Some((&s, &(e, t))) = self.pending.range(start..).next() {
            if s > end {
                break;
            }
            self.pending.remove(&s);
            (end, since) = (end.max(e), since.min(t));
        }
        let mut out = Vec::new();
        let (lo, hi) = (
            start.next_multiple_of(DESTROY_ALIGN),
            end / DESTROY_ALIGN * DESTROY_ALIGN,
        );
        if lo < hi {
            out.push(lo..hi);
            if start < lo {
                self.pending.insert(start, (lo, since));
            }
            if hi < end {
                self.pending.insert(hi, (end, now));
            }
        } else {
            self.pending.insert(start, (end, since));
        }
        if self.pending.len() > MAX_PENDING {
            if let Some(t) = self.oldest() {
                out.extend(self.take_used_by(t));
            }
        }
        out
    }

    /// Take every piece whose oldest byte was used at `cutoff` or before.
    fn take_used_by(&mut self, cutoff: std::time::Instant) -> Vec<Range<u64>> {
        let old: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, &(_, t))| t <= cutoff)
            .map(|(&s, _)| s)
            .collect();
        old.into_iter()
            .filter_map(|s| self.pending.remove(&s).map(|(e, _)| s..e))
            .collect()
    }

    /// Take everything held back.
    fn take_all(&mut self) -> Vec<Range<u64>> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(s, (e, _))| s..e)
            .collect()
    }
}

/// What the seal/open path and its pool's destroyer thread share, under one mutex.
#[derive(Default)]
struct DestroyState {
    /// Used key held back short of aligned boundaries.
    coalesce: Coalesce,
    /// Ranges to punch now, and their bytes.
    ready: Vec<Range<u64>>,
    ready_bytes: u64,
    /// The destroyer is punching ranges it took out of `ready`.
    busy: bool,
    /// The destroyer sleeps without a timeout: a new tail must wake it.
    asleep: bool,
    closed: bool,
    /// The thread has ended (only after `closed`, or by a panic): `destroy` punches itself.
    dead: bool,
    /// The first failure, reported by the next `destroy` or `sync`.
    failed: Option<(&'static str, std::io::Error)>,
    /// Ranges whose destruction failed: kept for `sync` to retry (it fails until they are
    /// gone), never dropped.
    unfinished: Vec<Range<u64>>,
}

impl DestroyState {
    fn release(&mut self, r: Range<u64>) {
        self.ready_bytes += r.end - r.start;
        self.ready.push(r);
    }

    /// Add a used range: the whole aligned blocks it completes go to `ready`, the rest is
    /// held back (see [`Coalesce`]). True when the destroyer must be woken: something is
    /// ready to punch, or it sleeps and what is held back must start its clock.
    fn add(&mut self, r: Range<u64>) -> bool {
        let now = self.coalesce.add(r, std::time::Instant::now());
        let wake = !now.is_empty() || self.asleep;
        now.into_iter().for_each(|r| self.release(r));
        wake
    }

    /// Move what has been held back for [`DESTROY_LINGER`] to `ready`.
    fn release_lingered(&mut self) {
        let old = match std::time::Instant::now().checked_sub(DESTROY_LINGER) {
            Some(cutoff) => self.coalesce.take_used_by(cutoff),
            None => self.coalesce.take_all(),
        };
        old.into_iter().for_each(|r| self.release(r));
    }

    /// Move everything held back to `ready`.
    fn release_all(&mut self) {
        let all = self.coalesce.take_all();
        all.into_iter().for_each(|r| self.release(r));
    }
}

#[derive(Default)]
struct DestroyShared {
    state: std::sync::Mutex<DestroyState>,
    /// Signalled when there is work for the destroyer, and when it finishes a batch.
    cv: std::sync::Condvar,
}

impl DestroyShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, DestroyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(
        &self,
        g: std::sync::MutexGuard<'a, DestroyState>,
    ) -> std::sync::MutexGuard<'a, DestroyState> {
        self.cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    fn wait_for<'a>(
        &self,
        g: std::sync::MutexGuard<'a, DestroyState>,
        d: std::time::Duration,
    ) -> (std::sync::MutexGuard<'a, DestroyState>, bool) {
        let (g, t) = self
            .cv
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner());
        (g, t.timed_out())
    }
}

/// A thread per open pool that destroys used key ranges, off the seal/open path (punching
/// 1 MiB on tmpfs costs about as much as sealing it). Ranges are destroyed in order within
/// moments: whole 2 MiB blocks as soon as their ranges are all in, and what is short of a
/// boundary after at most [`DESTROY_LINGER`] (see [`Coalesce`]); `sync` punches
/// everything queued and then fdatasyncs. A range that cannot be punched is overwritten with
/// zeros; one that cannot be destroyed either way is kept: the first failure is reported by
/// the next `destroy` (which still queues its own range), and `sync` retries every kept range
/// and fails until they are all destroyed, so no ledger moves past used key left on disk.
/// Dropping the pool drains the queue and joins the thread.
/// A crash before a queued range is destroyed loses nothing: every open destroys all key
/// below the resume point again.
///
/// The seal/open path coalesces under the shared mutex and wakes the thread only when a range
/// is ready to punch (or when it has gone to sleep): a stream of 1 MiB frames wakes it every
/// other frame instead of every frame. Each wake is a futex call and, on an idle core of a VM,
/// an inter-processor interrupt; waking per frame cost seal + open about a fifth of its
/// throughput (docs/benchmarks.md, session 5).
struct Destroyer {
    shared: Option<std::sync::Arc<DestroyShared>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Destroyer {
    fn start(file: &File, path: &Path) -> Self {
        let none = Self {
            shared: None,
            handle: None,
        };
        let Ok(file) = file.try_clone() else {
            return none;
        };
        let shared = std::sync::Arc::new(DestroyShared::default());
        let (path, sh) = (path.to_path_buf(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name("qgenome-key-destroyer".into())
            .spawn(move || Self::run(&sh, &file, &path));
        match spawned {
            Ok(handle) => Self {
                shared: Some(shared),
                handle: Some(handle),
            },
            Err(_) => none,
        }
    }

    /// The destroyer thread: punch what is ready, give a tail [`DESTROY_LINGER`] to reach a
    /// boundary, and sleep once nothing has come for as long.
    fn run(sh: &DestroyShared, file: &File, path: &Path) {
        /// Marks the thread dead however it ends, so that no caller waits for it in vain.
        struct Dead<'a>(&'a DestroyShared);
        impl Drop for Dead<'_> {
            fn drop(&mut self) {
                self.0.lock().dead = true;
                self.0.cv.notify_all();
            }
        }
        let _dead = Dead(sh);
        let punch_unsupported = AtomicBool::new(false);
        let mut st = sh.lock();
        loop {
            if !st.ready.is_empty() {
                let batch = std::mem::take(&mut st.ready);
                st.ready_bytes = 0;
                st.busy = true;
                drop(st);
                let mut failed = None;
                let mut unfinished = Vec::new();
                for r in batch {
                    if let Err(e) =
                        destroy_now(file, path, &punch_unsupported, r.start, r.end - r.start)
                    {
                        failed.get_or_insert(e);
                        unfinished.push(r);
                    }
                }
                st = sh.lock();
                st.busy = false;
                if let Some(e) = failed {
                    st.failed.get_or_insert(e);
                }
                st.unfinished.append(&mut unfinished);
                // Wake anyone waiting for the destroyer to catch up (`destroy`, `sync`).
                sh.cv.notify_all();
                continue;
            }
            if st.closed {
                if st.coalesce.is_empty() {
                    return;
                }
                st.release_all();
                continue;
            }
            match st.coalesce.oldest() {
                Some(since) => match DESTROY_LINGER.checked_sub(since.elapsed()) {
                    Some(left) if !left.is_zero() => st = sh.wait_for(st, left).0,
                    _ => st.release_lingered(),
                },
                None => {
                    let timed_out;
                    (st, timed_out) = sh.wait_for(st, DESTROY_LINGER);
                    if timed_out && st.ready.is_empty() && st.coalesce.is_empty() && !st.closed {
                        st.asleep = true;
                        st = sh.wait(st);
                        st.asleep = false;
                    }
                }
            }
        }
    }
}

impl Drop for Destroyer {
    fn drop(&mut self) {
        if let Some(sh) = &self.shared {
            sh.lock().closed = true;
            sh.cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl KeySource for PoolFile {
    fn info(&self) -> &StreamInfo {
        &self.info
    }
    fn location(&self) -> &Path {
        &self.path
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), KeyError> {
        let end = offset.saturating_add(buf.len() as u64);
        self.check_range(offset..end)?;
        if let Some(key) = self.mapped(offset, buf.len()) {
            buf.copy_from_slice(key);
            return Ok(());
        }
        self.file
            .read_exact_at(buf, HEADER_LEN + offset)
            .map_err(|e| self.io("read key", e))
    }
    fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let map = self.map.as_ref()?;
        let end = offset.checked_add(len as u64)?;
        if end > self.info.key_len {
            return None;
        }
        let start = usize::try_from(HEADER_LEN + offset).ok()?;
        map.get(start..start + len)
    }
    /// Queue the range for the destroyer thread (see [`Destroyer`]); it is destroyed within
    /// moments and durably by the next [`KeySource::sync`].
    fn destroy(&self, r: Range<u64>) -> Result<Destroyed, KeyError> {
        self.check_range(r.clone())?;
        if r.is_empty() {
            return Ok(Destroyed::Punched);
        }
        let (off, len) = (HEADER_LEN + r.start, r.end - r.start);
        if let Some(sh) = &self.destroyer.shared {
            let mut st = sh.lock();
            if !st.dead {
                // Queued before an earlier failure is reported, so this range is not lost.
                if st.add(off..off + len) {
                    sh.cv.notify_all();
                }
                while st.ready_bytes > DESTROY_LAG && !st.dead {
                    st = sh.wait(st);
                }
                if let Some((op, e)) = st.failed.take() {
                    return Err(self.io(op, e));
                }
                return Ok(Destroyed::Queued);
            }
        }
        destroy_now(&self.file, &self.path, &self.punch_unsupported, off, len).map_err(|(op, e)| {
            if let Some(sh) = &self.destroyer.shared {
                sh.lock().unfinished.push(off..off + len);
            }
            self.io(op, e)
        })
    }
    /// Wait until every queued range is destroyed, then make it durable.
    fn sync(&self) -> Result<(), KeyError> {
        let mut orphaned = Vec::new();
        if let Some(sh) = &self.destroyer.shared {
            let mut st = sh.lock();
            st.release_all();
            sh.cv.notify_all();
            while (!st.ready.is_empty() || st.busy) && !st.dead {
                st = sh.wait(st);
            }
            // Ranges the destroyer failed on, and the queue of one that died (a panic):
            // destroyed here, or the sync fails and they stay for the next one. Either way
            // this sync answers for their failure.
            st.failed = None;
            orphaned = std::mem::take(&mut st.unfinished);
            orphaned.append(&mut st.ready);
            st.ready_bytes = 0;
        }
        let mut left = orphaned.into_iter();
        while let Some(r) = left.next() {
            let done = destroy_now(
                &self.file,
                &self.path,
                &self.punch_unsupported,
                r.start,
                r.end - r.start,
            );
            if let Err((op, e)) = done {
                if let Some(sh) = &self.destroyer.shared {
                    let mut st = sh.lock();
                    st.unfinished.push(r);
                    st.unfinished.extend(left);
                }
                return Err(self.io(op, e));
            }
        }
        self.file
            .sync_data()
            .map_err(|e| self.io("fdatasync pool", e))
    }
}

/// Files written by [`provision`].
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub files: Vec<PathBuf>,
}

/// Largest pool `provision` accepts per direction (sanity bound before the free-space check).
pub const MAX_POOL_SIZE: u64 = 1 << 50;

/// Key bytes of each direction of a new link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSizes {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

impl PoolSizes {
    /// The same size both ways.
    pub fn both(size: u64) -> Self {
        Self {
            a_to_b: size,
            b_to_a: size,
        }
    }

    pub fn of(self, direction: Direction) -> u64 {
        match direction {
            Direction::AtoB => self.a_to_b,
            Direction::BtoA => self.b_to_a,
        }
    }
}

/// Write the two ends (`out_a`, `out_b`) of both directions of a new link `link` with `size`
/// key bytes per direction, from the OS CSPRNG, streaming, fsync'd, mode 0600. Refuses to
/// overwrite anything and refuses sizes that are zero or do not fit in the free space.
/// On failure, files it created are removed.
pub fn provision(
    link: &str,
    size: u64,
    out_a: &Path,
    out_b: &Path,
) -> Result<Provisioned, KeyError> {
    provision_placed(link, PoolSizes::both(size), out_a, out_b, None)
}

/// One direction's pools of a link written to other directories (say on another filesystem)
/// and reached through symlinks at their usual places: see [`provision_placed`].
#[derive(Debug, Clone, Copy)]
pub struct Apart<'a> {
    pub direction: Direction,
    /// Where end A's and end B's pool of `direction` are written.
    pub dir_a: &'a Path,
    pub dir_b: &'a Path,
}

/// [`provision`], with `sizes` key bytes in each direction, and the pools of
/// `apart.direction` (if any) written to `apart`'s directories and symlinked from `out_a` and
/// `out_b`, where everything else (ledgers included) lives. `qgenome bench e2e` keeps one
/// direction in RAM this way when the pools of both do not fit there.
pub fn provision_placed(
    link: &str,
    sizes: PoolSizes,
    out_a: &Path,
    out_b: &Path,
    apart: Option<Apart<'_>>,
) -> Result<Provisioned, KeyError> {
    check_link_name(link)?;
    for d in Direction::BOTH {
        let size = sizes.of(d);
        let bad_size = |reason: String| KeyError::BadSize {
            link: link.to_string(),
            path: pool_path(out_a, link, d),
            reason,
        };
        if size == 0 {
            return Err(bad_size("size must be more than zero".into()));
        }
        if size > MAX_POOL_SIZE {
            return Err(bad_size(format!(
                "{size} bytes is more than the maximum {MAX_POOL_SIZE}"
            )));
        }
    }
    let io = |path: &Path, op, source| KeyError::Io {
        link: link.to_string(),
        path: path.to_path_buf(),
        op,
        source,
    };
    let canon =
        |d: &Path| std::fs::canonicalize(d).map_err(|e| io(d, "resolve output directory", e));
    let mut pairs = vec![(out_a, out_b)];
    pairs.extend(apart.map(|x| (x.dir_a, x.dir_b)));
    for (a, b) in pairs {
        if canon(a)? == canon(b)? {
            return Err(KeyError::SameDirectory {
                link: link.to_string(),
                path: a.to_path_buf(),
            });
        }
    }
    /// One of the four pool files: found at `at`, written at `file` (a symlink at `at` points
    /// there when they differ).
    struct Place {
        direction: Direction,
        end: End,
        at: PathBuf,
        file: PathBuf,
    }
    let mut pools: Vec<Place> = Vec::new();
    for direction in Direction::BOTH {
        for (dir, end) in [(out_a, End::A), (out_b, End::B)] {
            let at = pool_path(dir, link, direction);
            let file = match apart.filter(|x| x.direction == direction) {
                Some(x) => pool_path(
                    if end == End::A { x.dir_a } else { x.dir_b },
                    link,
                    direction,
                ),
                None => at.clone(),
            };
            pools.push(Place {
                direction,
                end,
                at,
                file,
            });
        }
    }
    // Free space: every pool on the filesystem it is written to.
    let mut by_dev: Vec<(u64, u64, PathBuf)> = Vec::new();
    for p in &pools {
        let need = sizes.of(p.direction) + HEADER_LEN;
        let dir = p.file.parent().expect("a pool path has a directory");
        let md = std::fs::metadata(dir).map_err(|e| io(dir, "stat output directory", e))?;
        let dev = std::os::unix::fs::MetadataExt::dev(&md);
        match by_dev.iter_mut().find(|(d, _, _)| *d == dev) {
            Some(entry) => entry.1 += need,
            None => by_dev.push((dev, need, dir.to_path_buf())),
        }
    }
    for (_, need, dir) in &by_dev {
        let st = nix::sys::statvfs::statvfs(dir.as_path())
            .map_err(|e| io(dir, "statvfs", std::io::Error::from(e)))?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        if *need > free {
            return Err(KeyError::BadSize {
                link: link.to_string(),
                path: dir.clone(),
                reason: format!("needs {need} bytes but the filesystem has {free} bytes free"),
            });
        }
    }
    let mut files = Vec::new();
    for p in &pools {
        let ledger = p.at.with_extension("ledger");
        // symlink_metadata: a dangling symlink is in the way too.
        if let Some(q) = [&p.at, &ledger, &p.file]
            .into_iter()
            .find(|q| q.symlink_metadata().is_ok())
        {
            return Err(KeyError::Exists {
                link: link.to_string(),
                path: q.clone(),
            });
        }
        files.push(p.at.clone());
    }
    let mut created: Vec<PathBuf> = Vec::new();
    let res = (|| {
        for d in Direction::BOTH {
            let mut stream_id = [0u8; 16];
            getrandom::getrandom(&mut stream_id).map_err(|e| {
                io(
                    out_a,
                    "OS random source",
                    std::io::Error::other(e.to_string()),
                )
            })?;
            let mut ends = Vec::new();
            for pool in pools.iter().filter(|x| x.direction == d) {
                let (end, p) = (pool.end, pool.file.clone());
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                            link: link.to_string(),
                            path: p.clone(),
                        },
                        _ => io(&p, "create pool", e),
                    })?;
                created.push(p.clone());
                if pool.file != pool.at {
                    std::os::unix::fs::symlink(&p, &pool.at)
                        .map_err(|e| io(&pool.at, "link pool", e))?;
                    created.push(pool.at.clone());
                }
                let h = PoolHeader {
                    info: StreamInfo {
                        link: link.to_string(),
                        direction: d,
                        end,
                        stream_id,
                        key_len: sizes.of(d),
                    },
                };
                f.write_all(&h.encode())
                    .map_err(|e| io(&p, "write pool header", e))?;
                ends.push((f, p));
            }
            let mut buf = vec![0u8; 1 << 20];
            let mut left = sizes.of(d);
            let res = (|| {
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    getrandom::getrandom(&mut buf[..n]).map_err(|e| {
                        io(
                            out_a,
                            "OS random source",
                            std::io::Error::other(e.to_string()),
                        )
                    })?;
                    for (f, p) in &mut ends {
                        f.write_all(&buf[..n]).map_err(|e| io(p, "write key", e))?;
                    }
                    left -= n as u64;
                }
                Ok(())
            })();
            buf.zeroize();
            res?;
            for (f, p) in &ends {
                f.sync_all().map_err(|e| io(p, "fsync pool", e))?;
            }
        }
        let mut dirs = vec![out_a, out_b];
        dirs.extend(apart.iter().flat_map(|x| [x.dir_a, x.dir_b]));
        for dir in dirs {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(dir, "fsync directory", e))?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        for p in &created {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    Ok(Provisioned { files })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `ranges` to a [`Coalesce`], then take what is left; returns every punch.
    fn coalesce_all(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
        let mut c = Coalesce::default();
        let t = std::time::Instant::now();
        let mut punched = Vec::new();
        for r in ranges {
            punched.extend(c.add(r.clone(), t));
        }
        punched.extend(c.take_all());
        assert!(c.is_empty());
        punched
    }

    /// `ranges` sorted and merged where they touch; panics on an overlap.
    fn merged(ranges: &[Range<u64>]) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.end)).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in v {
            match out.last_mut() {
                Some(l) if l.1 == s => l.1 = e,
                Some(l) => {
                    assert!(l.1 < s, "overlap at {s}");
                    out.push((s, e));
                }
                None => out.push((s, e)),
            }
        }
        out
    }

    /// Punches that start or end inside a 2 MiB block (a tmpfs of huge pages zeroes or
    /// splits the folio instead of freeing it).
    fn unaligned(punched: &[Range<u64>]) -> usize {
        punched
            .iter()
            .filter(|p| p.start % DESTROY_ALIGN != 0 || p.end % DESTROY_ALIGN != 0)
            .count()
    }

    /// A pool others may read (copied to the far site under umask 022, say) is refused,
    /// naming it and its mode; once it is 0600 again it opens.
    #[test]
    fn a_pool_other_users_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        provision("l1", 1 << 20, &a, &b).unwrap();
        let path = pool_path(&b, "l1", Direction::AtoB);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PoolFile::open(&b, "l1", Direction::AtoB, End::B).unwrap_err();
        assert!(
            matches!(err, KeyError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("644"),
            "{msg}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        PoolFile::open(&b, "l1", Direction::AtoB, End::B).unwrap();
    }

    #[test]
    fn coalescing_punches_every_used_byte_once_on_aligned_ends() {
        const M: u64 = 1 << 20;
        // Frames of 1 MiB + 4128 bytes in order, then a jump, then more.
        let mut ranges = Vec::new();
        let mut at = 4096;
        for _ in 0..7 {
            ranges.push(at..at + M + 4128);
            at += M + 4128;
        }
        ranges.push(at + 10 * M..at + 10 * M + 100);
        ranges.push(at..at + 5 * M);
        let punched = coalesce_all(&ranges);
        // The punched ranges cover exactly the used ones, each byte once.
        assert_eq!(merged(&punched), merged(&ranges));
        // In-order frames were released on 2 MiB boundaries, not frame by frame.
        assert!(punched.len() < ranges.len(), "{punched:?}");
        assert!(unaligned(&punched) <= 4, "{punched:?}");
    }

    /// Frames of one link over four connections are opened a little out of order: each block
    /// is still punched whole once its frames are all in, not cut at every frame.
    #[test]
    fn coalescing_out_of_order_frames_still_punches_whole_blocks() {
        const FRAME: u64 = (1 << 20) + 4128;
        let mut ranges: Vec<Range<u64>> = (0..64)
            .map(|i| 4096 + i * FRAME..4096 + (i + 1) * FRAME)
            .collect();
        // Each group of four arrives reversed, and groups overlap in time.
        for g in ranges.chunks_mut(4) {
            g.reverse();
        }
        ranges.swap(10, 13);
        let punched = coalesce_all(&ranges);
        assert_eq!(merged(&punched), merged(&ranges));
        // Only the stream's first and last blocks are partial.
        assert_eq!(unaligned(&punched), 2, "{punched:?}");
        // Held back pieces are bounded, the oldest going first.
        let mut c = Coalesce::default();
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        for i in 0..(MAX_PENDING as u64 + 5) {
            let s = (2 * i + 1) * DESTROY_ALIGN + 10;
            out.extend(c.add(s..s + 100, t + std::time::Duration::from_millis(i)));
        }
        assert_eq!(c.pending.len(), MAX_PENDING);
        assert_eq!(out.len(), 5);
        assert_eq!(out[0].start, DESTROY_ALIGN + 10);
    }

    /// Key range `r` of `p` reads as zeros (destroyed).
    fn zeros(p: &PoolFile, r: Range<u64>) -> bool {
        let mut b = vec![1u8; (r.end - r.start) as usize];
        p.read_at(r.start, &mut b).unwrap();
        b.iter().all(|&x| x == 0)
    }

    /// The destroyer without `sync`: a tail short of a 2 MiB boundary is punched within
    /// moments even after the thread has gone to sleep, a stream of frames is punched as it
    /// goes, and dropping the pool destroys what is still queued.
    #[test]
    fn used_key_is_destroyed_within_moments_and_on_drop() {
        let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        const KEY: u64 = 8 << 20;
        provision("lingerlink", KEY, dir.path(), other.path()).unwrap();
        let open = || PoolFile::open(dir.path(), "lingerlink", Direction::AtoB, End::A).unwrap();
        let soon = |p: &PoolFile, r: Range<u64>| {
            let t = std::time::Instant::now();
            while !zeros(p, r.clone()) {
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(5),
                    "{r:?} still holds key {:?} after its use",
                    t.elapsed()
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        let pool = open();
        assert!(!zeros(&pool, 0..KEY), "fresh key is random");
        // Asleep by now: a short tail must wake it.
        std::thread::sleep(3 * DESTROY_LINGER);
        pool.destroy(0..100).unwrap();
        soon(&pool, 0..100);
        // Frames of 1 MiB + 32 in order: everything below the last one goes without a sync.
        let mut at = 100;
        for _ in 0..5 {
            pool.destroy(at..at + (1 << 20) + 32).unwrap();
            at += (1 << 20) + 32;
        }
        soon(&pool, 0..at);
        assert!(!zeros(&pool, at..at + 4096), "unused key is kept");
        // Queued but not yet punched when the pool is dropped: destroyed by the drop.
        pool.destroy(at..at + 10).unwrap();
        drop(pool);
        let pool = open();
        assert!(zeros(&pool, 0..at + 10));
        assert!(!zeros(&pool, at + 10..at + 4096));
    }

    /// If the destroyer thread is gone (it can only die by a panic), `destroy` punches at once
    /// and `sync` destroys whatever the thread left queued: `sync` never returns with used key
    /// still on disk.
    #[test]
    fn a_dead_destroyer_leaves_no_used_key_behind_a_sync() {
        let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        provision("deadlink", 4 << 20, dir.path(), other.path()).unwrap();
        let pool = PoolFile::open(dir.path(), "deadlink", Direction::AtoB, End::A).unwrap();
        let sh = pool.destroyer.shared.clone().unwrap();
        sh.lock().closed = true;
        sh.cv.notify_all();
        let t = std::time::Instant::now();
        while !sh.lock().dead {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "destroyer still running"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Left in its queue, as a panic mid-batch would.
        sh.lock().release(HEADER_LEN..HEADER_LEN + 5000);
        pool.destroy(5000..6000).unwrap();
        assert!(
            zeros(&pool, 5000..6000),
            "destroyed at once without the thread"
        );
        assert!(!zeros(&pool, 0..5000));
        pool.sync().unwrap();
        assert!(zeros(&pool, 0..6000));
        assert!(!zeros(&pool, 6000..8192), "unused key is kept");
    }

    /// A pool has one user at a time, also when reached through a symlink from a second key
    /// directory (each user keeps its own ledger: two would seal with the same key).
    #[test]
    fn a_pool_in_use_is_refused_through_any_path() {
        let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        provision("uselink", 1 << 20, dir.path(), other.path()).unwrap();
        let second = tempfile::tempdir().unwrap();
        let name = pool_path(dir.path(), "uselink", Direction::AtoB);
        std::os::unix::fs::symlink(&name, second.path().join(name.file_name().unwrap())).unwrap();
        let open = |d: &Path| PoolFile::open(d, "uselink", Direction::AtoB, End::A);
        let first = open(dir.path()).unwrap();
        for d in [dir.path(), second.path()] {
            let e = open(d).unwrap_err();
            assert!(matches!(e, KeyError::InUse { .. }), "{e}");
            assert!(e.to_string().contains("in use"), "{e}");
        }
        drop(first);
        drop(open(second.path()).unwrap());
    }

    /// A range the destroyer failed on (a punch and the overwrite after it both failing, as
    /// on a dying disk) is kept, not dropped: the failure is reported once, by the next
    /// `destroy`, which still queues its own range; `sync` retries the range and returns Ok
    /// only once it is destroyed.
    #[test]
    fn a_failed_destruction_is_retried_by_sync_never_dropped() {
        let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        provision("faillink", 4 << 20, dir.path(), other.path()).unwrap();
        let pool = PoolFile::open(dir.path(), "faillink", Direction::AtoB, End::A).unwrap();
        let sh = pool.destroyer.shared.clone().unwrap();
        {
            // What the destroyer thread records when a batch fails.
            let mut st = sh.lock();
            st.unfinished.push(HEADER_LEN..HEADER_LEN + 5000);
            st.failed = Some((
                "punch hole in pool",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let e = pool.destroy(5000..6000).unwrap_err();
        assert!(e.to_string().contains("punch hole in pool"), "{e}");
        assert!(!zeros(&pool, 0..5000), "not destroyed before the sync");
        pool.sync().unwrap();
        assert!(zeros(&pool, 0..6000), "both ranges destroyed by the sync");
        assert!(!zeros(&pool, 6000..8192), "unused key is kept");
        assert!(sh.lock().unfinished.is_empty());
        pool.destroy(6000..7000).unwrap();
        pool.sync().unwrap();
    }

    /// One direction's pools written apart and reached through symlinks, each direction with
    /// its own size: the streams of both directions work, ledgers stay beside the links, and
    /// nothing is provisioned twice.
    #[test]
    fn one_direction_provisioned_apart_is_reached_through_symlinks() {
        use crate::link::{RecvStream, SendStream, StreamOptions};
        let d: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let (a, b, fa, fb) = (d[0].path(), d[1].path(), d[2].path(), d[3].path());
        let apart = Apart {
            direction: Direction::BtoA,
            dir_a: fa,
            dir_b: fb,
        };
        const KEY: u64 = 4 << 20;
        let sizes = PoolSizes {
            a_to_b: KEY,
            b_to_a: KEY / 4,
        };
        let p = provision_placed("apartlink", sizes, a, b, Some(apart)).unwrap();
        assert_eq!(p.files.len(), 4);
        for (dir, far) in [(a, fa), (b, fb)] {
            let near = pool_path(dir, "apartlink", Direction::AtoB);
            assert!(near.symlink_metadata().unwrap().file_type().is_file());
            assert_eq!(std::fs::metadata(&near).unwrap().len(), HEADER_LEN + KEY);
            let linked = pool_path(dir, "apartlink", Direction::BtoA);
            assert_eq!(
                std::fs::read_link(&linked).unwrap(),
                pool_path(far, "apartlink", Direction::BtoA)
            );
            assert_eq!(
                std::fs::metadata(&linked).unwrap().len(),
                HEADER_LEN + KEY / 4
            );
            assert_eq!(std::fs::read_dir(far).unwrap().count(), 1);
        }
        let opts = StreamOptions { window: 1 << 20 };
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 13) as u8).collect();
        let (mut frame, mut back) = (Vec::new(), Vec::new());
        for (from, to, dir) in [(a, b, Direction::AtoB), (b, a, Direction::BtoA)] {
            let mut tx = SendStream::from_dir(from, "apartlink", dir, opts.clone()).unwrap();
            let mut rx = RecvStream::from_dir(to, "apartlink", dir, opts.clone()).unwrap();
            // A new stream starts at its second key block (`open_ledger`).
            assert_eq!(
                tx.remaining(),
                sizes.of(dir) - crate::wire::frame::KEY_BLOCK
            );
            tx.seal(&payload, &mut frame).unwrap();
            rx.open(&frame, &mut back).unwrap();
            assert_eq!(back, payload);
        }
        // Ledgers beside the links, none beside the pools written apart.
        assert!(pool_path(a, "apartlink", Direction::BtoA)
            .with_extension("ledger")
            .exists());
        assert_eq!(std::fs::read_dir(fa).unwrap().count(), 1);
        // Provisioning it again is refused, naming what is in the way; nothing is touched.
        let e = provision_placed("apartlink", sizes, a, b, Some(apart)).unwrap_err();
        assert!(matches!(e, KeyError::Exists { .. }), "{e}");
        let other = Apart { dir_b: fa, ..apart };
        let e = provision_placed("other", sizes, a, b, Some(other)).unwrap_err();
        assert!(matches!(e, KeyError::SameDirectory { .. }), "{e}");
        assert_eq!(std::fs::read_dir(fb).unwrap().count(), 1);
    }

    /// One end on a tmpfs of huge pages (mapped), the other on the disk (`pread`): the same
    /// key either way, frames sealed at one end open at the other, and destroyed key reads
    /// as zeros through the mapping. Needs root, as `make test` runs.
    #[test]
    fn a_pool_on_huge_pages_is_mapped_and_reads_like_pread() {
        use crate::link::{RecvStream, SendStream, StreamOptions};
        let huge_dir = tempfile::tempdir().unwrap();
        let huge = crate::keys::tmpfs::HugeTmpfs::mount(huge_dir.path(), 64 << 20)
            .expect("mount a huge-page tmpfs (tests run as root)");
        let disk = tempfile::tempdir().unwrap();
        const KEY: u64 = 8 << 20;
        provision("maplink", KEY, huge.path(), disk.path()).unwrap();
        let mapped = PoolFile::open(huge.path(), "maplink", Direction::AtoB, End::A).unwrap();
        let copied = PoolFile::open(disk.path(), "maplink", Direction::AtoB, End::B).unwrap();
        assert!(mapped.map.is_some(), "a pool on huge pages is mapped");
        assert!(
            copied.map.is_none(),
            "a pool on 4 KiB pages is read with pread"
        );
        assert!(copied.mapped(0, 16).is_none());
        for (off, len) in [(0u64, 32usize), (4095, 2), (3 << 20, 1 << 20), (KEY - 7, 7)] {
            let mut want = vec![0u8; len];
            copied.read_at(off, &mut want).unwrap();
            assert_eq!(mapped.mapped(off, len), Some(&want[..]), "at {off}");
            let mut got = vec![0u8; len];
            mapped.read_at(off, &mut got).unwrap();
            assert_eq!(got, want);
        }
        assert!(
            mapped.mapped(KEY - 7, 8).is_none(),
            "past the end is not handed out"
        );
        assert!(mapped.mapped(u64::MAX, 1).is_none());
        drop((mapped, copied));

        // Both directions through streams: AtoB sealed from the mapping, BtoA opened from it.
        let opts = StreamOptions { window: 1 << 20 };
        let payload: Vec<u8> = (0..(1 << 20) + 999).map(|i| (i * 7) as u8).collect();
        let (mut frame, mut back) = (Vec::new(), Vec::new());
        let mut tx =
            SendStream::from_dir(huge.path(), "maplink", Direction::AtoB, opts.clone()).unwrap();
        let mut rx =
            RecvStream::from_dir(disk.path(), "maplink", Direction::AtoB, opts.clone()).unwrap();
        for _ in 0..3 {
            tx.seal(&payload, &mut frame).unwrap();
            rx.open(&frame, &mut back).unwrap();
            assert_eq!(back, payload);
        }
        let mut tx2 =
            SendStream::from_dir(disk.path(), "maplink", Direction::BtoA, opts.clone()).unwrap();
        let mut rx2 = RecvStream::from_dir(huge.path(), "maplink", Direction::BtoA, opts).unwrap();
        tx2.seal(&payload, &mut frame).unwrap();
        rx2.open(&frame, &mut back).unwrap();
        assert_eq!(back, payload);
        tx.flush().unwrap();
        rx2.flush().unwrap();
        drop((tx, rx, tx2, rx2));

        // Used key is gone from the mapping too.
        let mapped = PoolFile::open(huge.path(), "maplink", Direction::AtoB, End::A).unwrap();
        mapped.destroy(0..KEY).unwrap();
        mapped.sync().unwrap();
        assert!(mapped.mapped(0, 1 << 20).unwrap().iter().all(|&b| b == 0));
        assert!(mapped
            .mapped(KEY - 4096, 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn header_round_trips_and_checksum_guards_it() {
        let h = PoolHeader {
            info: StreamInfo {
                link: "home-lsa".into(),
                direction: Direction::BtoA,
                end: End::A,
                stream_id: [3; 16],
                key_len: 1 << 30,
            },
        };
        let b = h.encode();
        let p = Path::new("x.pool");
        assert_eq!(PoolHeader::decode(&b, p).unwrap(), h);
        for i in [0usize, 10, 11, 20, 45, 60, 4000, 4070] {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(PoolHeader::decode(&c, p).is_err(), "byte {i}");
        }
    }

    #[test]
    fn link_names_are_checked() {
        assert!(check_link_name("home-lsa_2.x").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_link_name(bad).is_err(), "{bad:?}");
        }
    }
}
