//! The real volume: O_DIRECT file descriptor, one thread owning an io_uring, requests fed by a
//! channel and answered through a oneshot (usable from plain threads and from async code).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

use super::buf::FixedPool;
use super::{check_request, Alignment, BlockDevice, IoBuf, VolumeError, WriteClock, WriteTimes};

/// How a write is made durable before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// `RWF_DSYNC` on each durable write (pwritev2 flag in the SQE); other writes stay plain.
    /// The default since session 32 (docs/design.md, "Durability choice").
    #[default]
    RwfDsync,
    /// The volume is opened with `O_DSYNC`: every write is durable.
    ODsync,
    /// A plain write, then an `fdatasync` of the volume (IORING_OP_FSYNC, DATASYNC) shared by
    /// every write that completed before it was issued: one device flush for a group of
    /// writes, where RWF_DSYNC flushes once per write: ahead on a disk whose flush is dear
    /// (the default in sessions 17–31; docs/design.md, "Durability choice").
    Fdatasync,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rwf-dsync" => Ok(Self::RwfDsync),
            "o-dsync" => Ok(Self::ODsync),
            "fdatasync" => Ok(Self::Fdatasync),
            other => Err(format!(
                "unknown durability {other:?} (rwf-dsync, o-dsync, fdatasync)"
            )),
        }
    }
}

/// Options for [`UringVolume::open`].
#[derive(Debug, Clone)]
pub struct UringOptions {
    /// Submission queue entries; at least 16.
    pub queue_depth: u32,
    pub durability: Durability,
    /// Registered buffers (0: none). Requests whose buffer is a slot use READ/WRITE_FIXED.
    pub fixed_buffers: u16,
    /// Bytes per registered buffer.
    pub fixed_buffer_len: usize,
}

impl Default for UringOptions {
    fn default() -> Self {
        Self {
            queue_depth: 32,
            durability: Durability::default(),
            fixed_buffers: 16,
            // One 1 MiB share plus its header block and padding.
            fixed_buffer_len: (1 << 20) + (64 << 10),
        }
    }
}

/// Whether the volume is a regular file or a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    File,
    BlockDevice,
}

/// A volume opened with O_DIRECT and served by its own io_uring thread.
pub struct UringVolume {
    path: Arc<Path>,
    align: Alignment,
    size: u64,
    kind: VolumeKind,
    durability: Durability,
    pool: Option<Arc<FixedPool>>,
    tx: Option<mpsc::Sender<Req>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    _file: Arc<File>,
    /// Durable writes' times, and the group fdatasyncs issued ([`Durability::Fdatasync`]).
    clock: Arc<WriteClock>,
    /// The ring thread's latch, as the callers see it ([`BlockDevice::durable_writes_refused`]).
    lost: Latch,
}

enum Kind {
    Read,
    Write {
        durable: bool,
    },
    /// fdatasync of the volume, asked for by itself (`submit_sync`).
    Sync,
}

struct Req {
    kind: Kind,
    buf: Option<IoBuf>,
    offset: u64,
    reply: oneshot::Sender<Result<Option<IoBuf>, VolumeError>>,
}

/// A request in flight; `.wait()` blocks a plain thread, `.await` suspends a task.
pub struct Pending {
    path: Arc<Path>,
    state: PendingState,
}

enum PendingState {
    Ready(Option<Result<Option<IoBuf>, VolumeError>>),
    Waiting(oneshot::Receiver<Result<Option<IoBuf>, VolumeError>>),
}

impl Pending {
    /// A request already answered (`r`), for volumes that complete at once.
    pub fn ready(path: &Path, r: Result<IoBuf, VolumeError>) -> Self {
        Pending {
            path: path.into(),
            state: PendingState::Ready(Some(r.map(Some))),
        }
    }

    /// Awaits a read or write and gives its buffer back.
    pub async fn into_buf(self) -> Result<IoBuf, VolumeError> {
        let path = Arc::clone(&self.path);
        buf_of(&path, self.await?)
    }

    /// Blocks until a read or write completes and gives its buffer back.
    pub fn wait_buf(self) -> Result<IoBuf, VolumeError> {
        let path = Arc::clone(&self.path);
        buf_of(&path, self.wait()?)
    }

    /// Blocks until the request completes. Must not be called from inside an async runtime.
    pub fn wait(self) -> Result<Option<IoBuf>, VolumeError> {
        match self.state {
            PendingState::Ready(r) => r.unwrap_or_else(|| {
                Err(VolumeError::RingGone {
                    path: self.path.to_path_buf(),
                })
            }),
            PendingState::Waiting(rx) => rx.blocking_recv().unwrap_or_else(|_| {
                Err(VolumeError::RingGone {
                    path: self.path.to_path_buf(),
                })
            }),
        }
    }
}

/// The buffer a read or write completed with (none only if the ring thread dropped it).
fn buf_of(path: &Path, r: Option<IoBuf>) -> Result<IoBuf, VolumeError> {
    r.ok_or_else(|| VolumeError::RingGone {
        path: path.to_path_buf(),
    })
}

impl Future for Pending {
    type Output = Result<Option<IoBuf>, VolumeError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let gone = || VolumeError::RingGone {
            path: this.path.to_path_buf(),
        };
        match &mut this.state {
            PendingState::Ready(r) => Poll::Ready(r.take().unwrap_or_else(|| Err(gone()))),
            PendingState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(gone()))),
        }
    }
}

fn os_err(path: &Path, source: io::Error) -> VolumeError {
    VolumeError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// Alignment and size of an open O_DIRECT descriptor, from the device, never assumed.
fn probe(path: &Path, file: &File) -> Result<(Alignment, u64, VolumeKind), VolumeError> {
    let meta = file.metadata().map_err(|e| os_err(path, e))?;
    let fd = file.as_raw_fd();
    if meta.file_type().is_block_device() {
        let mut logical: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut logical) } != 0 {
            return Err(os_err(path, io::Error::last_os_error()));
        }
        // SAFETY: plain lseek on an owned descriptor; O_DIRECT I/O uses explicit offsets.
        let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        if end < 0 {
            return Err(os_err(path, io::Error::last_os_error()));
        }
        let a = u32::try_from(logical)
            .ok()
            .and_then(|l| Alignment::new(l, l));
        let align = a.ok_or_else(|| VolumeError::NoDirectIo {
            path: path.to_path_buf(),
        })?;
        Ok((align, end as u64, VolumeKind::BlockDevice))
    } else if meta.file_type().is_file() {
        // SAFETY: statx fills the zeroed struct; AT_EMPTY_PATH with "" describes `fd` itself.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::statx(
                fd,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        if rc != 0 {
            return Err(os_err(path, io::Error::last_os_error()));
        }
        if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
            // Some filesystems accept O_DIRECT without reporting DIOALIGN (tmpfs since Linux
            // 6.6): measure the smallest alignment an O_DIRECT read accepts.
            let align = probe_dio_read(file).ok_or_else(|| VolumeError::NoDirectIo {
                path: path.to_path_buf(),
            })?;
            tracing::warn!(
                volume = %path.display(),
                align = align.offset,
                "the filesystem reports no DIOALIGN; O_DIRECT reads were probed to work at this alignment"
            );
            return Ok((align, meta.len(), VolumeKind::File));
        }
        let align =
            Alignment::new(stx.stx_dio_offset_align, stx.stx_dio_mem_align).ok_or_else(|| {
                VolumeError::NoDirectIo {
                    path: path.to_path_buf(),
                }
            })?;
        Ok((align, meta.len(), VolumeKind::File))
    } else {
        Err(VolumeError::NotAVolume {
            path: path.to_path_buf(),
        })
    }
}

/// The smallest power-of-two alignment (512 B to 64 KiB, for offset, length and buffer alike)
/// at which an O_DIRECT read of `file` succeeds; `None` when none does.
fn probe_dio_read(file: &File) -> Option<Alignment> {
    use std::os::unix::fs::FileExt;
    (9..=16).map(|shift| 1u32 << shift).find_map(|a| {
        let mut buf = aligned_vec::AVec::<u8, aligned_vec::RuntimeAlign>::with_capacity(
            a as usize, a as usize,
        );
        buf.resize(a as usize, 0);
        match file.read_at(&mut buf, 0) {
            Ok(_) => Alignment::new(a, a),
            Err(_) => None,
        }
    })
}

/// How long opening a volume waits for another holder to let go: the kernel tears down a
/// killed daemon's io_uring (and drops its hold on the volume) a moment after the process
/// has gone, and a restart right after a crash must not fail on that.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// An error opening `path` with `flags`: EINVAL for `O_DIRECT` on a file that opens without
/// it is a filesystem that refuses direct I/O at open (tmpfs before Linux 6.6, some FUSE
/// filesystems), named as such.
fn open_error(path: &Path, flags: i32, e: std::io::Error) -> VolumeError {
    use std::os::unix::fs::FileTypeExt;
    let direct = flags & libc::O_DIRECT != 0;
    // Only a file or a block device is probed: a FIFO opened to read would wait for a writer.
    let volume_like = std::fs::metadata(path)
        .is_ok_and(|m| m.file_type().is_file() || m.file_type().is_block_device());
    if direct && volume_like && e.raw_os_error() == Some(libc::EINVAL) {
        let plain = OpenOptions::new()
            .read(true)
            .custom_flags((flags & !(libc::O_DIRECT | libc::O_EXCL)) | libc::O_NONBLOCK)
            .open(path);
        if plain.is_ok() {
            return VolumeError::NoDirectIo {
                path: path.to_path_buf(),
            };
        }
    }
    os_err(path, e)
}

/// Open the volume with `flags`, for this process alone for as long as the file is open: two
/// processes allocating on one volume (two daemons, or a daemon and a `rebuild-index`, each
/// with its own index) would hand out the same space twice. An exclusive `flock` on the
/// volume's inode; a block device is also opened with `O_EXCL`, which the kernel refuses while
/// the device is mounted or so held, under any name. Held elsewhere for [`CLAIM_WAIT`]:
/// `VolumeError::InUse`.
fn open_claimed(path: &Path, mut flags: i32) -> Result<std::fs::File, VolumeError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    if block {
        flags |= libc::O_EXCL;
    }
    let deadline = std::time::Instant::now() + CLAIM_WAIT;
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path);
        let held = match file {
            Err(e) if block && e.raw_os_error() == Some(libc::EBUSY) => true,
            Err(e) => return Err(open_error(path, flags, e)),
            Ok(file) => {
                // SAFETY: flock on a descriptor borrowed for the call; no memory is passed.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    return Ok(file);
                }
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(os_err(path, e));
                }
                true
            }
        };
        if held && std::time::Instant::now() >= deadline {
            return Err(VolumeError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl UringVolume {
    /// A registered slot from `take`, or a (zeroed) heap buffer when none is free.
    fn pooled(&self, len: usize, take: fn(&Arc<FixedPool>, usize) -> Option<IoBuf>) -> IoBuf {
        self.pool
            .as_ref()
            .and_then(|p| take(p, len))
            .unwrap_or_else(|| IoBuf::heap((self.align.step() as usize).max(4096), len))
    }

    /// Opens `path` (regular file or block device) with O_DIRECT and starts its ring thread.
    pub fn open(path: &Path, opts: &UringOptions) -> Result<Self, VolumeError> {
        let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
        if opts.durability == Durability::ODsync {
            flags |= libc::O_DSYNC;
        }
        let file = open_claimed(path, flags)?;
        let (align, raw_size, kind) = probe(path, &file)?;
        // On tmpfs there is no device to flush: a completed write is as durable as tmpfs makes
        // anything, and the group fdatasync would only add a hop through an io_uring worker
        // thread per group (`qgenome bench e2e`, whose volumes are on tmpfs: store 8% dearer
        // per CPU-second). RWF_DSYNC, which tmpfs completes inline, is kept there.
        let durability = match opts.durability {
            Durability::Fdatasync
                if kind == VolumeKind::File && qgenome::keys::tmpfs::is_tmpfs(path) =>
            {
                Durability::RwfDsync
            }
            d => d,
        };
        let ring_err = |source| VolumeError::Ring {
            path: path.to_path_buf(),
            source,
        };
        let ring: IoUring<squeue::Entry> = IoUring::builder()
            .build(opts.queue_depth.max(16))
            .map_err(ring_err)?;
        let pool = if opts.fixed_buffers > 0 {
            let align_bytes = (align.step() as usize).max(4096);
            FixedPool::new(opts.fixed_buffers, opts.fixed_buffer_len, align_bytes).and_then(|p| {
                // SAFETY: the pool's memory outlives the ring: the ring thread holds an Arc to the
                // pool and drops its ring first.
                match unsafe { ring.submitter().register_buffers(&p.iovecs()) } {
                    Ok(()) => Some(p),
                    Err(e) => {
                        tracing::warn!(volume = %path.display(), error = %e, "fixed buffers not registered; using plain buffers");
                        None
                    }
                }
            })
        } else {
            None
        };
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(ring_err(io::Error::last_os_error()));
        }
        // SAFETY: efd is a fresh descriptor we own.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let file = Arc::new(file);
        let path: Arc<Path> = Arc::from(path);
        let (tx, rx) = mpsc::channel();
        let clock = Arc::new(WriteClock::default());
        let lost = Latch::default();
        let worker = Worker {
            fd: file.as_raw_fd(),
            _file: Arc::clone(&file),
            wake: Arc::clone(&wake),
            rx,
            path: Arc::clone(&path),
            align,
            durability,
            depth: opts.queue_depth.max(16) as usize,
            _pool: pool.clone(),
            clock: Arc::clone(&clock),
            lost: lost.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("qgenome-uring".into())
            .spawn(move || worker.run(ring))
            .map_err(ring_err)?;
        Ok(Self {
            path,
            align,
            size: align.floor(raw_size),
            kind,
            durability,
            pool,
            tx: Some(tx),
            wake,
            thread: Some(thread),
            _file: file,
            clock,
            lost,
        })
    }

    /// How many fdatasyncs the durable writes of [`Durability::Fdatasync`] have shared so far
    /// (one covers every durable write completed before it was issued).
    pub fn group_syncs(&self) -> u64 {
        self.clock.times().syncs
    }

    pub fn kind(&self) -> VolumeKind {
        self.kind
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Whether registered buffers are in use.
    pub fn has_fixed_buffers(&self) -> bool {
        self.pool.is_some()
    }

    fn send(&self, kind: Kind, buf: Option<IoBuf>, offset: u64) -> Pending {
        let path = Arc::clone(&self.path);
        if let Some(b) = &buf {
            if let Err(source) =
                check_request(self.align, self.size, offset, b.len(), b.as_ptr() as usize)
            {
                let err = VolumeError::Request {
                    path: path.to_path_buf(),
                    source,
                };
                return Pending {
                    path,
                    state: PendingState::Ready(Some(Err(err))),
                };
            }
        }
        let (reply, rx) = oneshot::channel();
        let req = Req {
            kind,
            buf,
            offset,
            reply,
        };
        let Some(tx) = &self.tx else {
            return Pending {
                path,
                state: PendingState::Ready(None),
            };
        };
        if tx.send(req).is_err() {
            return Pending {
                path,
                state: PendingState::Ready(None),
            };
        }
        wake(&self.wake);
        Pending {
            path,
            state: PendingState::Waiting(rx),
        }
    }

    /// Queues a read filling `buf` from `offset`.
    pub fn submit_read(&self, buf: IoBuf, offset: u64) -> Pending {
        self.send(Kind::Read, Some(buf), offset)
    }

    /// Queues a write of `buf` at `offset`; `durable` as in [`BlockDevice::write_at`].
    pub fn submit_write(&self, buf: IoBuf, offset: u64, durable: bool) -> Pending {
        self.send(Kind::Write { durable }, Some(buf), offset)
    }

    /// Queues an fdatasync of the volume.
    pub fn submit_sync(&self) -> Pending {
        self.send(Kind::Sync, None, 0)
    }
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local to an eventfd we own. A failure can only be EAGAIN on
    // counter overflow, which still leaves the reader woken.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

impl BlockDevice for UringVolume {
    fn durable_writes_refused(&self) -> Option<VolumeError> {
        self.lost.error(&self.path)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn alignment(&self) -> Alignment {
        self.align
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn alloc_buf(&self, len: usize) -> IoBuf {
        self.pooled(len, FixedPool::take)
    }

    fn alloc_buf_dirty(&self, len: usize) -> IoBuf {
        self.pooled(len, FixedPool::take_dirty)
    }

    fn read_at(&self, buf: IoBuf, offset: u64) -> Result<IoBuf, VolumeError> {
        self.submit_read(buf, offset).wait_buf()
    }

    fn read_pending(&self, buf: IoBuf, offset: u64) -> Pending {
        self.submit_read(buf, offset)
    }

    fn write_at(&self, buf: IoBuf, offset: u64, durable: bool) -> Result<IoBuf, VolumeError> {
        self.submit_write(buf, offset, durable).wait_buf()
    }

    fn sync(&self) -> Result<(), VolumeError> {
        self.submit_sync().wait().map(|_| ())
    }

    fn write_times(&self) -> WriteTimes {
        self.clock.times()
    }
}

impl Drop for UringVolume {
    fn drop(&mut self) {
        // Closing the channel and waking the thread lets it finish what is in flight and exit.
        self.tx = None;
        wake(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for UringVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringVolume")
            .field("path", &self.path)
            .field("align", &self.align)
            .field("size", &self.size)
            .field("kind", &self.kind)
            .field("durability", &self.durability)
            .field("fixed_buffers", &self.pool.is_some())
            .finish()
    }
}

/// The state the ring thread owns.
struct Worker {
    fd: RawFd,
    _file: Arc<File>,
    wake: Arc<OwnedFd>,
    rx: mpsc::Receiver<Req>,
    path: Arc<Path>,
    align: Alignment,
    durability: Durability,
    depth: usize,
    _pool: Option<Arc<FixedPool>>,
    clock: Arc<WriteClock>,
    lost: Latch,
}

/// A request being served: `done` bytes have completed so far.
struct Op {
    kind: Kind,
    buf: Option<IoBuf>,
    offset: u64,
    done: usize,
    /// Retries that made no aligned progress (EAGAIN, EINTR, unaligned short counts).
    stalls: u32,
    reply: oneshot::Sender<Result<Option<IoBuf>, VolumeError>>,
    /// When the ring thread took the request, and when its data was written (a durable write
    /// waiting for its group fdatasync): for [`WriteTimes`].
    started: Instant,
    written: Option<Instant>,
}

const WAKE: u64 = u64::MAX;
/// The user data of the group fdatasync ([`Durability::Fdatasync`]).
const GROUP_SYNC: u64 = u64::MAX - 1;
const MAX_STALLS: u32 = 1000;

/// Durable writes whose data is written and that wait for an fdatasync issued after that
/// ([`Durability::Fdatasync`]): those the one in flight covers, and those that completed
/// after it was issued, for the next.
#[derive(Default)]
struct GroupSync {
    covered: Vec<usize>,
    next: Vec<usize>,
    in_flight: bool,
    stalls: u32,
}

/// The first failure of a durable write or fdatasync of a volume, after which its durable
/// writes fail until the process restarts (fail-stop). After a failed flush Linux may have
/// dropped the data it could not write, and a later flush can succeed without it: a write
/// acknowledged after that flush would not be on the disk.
/// Shared by the ring thread, which trips it, and the volume's callers, who may look first.
#[derive(Debug, Default, Clone)]
struct Latch(Arc<std::sync::OnceLock<(&'static str, i32)>>);

impl Latch {
    /// The error every durable write gets once tripped.
    fn error(&self, path: &Path) -> Option<VolumeError> {
        self.0
            .get()
            .map(|&(op, errno)| VolumeError::DurabilityLost {
                path: path.to_path_buf(),
                op,
                source: io::Error::from_raw_os_error(errno),
            })
    }

    fn trip(&self, path: &Path, op: &'static str, errno: i32) {
        if self.0.set((op, errno)).is_ok() {
            tracing::error!(volume = %path.display(), "{op} failed ({}): durable writes to this volume are refused from now until the daemon restarts",
                io::Error::from_raw_os_error(errno));
        }
    }

    /// What a durable request (a durable write or a sync) that completed with `result` is
    /// answered: its own failure trips the latch; its success once tripped is refused.
    fn durable<T>(&self, path: &Path, result: Result<T, VolumeError>) -> Result<T, VolumeError> {
        match result {
            Err(VolumeError::Io {
                op,
                source,
                offset,
                path: p,
            }) => {
                self.trip(path, op, source.raw_os_error().unwrap_or(libc::EIO));
                Err(VolumeError::Io {
                    path: p,
                    op,
                    offset,
                    source,
                })
            }
            Ok(v) => match self.error(path) {
                Some(e) => Err(e),
                None => Ok(v),
            },
            Err(e) => Err(e),
        }
    }
}

impl Worker {
    fn run(self, ring: IoUring) {
        // Declaration order matters: the ring is dropped first (cancelling anything still in the
        // kernel), then the memory it may point into (ops' buffers, the eventfd word).
        let mut wake_word = Box::new(0u64);
        let mut slots: Vec<Option<Op>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut backlog: VecDeque<usize> = VecDeque::new();
        let mut ring = ring;
        let mut in_flight = 0usize;
        let mut transient_errors = 0u64;
        let mut wake_armed = false;
        let mut closed = false;
        let mut group = GroupSync::default();
        let latch = self.lost.clone();
        loop {
            // Take new requests.
            while !closed {
                match self.rx.try_recv() {
                    Ok(req) => {
                        let op = Op {
                            kind: req.kind,
                            buf: req.buf,
                            offset: req.offset,
                            done: 0,
                            stalls: 0,
                            reply: req.reply,
                            started: Instant::now(),
                            written: None,
                        };
                        let id = match free.pop() {
                            Some(id) => {
                                slots[id] = Some(op);
                                id
                            }
                            None => {
                                slots.push(Some(op));
                                slots.len() - 1
                            }
                        };
                        backlog.push_back(id);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => closed = true,
                }
            }
            // One fdatasync for every durable write written since the last was issued.
            if !group.in_flight && !group.next.is_empty() {
                let entry = opcode::Fsync::new(types::Fd(self.fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(GROUP_SYNC);
                // SAFETY: no memory is passed.
                if unsafe { ring.submission().push(&entry) }.is_ok() {
                    group.covered = std::mem::take(&mut group.next);
                    group.in_flight = true;
                    in_flight += 1;
                    self.clock.synced();
                }
            }
            // Queue as much as the ring takes, keeping one entry for the wake-up read.
            while in_flight + 1 < self.depth {
                let Some(id) = backlog.pop_front() else { break };
                let Some(op) = slots[id].as_mut() else {
                    continue;
                };
                if matches!(op.kind, Kind::Write { durable: true } | Kind::Sync) {
                    if let Some(e) = latch.error(&self.path) {
                        // Refused before it reaches the kernel: nothing of it is written.
                        if let Some(op) = slots[id].take() {
                            let _ = op.reply.send(Err(e));
                        }
                        free.push(id);
                        continue;
                    }
                }
                let entry = self.entry(op).user_data(id as u64);
                // SAFETY: the buffer lives in `slots` until its completion is reaped.
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    backlog.push_front(id);
                    break;
                }
                in_flight += 1;
            }
            if !wake_armed && !closed {
                let entry = opcode::Read::new(
                    types::Fd(self.wake.as_raw_fd()),
                    (&mut *wake_word as *mut u64).cast(),
                    8,
                )
                .build()
                .user_data(WAKE);
                // SAFETY: wake_word outlives the ring (declared before it).
                if unsafe { ring.submission().push(&entry) }.is_ok() {
                    wake_armed = true;
                }
            }
            if closed
                && in_flight == 0
                && backlog.is_empty()
                && group.next.is_empty()
                && !wake_armed
            {
                break;
            }
            let mut transient = false;
            match ring.submit_and_wait(1) {
                Ok(_) => transient_errors = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if enter_error_is_transient(e.raw_os_error()) => {
                    // The completion queue is full (EBUSY) or the kernel is short of memory
                    // for new requests (EAGAIN, ENOMEM): what is queued stays queued; reap
                    // what completed and enter again.
                    transient = true;
                    transient_errors += 1;
                    if transient_errors == 1 || transient_errors.is_multiple_of(10_000) {
                        tracing::warn!(volume = %self.path.display(), error = %e,
                            "io_uring submit: transient error {transient_errors} in a row; retrying");
                    }
                }
                Err(e) => {
                    tracing::error!(volume = %self.path.display(), error = %e, "io_uring submit failed");
                    // Fail everything; the thread ends and later requests see RingGone. What
                    // may still be in the kernel keeps its memory forever (see fail_all).
                    // Writes waiting for a group fdatasync completed: the kernel holds none of
                    // their memory (the fsync carries none).
                    let out_of_kernel: Vec<usize> = backlog
                        .iter()
                        .chain(&group.covered)
                        .chain(&group.next)
                        .copied()
                        .collect();
                    let leaked = fail_all(&self.path, &mut slots, &out_of_kernel, &e);
                    if wake_armed {
                        std::mem::forget(wake_word);
                    }
                    if leaked > 0 {
                        tracing::error!(volume = %self.path.display(),
                            "{leaked} buffer(s) of requests possibly still in the kernel leaked, not freed");
                    }
                    return;
                }
            }
            let cqes: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            if transient && cqes.is_empty() {
                // Nothing completed to make room: do not spin on the error.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            for (id, res) in cqes {
                if id == WAKE {
                    wake_armed = false;
                    continue;
                }
                in_flight -= 1;
                if id == GROUP_SYNC {
                    group.in_flight = false;
                    let retry =
                        (res == -libc::EAGAIN || res == -libc::EINTR) && group.stalls < MAX_STALLS;
                    if retry {
                        group.stalls += 1;
                        // Issued again first: the writes it covered come before the later ones.
                        let later = std::mem::take(&mut group.next);
                        group.next = std::mem::take(&mut group.covered);
                        group.next.extend(later);
                        continue;
                    }
                    group.stalls = 0;
                    let mut answered = std::mem::take(&mut group.covered);
                    if res < 0 {
                        latch.trip(&self.path, "fdatasync", -res);
                        // Written before this flush ran, maybe in the cache it lost.
                        answered.append(&mut group.next);
                    }
                    for id in answered {
                        let Some(mut op) = slots[id].take() else {
                            continue;
                        };
                        let result = match latch.error(&self.path) {
                            Some(e) => Err(e),
                            None => {
                                let now = Instant::now();
                                let written = op.written.unwrap_or(now);
                                self.clock.durable(op.started, written, now);
                                Ok(op.buf.take())
                            }
                        };
                        let _ = op.reply.send(result);
                        free.push(id);
                    }
                    continue;
                }
                let id = id as usize;
                let Some(mut op) = slots[id].take() else {
                    continue;
                };
                match self.complete(&mut op, res) {
                    Next::Again => {
                        slots[id] = Some(op);
                        backlog.push_back(id);
                    }
                    Next::AwaitSync => match latch.error(&self.path) {
                        Some(e) => {
                            let _ = op.reply.send(Err(e));
                            free.push(id);
                        }
                        None => {
                            op.written = Some(Instant::now());
                            slots[id] = Some(op);
                            group.next.push(id);
                        }
                    },
                    Next::Done(result) => {
                        let result = match op.kind {
                            Kind::Write { durable: true } | Kind::Sync => {
                                latch.durable(&self.path, result)
                            }
                            _ => result,
                        };
                        if matches!(op.kind, Kind::Write { durable: true }) && result.is_ok() {
                            // Durable as written (rwf-dsync, o-dsync, or tmpfs).
                            let now = Instant::now();
                            self.clock.durable(op.started, now, now);
                        }
                        let _ = op.reply.send(result);
                        free.push(id);
                    }
                }
            }
        }
    }

    /// The SQE for the remaining part of `op`.
    fn entry(&self, op: &mut Op) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        let offset = op.offset + op.done as u64;
        match (&op.kind, op.buf.as_mut()) {
            (Kind::Read, Some(buf)) => {
                let len = (buf.len() - op.done) as u32;
                // SAFETY: done < len, so the pointer stays inside the buffer.
                let ptr = unsafe { buf.as_mut_ptr().add(op.done) };
                match buf.fixed_index() {
                    Some(i) => opcode::ReadFixed::new(fd, ptr, len, i)
                        .offset(offset)
                        .build(),
                    None => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                }
            }
            (Kind::Write { durable }, Some(buf)) => {
                let len = (buf.len() - op.done) as u32;
                // SAFETY: as above.
                let ptr = unsafe { buf.as_ptr().add(op.done) };
                let flags = if *durable && self.durability == Durability::RwfDsync {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                match buf.fixed_index() {
                    Some(i) => opcode::WriteFixed::new(fd, ptr, len, i)
                        .offset(offset)
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, ptr, len)
                        .offset(offset)
                        .rw_flags(flags)
                        .build(),
                }
            }
            _ => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }

    /// Handles one completion: finished, or to be issued again (the rest of a short transfer,
    /// EAGAIN, or the fdatasync that makes a write durable).
    fn complete(&self, op: &mut Op, res: i32) -> Next {
        let name = match op.kind {
            Kind::Read => "read",
            Kind::Write { .. } => "write",
            Kind::Sync => "fdatasync",
        };
        let at = op.offset + op.done as u64;
        if res < 0 {
            let errno = -res;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && op.stalls < MAX_STALLS {
                op.stalls += 1;
                return Next::Again;
            }
            return Next::Done(Err(VolumeError::Io {
                path: self.path.to_path_buf(),
                op: name,
                offset: at,
                source: io::Error::from_raw_os_error(errno),
            }));
        }
        let total = op.buf.as_ref().map_or(0, IoBuf::len);
        if matches!(op.kind, Kind::Sync) {
            return Next::Done(Ok(op.buf.take()));
        }
        if res == 0 {
            return Next::Done(Err(VolumeError::NoProgress {
                path: self.path.to_path_buf(),
                op: name,
                offset: at,
            }));
        }
        // Keep only whole aligned steps of a short transfer and re-issue the rest from there.
        let reached = op.done + res as usize;
        if reached < total {
            let step = self.align.step() as usize;
            let aligned = reached / step * step;
            if aligned == op.done {
                op.stalls += 1;
                if op.stalls >= MAX_STALLS {
                    return Next::Done(Err(VolumeError::NoProgress {
                        path: self.path.to_path_buf(),
                        op: name,
                        offset: at,
                    }));
                }
            }
            op.done = aligned;
            return Next::Again;
        }
        if let Kind::Write { durable: true } = op.kind {
            if self.durability == Durability::Fdatasync {
                return Next::AwaitSync;
            }
        }
        Next::Done(Ok(op.buf.take()))
    }
}

enum Next {
    Again,
    /// Written; durable once an fdatasync issued from now on completes.
    AwaitSync,
    Done(Result<Option<IoBuf>, VolumeError>),
}

/// Whether an `io_uring_enter` error only means "not now": interrupted (EINTR), the
/// completion queue must be reaped first (EBUSY), or the kernel could not allocate for new
/// requests at this moment (EAGAIN, ENOMEM). Anything else ends the ring.
fn enter_error_is_transient(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN | libc::ENOMEM)
    )
}

/// Fail every request of a ring that cannot go on (`e`), answering each with an error.
/// Requests in `out_of_kernel` (still in the backlog, or written and waiting for a group
/// fdatasync) are not in the kernel: their buffers are freed. Any other request was put in
/// the submission queue and may still be in the kernel, which can read from or DMA into its
/// buffer after the ring is gone: that buffer is leaked (a registered slot is never handed
/// out again), never freed or reused. Returns how many were leaked.
fn fail_all(
    path: &Path,
    slots: &mut [Option<Op>],
    out_of_kernel: &[usize],
    e: &io::Error,
) -> usize {
    let mut leaked = 0;
    for (id, slot) in slots.iter_mut().enumerate() {
        let Some(mut op) = slot.take() else { continue };
        if !out_of_kernel.contains(&id) {
            if let Some(buf) = op.buf.take() {
                std::mem::forget(buf);
                leaked += 1;
            }
        }
        let _ = op.reply.send(Err(VolumeError::Ring {
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0)),
        }));
    }
    leaked
}

/// Creates a new file volume of `size` bytes with fallocate, so its blocks are reserved; with
/// `zeroed`, also writes zeros over all of it.
///
/// Zeroing is slower to create (a full write of the volume) but makes the first write of every
/// block as cheap as any other: fallocated blocks are *unwritten* extents on ext4 and XFS (the
/// first O_DIRECT write to each converts it, a journalled metadata update before a DSYNC write
/// can complete), and on tmpfs, or in a VM whose host backs memory lazily, the first touch of
/// each page is what costs.
pub fn create_file_volume(path: &Path, size: u64, zeroed: bool) -> Result<PathBuf, VolumeError> {
    // For the site's user alone, whatever the umask: a share is no secret alone, but a host
    // holding two sites' volumes (a test, a demo) would hand any k of them to anyone.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| os_err(path, e))?;
    // SAFETY: fallocate on a descriptor we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(os_err(path, e));
    }
    if zeroed {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 8 << 20];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(zeros.len() as u64) as usize;
            if let Err(e) = file.write_all_at(&zeros[..n], at) {
                let _ = std::fs::remove_file(path);
                return Err(os_err(path, e));
            }
            at += n as u64;
        }
    }
    file.sync_all().map_err(|e| os_err(path, e))?;
    // The zeros went through the page cache and stay there, clean: every O_DIRECT write would
    // first have to evict the pages it covers. Drop them now (advice: nothing to fail on).
    // SAFETY: posix_fadvise on a descriptor we own.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    /// EINVAL for an `O_DIRECT` open of a file that opens without it (tmpfs before Linux 6.6)
    /// is named as no direct I/O, not as "cannot open: Invalid argument"; other errors stay
    /// what they are.
    #[test]
    fn o_direct_refused_at_open_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v");
        std::fs::write(&f, [0u8; 4096]).unwrap();
        let einval = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let e = super::open_error(&f, libc::O_DIRECT, einval());
        assert!(matches!(e, VolumeError::NoDirectIo { .. }), "{e}");
        assert!(e.to_string().contains("O_DIRECT"), "{e}");
        let e = super::open_error(&f, 0, einval());
        assert!(matches!(e, VolumeError::Open { .. }), "{e}");
        let missing = dir.path().join("absent");
        let e = super::open_error(&missing, libc::O_DIRECT, einval());
        assert!(matches!(e, VolumeError::Open { .. }), "{e}");
        // A FIFO is not probed (opened to read, it would wait for a writer for good).
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = super::open_error(&fifo, libc::O_DIRECT, einval());
        assert!(matches!(e, VolumeError::Open { .. }), "{e}");
    }

    use super::*;

    #[test]
    fn enter_errors_that_only_mean_not_now_are_retried() {
        for e in [libc::EINTR, libc::EBUSY, libc::EAGAIN, libc::ENOMEM] {
            assert!(enter_error_is_transient(Some(e)), "errno {e}");
        }
        for e in [
            libc::EBADF,
            libc::EFAULT,
            libc::EINVAL,
            libc::ENXIO,
            libc::EOPNOTSUPP,
        ] {
            assert!(!enter_error_is_transient(Some(e)), "errno {e}");
        }
        assert!(!enter_error_is_transient(None));
    }

    #[test]
    fn a_failed_ring_frees_queued_buffers_and_leaks_those_the_kernel_may_hold() {
        let pool = FixedPool::new(3, 4096, 4096).expect("pool");
        let op = |buf| {
            let (tx, rx) = oneshot::channel();
            let op = Op {
                kind: Kind::Read,
                buf: Some(buf),
                offset: 0,
                done: 0,
                stalls: 0,
                reply: tx,
                started: Instant::now(),
                written: None,
            };
            (op, rx)
        };
        let (in_kernel, mut rx0) = op(pool.take(4096).unwrap());
        let (queued, mut rx1) = op(pool.take(4096).unwrap());
        let (in_kernel2, mut rx2) = op(pool.take(4096).unwrap());
        assert!(pool.take(4096).is_none());
        let mut slots = vec![Some(in_kernel), Some(queued), None, Some(in_kernel2)];
        // Slot 1: in the backlog, or written and waiting for a group fdatasync.
        let e = io::Error::from_raw_os_error(libc::EBADF);
        let leaked = fail_all(Path::new("/dev/test"), &mut slots, &[1], &e);
        assert_eq!(leaked, 2);
        assert!(slots.iter().all(Option::is_none));
        for rx in [&mut rx0, &mut rx1, &mut rx2] {
            let r = rx.try_recv().expect("answered");
            assert!(
                matches!(r, Err(VolumeError::Ring { .. })),
                "{:?}",
                r.map(|b| b.map(|b| b.len()))
            );
        }
        // Only the queued request's slot came back; the two the kernel may hold never will.
        let back = pool.take(4096).expect("the queued request's slot");
        assert!(pool.take(4096).is_none());
        drop(back);
    }
}
