//! Volumes: a raw block device or a preallocated file, read and written in aligned requests.
//!
//! [`BlockDevice`] is the boundary the store talks to. [`UringVolume`] is the real thing (O_DIRECT
//! through a dedicated io_uring thread); [`MemVolume`] keeps the bytes in memory and enforces the
//! same alignment rules, for fast tests and fault injection.
//!
//! Buffers move by value: a request takes an [`IoBuf`] and the completion hands it back, so the
//! kernel never sees memory the caller could touch meanwhile, and no byte is copied on the way.

mod buf;
mod mem;
mod request;
mod uring;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub use buf::IoBuf;
pub use mem::MemVolume;
pub use request::{check_request, Alignment, RequestError, MAX_REQUEST};
pub use uring::{create_file_volume, Durability, Pending, UringOptions, UringVolume, VolumeKind};

/// Errors from a volume; every variant names the volume.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    #[error("volume {path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("volume {path}: in use by another process (a running qgenome-mountd, rebuild-index or format?); one process at a time")]
    InUse { path: PathBuf },
    #[error("volume {path}: the filesystem does not support O_DIRECT (refused at open, or no DIOALIGN from statx and aligned O_DIRECT reads fail; tmpfs takes it from Linux 6.6): put the volume on a filesystem or device that does")]
    NoDirectIo { path: PathBuf },
    #[error("volume {path}: not a regular file or block device")]
    NotAVolume { path: PathBuf },
    #[error("volume {path}: refused request: {source}")]
    Request { path: PathBuf, source: RequestError },
    #[error("volume {path}: {op} at offset {offset} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        source: io::Error,
    },
    #[error("volume {path}: {op} at offset {offset} made no progress (end of volume)")]
    NoProgress {
        path: PathBuf,
        op: &'static str,
        offset: u64,
    },
    #[error("volume {path}: cannot set up io_uring: {source}")]
    Ring { path: PathBuf, source: io::Error },
    #[error("volume {path}: an earlier {op} failed ({source}); shares written since the last good flush may not be on the disk, so durable writes are refused until the daemon restarts (check the disk and the kernel log first)")]
    DurabilityLost {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("volume {path}: the io_uring thread has stopped")]
    RingGone { path: PathBuf },
    #[error("volume {path}: injected fault: {what}")]
    Injected { path: PathBuf, what: &'static str },
}

/// A volume the store can put share extents on.
///
/// Every request must be aligned (see [`Alignment`]); implementations refuse misaligned requests
/// before they reach the kernel. Buffers come from [`BlockDevice::alloc_buf`], which aligns them.
pub trait BlockDevice: Send + Sync + 'static {
    /// The path (or name) of the volume, for error messages.
    fn path(&self) -> &Path;
    /// The alignment requests must respect.
    fn alignment(&self) -> Alignment;
    /// Usable bytes: the device length rounded down to the offset alignment.
    fn size(&self) -> u64;
    /// A zero-filled buffer of `len` bytes aligned for this volume (`len` must be a multiple of
    /// the offset alignment to be usable in a request).
    fn alloc_buf(&self, len: usize) -> IoBuf;
    /// Like [`BlockDevice::alloc_buf`], but the contents are unspecified (possibly bytes of an
    /// earlier request of this volume): for callers that overwrite or zero every byte before
    /// the buffer is written anywhere. Saves a memset of the whole buffer.
    fn alloc_buf_dirty(&self, len: usize) -> IoBuf {
        self.alloc_buf(len)
    }
    /// The error every durable write gets, once the volume refuses them (a failed flush: see
    /// `UringVolume`); `None` while it takes them. Lets a caller refuse before it allocates.
    fn durable_writes_refused(&self) -> Option<VolumeError> {
        None
    }
    /// Fills the whole of `buf` from `offset`.
    fn read_at(&self, buf: IoBuf, offset: u64) -> Result<IoBuf, VolumeError>;
    /// Starts filling the whole of `buf` from `offset`, for a task that awaits it
    /// ([`Pending::into_buf`]) instead of blocking its thread. By default the read is done
    /// at once; [`UringVolume`] queues it on its ring.
    fn read_pending(&self, buf: IoBuf, offset: u64) -> Pending {
        Pending::ready(self.path(), self.read_at(buf, offset))
    }
    /// Writes the whole of `buf` at `offset`; with `durable` the bytes are on stable storage when
    /// this returns.
    fn write_at(&self, buf: IoBuf, offset: u64, durable: bool) -> Result<IoBuf, VolumeError>;
    /// Makes every completed write durable.
    fn sync(&self) -> Result<(), VolumeError>;
    /// Where the durable writes so far spent their time (zero where it is not measured).
    fn write_times(&self) -> WriteTimes {
        WriteTimes::default()
    }
}

/// The time durable writes took, summed since the volume was opened (what
/// `qgenome-mountd bench` shows of a put's time at the volume).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteTimes {
    /// Durable writes that succeeded.
    pub writes: u64,
    /// From the request reaching the volume's thread to its data written. With `rwf-dsync`
    /// and `o-dsync` the flush is inside the write.
    pub write_ns: u64,
    /// From the data written to the flush that made it durable (`fdatasync`: the group
    /// fdatasync in flight when the write completed, if any, then the one covering it).
    pub flush_wait_ns: u64,
    /// Group fdatasyncs issued (each covers every durable write completed before it).
    pub syncs: u64,
}

impl WriteTimes {
    /// What was added since `before`.
    pub fn since(&self, before: &WriteTimes) -> WriteTimes {
        WriteTimes {
            writes: self.writes - before.writes,
            write_ns: self.write_ns - before.write_ns,
            flush_wait_ns: self.flush_wait_ns - before.flush_wait_ns,
            syncs: self.syncs - before.syncs,
        }
    }
}

/// Adds `d` in nanoseconds to `sum` (the clocks of `qgenome-mountd bench`'s put latency).
pub(crate) fn add_nanos(sum: &AtomicU64, d: std::time::Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    sum.fetch_add(ns, Ordering::Relaxed);
}

/// Sums a volume's [`WriteTimes`] as its writes complete and its group fdatasyncs go out.
#[derive(Debug, Default)]
pub(crate) struct WriteClock {
    writes: AtomicU64,
    write_ns: AtomicU64,
    flush_wait_ns: AtomicU64,
    syncs: AtomicU64,
}

impl WriteClock {
    /// A durable write that reached the volume's thread at `started`, had its data written at
    /// `written`, and was durable at `durable`.
    pub(crate) fn durable(&self, started: Instant, written: Instant, durable: Instant) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        add_nanos(&self.write_ns, written.duration_since(started));
        add_nanos(&self.flush_wait_ns, durable.duration_since(written));
    }

    /// A group fdatasync was issued.
    pub(crate) fn synced(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn times(&self) -> WriteTimes {
        WriteTimes {
            writes: self.writes.load(Ordering::Relaxed),
            write_ns: self.write_ns.load(Ordering::Relaxed),
            flush_wait_ns: self.flush_wait_ns.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
        }
    }
}

impl<T: BlockDevice> BlockDevice for std::sync::Arc<T> {
    fn path(&self) -> &Path {
        (**self).path()
    }
    fn alignment(&self) -> Alignment {
        (**self).alignment()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn alloc_buf(&self, len: usize) -> IoBuf {
        (**self).alloc_buf(len)
    }
    fn alloc_buf_dirty(&self, len: usize) -> IoBuf {
        (**self).alloc_buf_dirty(len)
    }
    fn read_at(&self, buf: IoBuf, offset: u64) -> Result<IoBuf, VolumeError> {
        (**self).read_at(buf, offset)
    }
    fn read_pending(&self, buf: IoBuf, offset: u64) -> Pending {
        (**self).read_pending(buf, offset)
    }
    fn write_at(&self, buf: IoBuf, offset: u64, durable: bool) -> Result<IoBuf, VolumeError> {
        (**self).write_at(buf, offset, durable)
    }
    fn sync(&self) -> Result<(), VolumeError> {
        (**self).sync()
    }
    fn durable_writes_refused(&self) -> Option<VolumeError> {
        (**self).durable_writes_refused()
    }
    fn write_times(&self) -> WriteTimes {
        (**self).write_times()
    }
}
