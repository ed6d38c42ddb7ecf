//! The share protocol server: a Unix socket for the home mount (plain frames) and TCP for
//! remote sites (every frame sealed with the link's key stream). Formats and the handshake:
//! `docs/design.md` ("mountd"), "Share protocol".
//!
//! Per connection: read one frame (length refused before allocating, in-flight bytes
//! bounded by a semaphore), then as blocking work open it (TCP), decode, run it against the
//! store, encode and seal the reply; write the reply. The blocking work runs on the task's
//! own thread, a thread of the blocking pool taking over the worker's other tasks meanwhile
//! (`block_in_place`; on a current-thread runtime, a blocking thread). A GET is the
//! exception: its small frame is opened in the connection's task, which awaits the volume
//! read itself and seals the reply there (no hand-off to a blocking thread and back; its
//! reply buffer is what counts toward the in-flight bytes). One request at a time per
//! connection; clients open several connections for concurrency. Connections of one link
//! share the link's two streams (behind mutexes): the receiver tracks consumed key ranges
//! exactly, so frames of different connections may arrive in any order.
//!
//! A bad frame (malformed, altered, replayed, sealed for another stream, truncated, absurd
//! length) is logged with the link and the peer address and closes that connection only.
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qgenome::keys::{pool, Direction, End, KeyError, PoolFile};
use qgenome::link::seal::SealError;
use qgenome::link::{hex, AdmittedFrame, LinkError, RecvStream, SendStream, StreamOptions};
use qgenome::sites::{ShareKey as WireKey, ShareMeta as WireMeta};
use qgenome::wire::frame::{self, FrameHeader};
use qgenome::wire::msg::{self, Body, ErrorCode, ListEntry, Msg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::config::{LinkConfig, SiteConfig};
use crate::layout::{ShareKey, ShareMeta, ShareSummer};
use crate::store::{Health, Located, ShareBuf, ShareData, Store, StoreError};
use crate::volume::{add_nanos, BlockDevice};

/// Errors starting or running the server; each names the link, address or socket at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("link {link:?}: {source}")]
    Link {
        link: String,
        #[source]
        source: LinkError,
    },
    #[error("link {link:?}: {source}")]
    Key {
        link: String,
        #[source]
        source: KeyError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("site {site}: no unix_socket and no listen address configured: nothing to serve")]
    NothingToServe { site: String },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] if no one holds `m` now, else `None` (for an async worker that must not wait).
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Both streams this site holds for one link.
pub struct LinkEnds {
    pub name: String,
    send: Mutex<SendStream>,
    recv: Mutex<RecvStream>,
    send_id: [u8; 16],
    recv_id: [u8; 16],
    /// Where the receive stream's unused key started when this process opened it (its
    /// persisted window end: everything below counts as used after a restart).
    floor_at_start: u64,
    /// The answer to every stale frame of this process's life: sealed once, when the first
    /// comes, and resent as the same bytes (see [`floor_notice`]); or why it never can be
    /// (the send key ran out). Other failures to seal it (an I/O error of the ledger) are
    /// not kept: the next stale frame tries again.
    floor_notice: Mutex<Option<Result<Vec<u8>, String>>>,
    /// Stale frames answered with the floor notice since start.
    stale_frames: AtomicU64,
}

/// How often the server sweeps its links' receive gaps (see `RecvStream::expire_gaps`).
const GAP_SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The body of a link's floor notice, sealed under id [`msg::FLOOR_NOTICE_ID`]: a
/// `KeyAlreadyUsed` error whose `arg` is where our receive stream's unused key started at
/// start (its window end: all key below it counts as used once we restarted).
///
/// A stale frame (key below our floor: a peer that sent before our restart, or a replay) is
/// refused before its tag can be checked, so anyone who saw the link's stream id can send
/// one. A sealed answer per frame spent a key block of our send key each (session 22 bounded
/// it at 8, then one a second, which still drained about 350 MB a day and let a flood take
/// the answers a restarted peer needed). One notice, sealed when the first stale frame of
/// this process comes (after a restart, the peer's own HELLO) and resent as the same bytes,
/// spends nothing more however often it is sent, and a genuine peer tells a resent copy from
/// a forgery by its header and tag (see `MountdSite`). Sealed only when needed, so a link
/// that never sees a stale frame leaves no unopened block at the peer. Resending a frame is not reuse of its key: the same plaintext under the
/// same pad and MAC key, nothing new to anyone who saw the first copy.
fn floor_notice(recv_floor: u64) -> Body<'static> {
    error_body(
        ErrorCode::KeyAlreadyUsed,
        recv_floor,
        &format!(
            "this link's key below offset {recv_floor} is used or destroyed (the site \
             restarted, or the frame was replayed): skip past it"
        ),
    )
}

impl std::fmt::Debug for LinkEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkEnds")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The directions of a link as seen from `end`: (the one it sends on, the one it receives on).
pub fn directions(end: End) -> (Direction, Direction) {
    match end {
        End::A => (Direction::AtoB, Direction::BtoA),
        End::B => (Direction::BtoA, Direction::AtoB),
    }
}

impl LinkEnds {
    /// Open this site's send and receive streams of a link from its key directory.
    pub fn open(c: &LinkConfig) -> Result<Self, ServerError> {
        let link = || c.name.clone();
        let (tx_dir, rx_dir) = directions(c.end.end());
        let opts = StreamOptions { window: c.window };
        let info = |d| {
            PoolFile::read_header(&pool::pool_path(&c.key_dir, &c.name, d), &c.name).map_err(
                |source| ServerError::Key {
                    link: link(),
                    source,
                },
            )
        };
        let (tx_info, rx_info) = (info(tx_dir)?, info(rx_dir)?);
        let le = |source| ServerError::Link {
            link: link(),
            source,
        };
        for (d, i) in [(tx_dir, &tx_info), (rx_dir, &rx_info)] {
            let pool = pool::pool_path(&c.key_dir, &c.name, d);
            qgenome::link::stream::check_window(&c.name, &pool, i.key_len, c.window).map_err(le)?;
        }
        let send = SendStream::from_dir(&c.key_dir, &c.name, tx_dir, opts.clone()).map_err(le)?;
        let recv = RecvStream::from_dir(&c.key_dir, &c.name, rx_dir, opts).map_err(le)?;
        let floor_at_start = recv.window_end();
        Ok(Self {
            name: c.name.clone(),
            send: Mutex::new(send),
            recv: Mutex::new(recv),
            send_id: tx_info.stream_id,
            recv_id: rx_info.stream_id,
            floor_at_start,
            floor_notice: Mutex::new(None),
            stale_frames: AtomicU64::new(0),
        })
    }

    pub fn send_remaining(&self) -> u64 {
        lock(&self.send).remaining()
    }

    pub fn recv_remaining(&self) -> u64 {
        lock(&self.recv).remaining()
    }

    fn flush(&self) -> Result<(), LinkError> {
        lock(&self.send).flush()?;
        lock(&self.recv).flush()
    }
}

/// Limits of a running server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections served at once, on each listener (the Unix socket and TCP each have
    /// this many, so remote peers can never take the home mount's).
    pub max_connections: usize,
    /// TCP connections from one address (an IPv6 /64) not yet welcomed, at once.
    pub max_unwelcomed_per_address: usize,
    pub max_inflight_bytes: u64,
    /// How long a started frame may take to arrive, a new connection its first frame, and
    /// a reply to be taken by its peer; a frame or reply of `n` bytes has
    /// [`qgenome::wire::slowest_transfer`]`(n)` more ([`ServerLimits::transfer_deadline`]).
    pub frame_timeout: Duration,
    /// How long a connection may stay idle between frames.
    pub idle_timeout: Duration,
    pub max_share_len: u64,
}

impl ServerLimits {
    /// How long a frame (from its first bytes) or a reply of `bytes` may take to go through:
    /// the frame timeout, plus the time the bytes take on the slowest link the client allows
    /// for (`qgenome::wire::SLOWEST_LINK`), so that a large share on a slow link is not cut
    /// while the client still waits for it, and a dripping peer still is.
    pub fn transfer_deadline(&self, bytes: usize) -> Duration {
        self.frame_timeout + qgenome::wire::slowest_transfer(bytes as u64)
    }

    pub fn from_config(c: &SiteConfig) -> Self {
        Self {
            max_connections: c.limits.max_connections as usize,
            max_unwelcomed_per_address: c.limits.unwelcomed_per_address() as usize,
            max_inflight_bytes: c.limits.max_inflight_bytes,
            frame_timeout: Duration::from_secs(c.limits.frame_timeout_secs),
            idle_timeout: Duration::from_secs(c.limits.idle_timeout_secs),
            max_share_len: c.limits.max_share_bytes.min(msg::MAX_DATA as u64),
        }
    }
}

/// What the server serves: one store and the links it accepts.
pub struct Server<D: BlockDevice> {
    store: Store<D>,
    links: Vec<Arc<LinkEnds>>,
    limits: ServerLimits,
    /// In-flight bytes, in KiB permits.
    memory: Arc<Semaphore>,
    /// How many permits `memory` holds in all.
    memory_permits: u32,
    /// Which refusals get a log line.
    refusals: RefusalLog,
    /// Shares opened as they arrived, and where their time went ([`Server::link_times`]).
    link_clock: [AtomicU64; 3],
}

/// Shares that arrived on a link and were opened as they arrived, and the time they took,
/// summed ([`Server::link_times`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkTimes {
    /// Sealed frames received as a PUT's share is (long enough to carry one, on a welcomed
    /// link): PUTs, and also frames refused or found to be no PUT once opened.
    pub shares: u64,
    /// From the frame's head read to its tag verified: the share's transfer, opened as it
    /// came.
    pub open_ns: u64,
    /// From the tag verified to the request's blocking work (the store's put) starting
    /// (`run_blocking`).
    pub to_thread_ns: u64,
}

impl LinkTimes {
    /// What was added since `before`.
    pub fn since(&self, before: &LinkTimes) -> LinkTimes {
        LinkTimes {
            shares: self.shares - before.shares,
            open_ns: self.open_ns - before.open_ns,
            to_thread_ns: self.to_thread_ns - before.to_thread_ns,
        }
    }
}

/// Frames up to this long (a GET's is under 100 bytes) are opened in the connection's task to
/// see whether they are a GET, which is then answered there.
const INLINE_FRAME_MAX: usize = 1024;

/// What the connection's task made of a small frame before any blocking thread saw it.
enum Inline {
    /// Answered here (a GET, or a frame the link refused): what to send.
    Done(Outcome),
    /// A link's frame, opened into the plain buffer: the blocking path goes on from there.
    Opened,
    /// Left as it came, for the blocking path.
    Untouched,
}

/// The sockets a server accepts connections on.
#[derive(Debug, Default)]
pub struct Listeners {
    pub unix: Option<(UnixListener, PathBuf)>,
    pub tcp: Option<TcpListener>,
}

impl Listeners {
    /// Bind the sockets of a configuration (a stale Unix socket file is replaced).
    pub async fn bind(c: &SiteConfig) -> Result<Self, ServerError> {
        let mut l = Listeners::default();
        if let Some(p) = &c.unix_socket {
            l.unix = Some((bind_unix(p)?, p.clone()));
        }
        if let Some(a) = &c.listen {
            let t = TcpListener::bind(a)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: a.clone(),
                    source,
                })?;
            l.tcp = Some(t);
        }
        if l.unix.is_none() && l.tcp.is_none() {
            return Err(ServerError::NothingToServe {
                site: c.site.clone(),
            });
        }
        Ok(l)
    }
}

fn bind_unix(p: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::Bind {
        addr: p.display().to_string(),
        source,
    };
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    qgenome::control::clear_stale_socket(p).map_err(bind_err)?;
    let l = UnixListener::bind(p).map_err(bind_err)?;
    // Only the owner (the mount runs as the same user or root) may connect: no pad here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(l)
}

const KIB: u64 = 1024;

fn permits_for(bytes: usize) -> u32 {
    (bytes as u64).div_ceil(KIB).max(1) as u32
}

impl<D: BlockDevice> Server<D> {
    pub fn new(store: Store<D>, links: Vec<LinkEnds>, limits: ServerLimits) -> Self {
        let permits = (limits.max_inflight_bytes / KIB).clamp(1, u32::MAX as u64) as u32;
        // A frame granted before one accepted may still be arriving for its transfer deadline
        // (its header is read at once, its body within the deadline, the longest for the
        // largest share): its gap must outlive that.
        let longest = limits.transfer_deadline(limits.max_share_len as usize);
        let gap_lifetime = qgenome::link::stream::GAP_LIFETIME.max(longest * 4);
        for l in &links {
            lock(&l.recv).set_gap_lifetime(gap_lifetime);
        }
        Self {
            store,
            links: links.into_iter().map(Arc::new).collect(),
            memory: Arc::new(Semaphore::new(permits as usize)),
            memory_permits: permits,
            refusals: RefusalLog::default(),
            limits,
            link_clock: Default::default(),
        }
    }

    /// Where the shares that arrived on links spent their time until the store took them.
    pub fn link_times(&self) -> LinkTimes {
        let [shares, open_ns, to_thread_ns] = self
            .link_clock
            .each_ref()
            .map(|a| a.load(Ordering::Relaxed));
        LinkTimes {
            shares,
            open_ns,
            to_thread_ns,
        }
    }

    pub fn store(&self) -> &Store<D> {
        &self.store
    }

    pub fn links(&self) -> &[Arc<LinkEnds>] {
        &self.links
    }

    /// Serve until `shutdown` completes; then stop accepting, let every connection finish
    /// the request it is in, flush the streams and the index.
    pub async fn run(
        self: Arc<Self>,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        // Each listener has its own connection permits: connections from the network can
        // never hold the ones the home mount's Unix socket needs.
        let unix_conns = Arc::new(Semaphore::new(self.limits.max_connections));
        let tcp_conns = Arc::new(Semaphore::new(self.limits.max_connections));
        let unwelcomed = Arc::new(UnwelcomedCounts::default());
        let cap = self
            .limits
            .max_unwelcomed_per_address
            .clamp(1, self.limits.max_connections);
        let mut tasks = JoinSet::new();
        let Listeners { unix, tcp } = listeners;
        let (unix, unix_path) = match unix {
            Some((l, p)) => (Some(l), Some(p)),
            None => (None, None),
        };
        tokio::pin!(shutdown);
        // Gaps in the links' received key die of age even on a link fallen silent.
        let mut sweep = tokio::time::interval(GAP_SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = sweep.tick() => {
                    let links = self.links.clone();
                    tokio::task::spawn_blocking(move || {
                        for l in &links {
                            lock(&l.recv).expire_gaps();
                        }
                    });
                }
                (permit, r) = with_permit(&unix_conns, accept_unix(unix.as_ref())) => match r {
                    Ok(s) => {
                        qgenome::sites::mountd::size_unix_socket(&s);
                        let srv = self.clone();
                        let stop = stop_rx.clone();
                        tasks.spawn(async move {
                            srv.serve_conn(s, "unix".to_string(), None, stop).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // EMFILE and the like: a pause, not a loop flooding the log.
                        tracing::warn!("unix socket accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                (permit, r) = with_permit(&tcp_conns, accept_tcp(tcp.as_ref())) => match r {
                    Ok((s, peer)) => {
                        let Some(slot) = Unwelcomed::take(&unwelcomed, peer.ip(), cap) else {
                            // Closed at once: its permit goes back with it.
                            unwelcomed.refused(peer, cap);
                            continue;
                        };
                        let _ = s.set_nodelay(true);
                        if let Err(e) = set_keepalive(&s) {
                            tracing::warn!("peer {peer}: cannot enable TCP keepalive: {e}");
                        }
                        let srv = self.clone();
                        let stop = stop_rx.clone();
                        tasks.spawn(async move {
                            let c = ConnLink {
                                link: None,
                                unwelcomed: Some(slot),
                            };
                            srv.serve_conn(s, peer.to_string(), Some(c), stop).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!("tcp accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
            // Reap finished connection tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
        }
        tracing::info!(
            "stopping: no new connections; finishing {} connection(s)",
            tasks.len()
        );
        drop(unix);
        drop(tcp);
        if let Some(p) = unix_path {
            let _ = std::fs::remove_file(p);
        }
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        let srv = self.clone();
        tokio::task::spawn_blocking(move || -> Result<(), ServerError> {
            for l in &srv.links {
                l.flush().map_err(|source| ServerError::Link {
                    link: l.name.clone(),
                    source,
                })?;
            }
            srv.store.flush()?;
            Ok(())
        })
        .await
        .expect("flush task")?;
        tracing::info!("stopped");
        Ok(())
    }

    async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: Arc<Self>,
        mut s: S,
        peer: String,
        mut sealed: Option<ConnLink>,
        mut stop: watch::Receiver<bool>,
    ) {
        // Buffers reused from one request to the next on this connection (a share is about
        // 1 MiB: a fresh buffer per request cost a page-fault storm or a memset each time).
        let mut reply = Vec::new();
        let mut frame = Vec::new();
        let mut plain = Vec::new();
        // The first frame's header (a link's HELLO) must arrive this soon after the connection
        // was accepted; later ones may be awaited for the idle timeout. Once its header is in,
        // a frame must arrive whole within its transfer deadline.
        let mut first_by = Some(tokio::time::Instant::now() + self.limits.frame_timeout);
        // Refusals are logged per source, within a budget (`RefusalLog`); the Unix socket's
        // peers (the home mount, the site's own admin) always.
        let source = peer
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| source_of(a.ip()));
        loop {
            let link_name = sealed
                .as_ref()
                .and_then(|c| c.link.as_ref().map(|l| l.name.clone()))
                .unwrap_or_else(|| {
                    if sealed.is_some() {
                        "(not yet known)".into()
                    } else {
                        "(unix socket, unsealed)".into()
                    }
                });
            let refuse = |reason: &str| {
                let unlogged = match source.map(|ip| (ip, self.refusals.admit(ip))) {
                    Some((_, None)) => return,
                    Some((ip, Some(n))) if n > 0 => format!(
                        " ({n} more refusals from {ip} not logged since its last line: at most \
                         one a second after a burst of {REFUSAL_BURST})"
                    ),
                    _ => String::new(),
                };
                tracing::warn!(
                    "link {link_name} peer {peer}: refused frame: {reason}; closing \
                     connection{unlogged}"
                );
            };
            // Wait for the next frame, or stop.
            let wait_until =
                first_by.unwrap_or_else(|| tokio::time::Instant::now() + self.limits.idle_timeout);
            let first = tokio::select! {
                biased;
                _ = stop.changed() => return,
                r = tokio::time::timeout_at(wait_until, read_first(&mut s, sealed.is_some())) => r,
            };
            let prefix = match first {
                Ok(Ok(Some(p))) => p,
                Ok(Ok(None)) => return, // clean close between frames
                Ok(Err(e)) => return refuse(&format!("reading frame start: {e}")),
                Err(_) if first_by.is_some() => {
                    return refuse(&format!(
                        "no first frame within {:?} of connecting (limits.frame_timeout_secs)",
                        self.limits.frame_timeout
                    ))
                }
                Err(_) => {
                    tracing::info!(
                        "link {link_name} peer {peer}: idle for {:?} \
                         (limits.idle_timeout_secs); closing connection",
                        self.limits.idle_timeout
                    );
                    return;
                }
            };
            first_by = None;
            let before_hello = sealed.as_ref().is_some_and(|c| c.link.is_none());
            let total = match frame_len(&prefix, sealed.is_some(), before_hello) {
                Ok(n) => n,
                Err(reason) => return refuse(&reason),
            };
            // Before HELLO anyone may send: a frame no link of this site receives is refused
            // before it holds any of the in-flight memory (which the links and the home
            // mount share), and `frame_len` held it to a HELLO's size.
            if before_hello {
                if let Err(reason) = self.first_frame_stream(&prefix) {
                    return refuse(&reason);
                }
            }
            // Waiting for memory held by other requests ends at a stop like any other wait.
            let mut permit = Some(tokio::select! {
                biased;
                _ = stop.changed() => return,
                p = self.reserve(total) => p,
            });
            // A PUT's share is read straight into the store buffer it is written from. On the
            // Unix socket once its head shows a PUT; on a link (whose message is sealed) for
            // any frame long enough to be one after HELLO, opened there in place and judged
            // once opened (`handle_sealed_put`).
            let (head_len, tag_len) = match &sealed {
                Some(_) => (frame::HEADER_LEN + msg::PUT_HEAD_LEN, frame::TAG_LEN),
                None => (msg::PLAIN_PREFIX + msg::PUT_HEAD_LEN, 0),
            };
            let data_len = total.saturating_sub(head_len + tag_len);
            let to_store = data_len > 0
                && data_len as u64 <= self.limits.max_share_len
                && sealed.as_ref().is_none_or(|c| c.link.is_some());
            // Sized without clearing: every byte is overwritten by the reads below.
            frame.resize(if to_store { head_len } else { total }, 0);
            frame[..prefix.len()].copy_from_slice(&prefix);
            // One deadline for the whole frame, however many reads it takes.
            let by = tokio::time::Instant::now() + self.limits.transfer_deadline(total);
            let at = prefix.len();
            if let Err(reason) = self
                .read_rest(&mut s, &mut frame[at..], at, total, by)
                .await
            {
                return refuse(&reason);
            }
            let mut share = None;
            let mut pre_opened = None;
            let mut opened_at = None;
            if let Some(link) = sealed
                .as_ref()
                .and_then(|c| c.link.clone())
                .filter(|_| to_store)
            {
                // The share into the store buffer, the tag behind the head in `frame`; opened
                // as it arrives (each piece hashed and decrypted while the next is on the
                // wire), verified once the tag is in. A frame the stream does not admit is
                // read whole and refused by `handle_sealed_put`, as any other.
                let head_at = Instant::now();
                let mut b = self.store.share_buf(data_len);
                let at = frame.len();
                frame.resize(at + frame::TAG_LEN, 0);
                let (head, rest) = frame.split_at_mut(frame::HEADER_LEN);
                let head: &[u8; frame::HEADER_LEN] = (&*head).try_into().expect("header length");
                let (ct, tag) = rest.split_at_mut(rest.len() - frame::TAG_LEN);
                let len = (ct.len() + data_len) as u64;
                // Admitted on this worker when the stream is free; when it is held (another
                // frame's finish may be syncing a new key window), on a blocking thread, so
                // that the connections this worker serves do not wait for that sync.
                let free = try_lock(&link.recv).map(|mut rx| rx.admit(head, len, frame::TAG_LEN));
                let admitted = match free {
                    Some(admitted) => admitted,
                    None => {
                        let (l, h) = (Arc::clone(&link), *head);
                        tokio::task::spawn_blocking(move || {
                            lock(&l.recv).admit(&h, len, frame::TAG_LEN)
                        })
                        .await
                        .expect("admit task")
                    }
                };
                let admission = admitted.ok().map(|f| Admission {
                    link: Arc::clone(&link),
                    frame: Some(f),
                });
                let mut open = admission.as_ref().map(|a| {
                    let mut o = a.frame().opener()?;
                    o.update(ct)?;
                    Ok(o)
                });
                // What a frame cut short leaves decrypted (unverified) goes with it.
                let wipe = |ct: &mut [u8], b: &mut ShareBuf| {
                    zeroize::Zeroize::zeroize(ct);
                    zeroize::Zeroize::zeroize(b.as_mut_slice());
                };
                // Each piece is summed for the store once decrypted, while still in cache; the
                // sum is used only if the tag verifies.
                let mut sum = ShareSummer::new();
                let mut done = 0;
                while done < data_len {
                    let piece = &mut b.as_mut_slice()[done..(done + OPEN_PIECE).min(data_len)];
                    let got = self.read_rest(&mut s, piece, at + done, total, by).await;
                    if let (Ok(()), Some(Ok(o))) = (&got, &mut open) {
                        match o.update(piece) {
                            Ok(()) => sum.update(piece),
                            Err(e) => open = Some(Err(e)),
                        }
                    }
                    done += piece.len();
                    if let Err(reason) = got {
                        wipe(ct, &mut b);
                        return refuse(&reason);
                    }
                }
                if let Err(reason) = self.read_rest(&mut s, tag, at + data_len, total, by).await {
                    wipe(ct, &mut b);
                    return refuse(&reason);
                }
                let verdict = open.map(|o| o.and_then(|o| o.finish(tag)));
                if matches!(verdict, Some(Ok(_))) {
                    b.set_sum(sum.finish());
                }
                let now = Instant::now();
                self.link_clock[0].fetch_add(1, Ordering::Relaxed);
                add_nanos(&self.link_clock[1], now - head_at);
                opened_at = Some(now);
                pre_opened = admission.zip(verdict);
                share = Some(b);
            } else if to_store {
                let head = &frame[msg::PLAIN_PREFIX..];
                if msg::is_put(head) {
                    let mut b = self.store.share_buf(data_len);
                    if let Err(reason) = self
                        .read_rest(&mut s, b.as_mut_slice(), frame.len(), total, by)
                        .await
                    {
                        return refuse(&reason);
                    }
                    share = Some(b);
                } else {
                    // Not a PUT after all: the rest of the message behind its head.
                    frame.resize(total, 0);
                    let at = total - data_len;
                    if let Err(reason) = self
                        .read_rest(&mut s, &mut frame[at..], at, total, by)
                        .await
                    {
                        return refuse(&reason);
                    }
                }
            }
            let inline = if share.is_none() && frame.len() <= INLINE_FRAME_MAX {
                self.inline(&sealed, &frame, &mut plain, &mut reply, &mut permit, &peer)
                    .await
            } else {
                Inline::Untouched
            };
            let outcome = if let Inline::Done(o) = inline {
                o
            } else {
                let opened = matches!(inline, Inline::Opened);
                let srv = self.clone();
                let conn = sealed.take();
                let peer2 = peer.clone();
                let mut out = std::mem::take(&mut reply);
                let (mut f, mut p) = (std::mem::take(&mut frame), std::mem::take(&mut plain));
                let (conn, outcome, out, f, p) = run_blocking(move || {
                    if let Some(t) = opened_at {
                        add_nanos(&srv.link_clock[2], t.elapsed());
                    }
                    let mut conn = conn;
                    let o = match (share, conn.as_mut()) {
                        (Some(b), None) => {
                            srv.handle_unix_put(&f[msg::PLAIN_PREFIX..], b, &mut out, &peer2)
                        }
                        (Some(b), Some(c)) => srv
                            .handle_sealed_put(c, &mut f, b, pre_opened, &mut p, &mut out, &peer2),
                        (None, Some(c)) if opened => {
                            let link = c.link.clone().expect("opened in place: link known");
                            srv.answer_sealed(c, &link, &p, &mut out, &peer2)
                        }
                        (None, _) => srv.handle(&mut conn, &f, &mut p, &mut out, &peer2),
                    };
                    (conn, o, out, f, p)
                })
                .await;
                sealed = conn;
                reply = out;
                (frame, plain) = (f, p);
                outcome
            };
            let (close, share, tag) = match outcome {
                Outcome::Reply(share) => (None, share, None),
                Outcome::SealedShare(share, tag) => (None, Some(share), Some(tag)),
                Outcome::ReplyAndClose(reason) => (Some(reason), None, None),
                Outcome::Close(reason) => {
                    drop(permit);
                    return refuse(&reason);
                }
            };
            let tail = share.as_ref().map_or(&[][..], |d| d.bytes());
            // A peer that does not take its reply within its transfer deadline loses the
            // connection (it would otherwise hold its slot, its in-flight bytes, and a
            // shutdown's wait for every connection, forever).
            let limit = self.limits.transfer_deadline(reply.len() + tail.len());
            let w = if sealed.is_some() {
                let tag = tag.as_ref().map_or(&[][..], |t| &t[..]);
                write_by(limit, &mut s, &[&reply, tail, tag]).await
            } else {
                let len = ((reply.len() + tail.len()) as u32).to_le_bytes();
                write_by(limit, &mut s, &[&len, &reply, tail]).await
            };
            drop(share);
            drop(permit);
            if let Err(e) = w {
                tracing::info!(
                    "link {link_name} peer {peer}: writing reply: {e}; closing connection"
                );
                return;
            }
            if let Some(reason) = close {
                let _ = tokio::time::timeout(self.limits.frame_timeout, s.shutdown()).await;
                return refuse(&reason);
            }
        }
    }

    /// Permits for `bytes` in flight (at most all there are, so a lone request is never
    /// stuck behind the limit).
    async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        self.memory
            .clone()
            .acquire_many_owned(permits_for(bytes).min(self.memory_permits))
            .await
            .expect("the in-flight semaphore is never closed")
    }

    /// A small frame as the connection's task sees it: a GET is answered here, the volume
    /// read awaited rather than blocked on; a link's frame is opened here either way (a few
    /// dozen bytes). A HELLO, and every other request, go on to a blocking thread.
    async fn inline(
        self: &Arc<Self>,
        conn: &Option<ConnLink>,
        frame: &[u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
        permit: &mut Option<OwnedSemaphorePermit>,
        peer: &str,
    ) -> Inline {
        let Some(c) = conn else {
            let (id, key) = match msg::decode(&frame[msg::PLAIN_PREFIX..]) {
                Ok(Msg {
                    id,
                    body: Body::Get { key },
                }) => (id, key),
                _ => return Inline::Untouched,
            };
            let r = self.get_awaited(id, &key, permit, peer, "unix").await;
            *out = r.head;
            return Inline::Done(Outcome::Reply(r.share));
        };
        // Before HELLO the link is not known: the blocking path finds it.
        let Some(link) = c.link.clone() else {
            return Inline::Untouched;
        };
        let opened = lock(&link.recv).open(frame, plain);
        if let Err(e) = opened {
            return Inline::Done(self.refuse_frame(&link, e, out));
        }
        let (id, key) = match msg::decode(plain) {
            Ok(Msg {
                id,
                body: Body::Get { key },
            }) => (id, key),
            _ => return Inline::Opened,
        };
        let r = self.get_awaited(id, &key, permit, peer, &link.name).await;
        Inline::Done(self.seal_answer(&link, id, r, out))
    }

    /// A GET answered from the connection's task: the index looked up, the reply's bytes
    /// reserved in place of the request's `permit`, the volume read awaited. Bytes that do
    /// not verify (a put or delete of the key raced with the read, or damage) are read again
    /// the blocking way, under the key's lock, which says which it was.
    async fn get_awaited(
        self: &Arc<Self>,
        id: u64,
        key: &WireKey,
        permit: &mut Option<OwnedSemaphorePermit>,
        peer: &str,
        via: &str,
    ) -> Reply {
        let key = to_key(key);
        let r = async {
            let l: Located = self.store.locate(&key)?;
            *permit = None;
            *permit = Some(self.reserve(l.read_len()).await);
            if let Some(d) = self.store.read_located(&l).await? {
                return Ok(d);
            }
            let srv = self.clone();
            tokio::task::spawn_blocking(move || srv.store.get(&key))
                .await
                .expect("GET task")
        }
        .await;
        answer(id, "GET", r.map(|d| share_reply(id, d)), peer, via)
    }

    /// Fill `buf`, the part of a frame of `total` bytes after its first `at`, by `deadline`
    /// (the frame's transfer deadline after it began); the reason to refuse the frame
    /// otherwise.
    async fn read_rest<S: AsyncRead + Unpin>(
        &self,
        s: &mut S,
        buf: &mut [u8],
        at: usize,
        total: usize,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        match tokio::time::timeout_at(deadline, read_full(s, buf)).await {
            Err(_) => Err(format!(
                "frame of {total} bytes incomplete after {:?} (limits.frame_timeout_secs, and \
                 the time its bytes take at {} KiB/s)",
                self.limits.transfer_deadline(total),
                qgenome::wire::SLOWEST_LINK >> 10
            )),
            Ok(Err(e)) => Err(format!("reading frame body: {e}")),
            Ok(Ok(got)) if got < buf.len() => Err(format!(
                "truncated frame: {} of {total} bytes arrived before the peer closed",
                at + got
            )),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// A PUT from the Unix socket whose share was read straight into `buf` behind its `head`.
    fn handle_unix_put(
        &self,
        head: &[u8],
        buf: ShareBuf,
        out: &mut Vec<u8>,
        peer: &str,
    ) -> Outcome {
        let put = match msg::decode_split(head, buf.as_slice()) {
            Ok(Msg {
                id,
                body: Body::Put { key, meta, .. },
            }) => StagedPut { id, key, meta, buf },
            Ok(m) => {
                // `is_put` saw a PUT's kind, so this cannot happen; answered all the same.
                let r = format!("{} where a PUT was read", m.body.name());
                plain_error(out, m.id, ErrorCode::BadRequest, 0, &r);
                return Outcome::ReplyAndClose(r);
            }
            Err(e) => {
                plain_error(out, 0, ErrorCode::BadRequest, 0, &e.to_string());
                return Outcome::ReplyAndClose(format!("malformed message: {e}"));
            }
        };
        *out = self.put_staged(put, peer, "unix").head;
        Outcome::Reply(None)
    }

    /// Open, decode, execute and answer one frame (blocking: store and crypto work).
    fn handle(
        &self,
        conn: &mut Option<ConnLink>,
        frame: &[u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
        peer: &str,
    ) -> Outcome {
        match conn {
            None => {
                let m = match msg::decode(&frame[msg::PLAIN_PREFIX..]) {
                    Ok(m) => m,
                    Err(e) => {
                        plain_error(out, 0, ErrorCode::BadRequest, 0, &e.to_string());
                        return Outcome::ReplyAndClose(format!("malformed message: {e}"));
                    }
                };
                if let Body::Hello { .. } = m.body {
                    let r = "HELLO on the unsealed socket";
                    plain_error(out, m.id, ErrorCode::BadRequest, 0, r);
                    return Outcome::ReplyAndClose(r.to_string());
                }
                let r = self.execute(&m, peer, "unix");
                *out = r.head;
                Outcome::Reply(r.share)
            }
            Some(c) => self.handle_sealed(c, frame, plain, out, peer),
        }
    }

    /// Whether some link of this site receives the stream that the frame starting with
    /// `prefix` (its header, already checked by `frame_len`) is sealed for; the blocking
    /// path finds the link the same way.
    fn first_frame_stream(&self, prefix: &[u8]) -> Result<(), String> {
        let p: &[u8; frame::HEADER_LEN] = prefix.try_into().expect("header length");
        let h = FrameHeader::parse_prefix(p, msg::MAX_HELLO as u64)
            .map_err(|e| format!("malformed frame header: {e}"))?;
        match self.links.iter().any(|l| l.recv_id == h.stream_id) {
            true => Ok(()),
            false => Err(unknown_stream(&h.stream_id)),
        }
    }

    fn handle_sealed(
        &self,
        c: &mut ConnLink,
        frame: &[u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
        peer: &str,
    ) -> Outcome {
        let header = match FrameHeader::parse_frame(frame) {
            Ok(h) => h,
            Err(e) => return Outcome::Close(format!("malformed frame: {e}")),
        };
        let link = match &c.link {
            Some(l) => l.clone(),
            None => match self.links.iter().find(|l| l.recv_id == header.stream_id) {
                Some(l) => l.clone(),
                None => return Outcome::Close(unknown_stream(&header.stream_id)),
            },
        };
        // Bound first: in `if let` the stream's guard would live through `refuse_frame`.
        let opened = lock(&link.recv).open(frame, plain);
        if let Err(e) = opened {
            return self.refuse_frame(&link, e, out);
        }
        self.answer_sealed(c, &link, plain, out, peer)
    }

    /// A frame of a link read in place for a PUT (see `serve_conn`): `frame` holds its
    /// header, the sealed PUT head and its tag, `buf` the rest of the payload. Opened in
    /// place (already, as it arrived, when `opened` holds its admission and the tag's
    /// verdict); a PUT is stored from `buf` as it is, anything else goes the ordinary way.
    #[allow(clippy::too_many_arguments)]
    fn handle_sealed_put(
        &self,
        c: &mut ConnLink,
        frame: &mut [u8],
        mut buf: ShareBuf,
        opened: Option<(Admission, Result<(), SealError<KeyError>>)>,
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
        peer: &str,
    ) -> Outcome {
        let link = c
            .link
            .clone()
            .expect("read in place only once the link is known");
        let (head, rest) = frame.split_at_mut(frame::HEADER_LEN);
        let (ct, tag) = rest.split_at_mut(rest.len() - frame::TAG_LEN);
        let head: &[u8; frame::HEADER_LEN] = (&*head).try_into().expect("header length");
        // The share is verified and decrypted outside the stream's lock (the lock only
        // admits the frame's key range, then marks it used): the connections of one link
        // open their shares at once, on every core.
        let opened = match opened {
            Some((mut admission, verdict)) => admission.finish(verdict),
            None => {
                let len = (ct.len() + buf.len()) as u64;
                let admitted = lock(&link.recv).admit(head, len, tag.len());
                admitted.and_then(|frame| {
                    let body = &mut [&mut *ct, buf.as_mut_slice()];
                    let r = frame.open(body, tag);
                    lock(&link.recv).finish(frame, r).map(|_| ())
                })
            }
        };
        if let Err(e) = opened {
            // Nothing of a frame that did not open stays readable (its pieces were wiped if
            // it was admitted; a refused one is wiped here).
            zeroize::Zeroize::zeroize(&mut *ct);
            zeroize::Zeroize::zeroize(buf.as_mut_slice());
            return self.refuse_frame(&link, e, out);
        }
        let put = match msg::decode_split(ct, buf.as_slice()) {
            Ok(Msg {
                id,
                body: Body::Put { key, meta, .. },
            }) => Some((id, key, meta)),
            _ => None,
        };
        let Some((id, key, meta)) = put else {
            // Not a PUT after all: the whole message, for the ordinary path to judge.
            plain.clear();
            plain.extend_from_slice(ct);
            plain.extend_from_slice(buf.as_slice());
            return self.answer_sealed(c, &link, plain, out, peer);
        };
        let reply = self.put_staged(StagedPut { id, key, meta, buf }, peer, &link.name);
        let sealed = lock(&link.send).seal_parts(&reply.parts(), out);
        match sealed {
            Ok(_) => Outcome::Reply(None),
            Err(e) => Outcome::Close(format!("cannot seal the reply: {e}")),
        }
    }

    /// Decode, execute and answer (sealed) the opened message `plain` of a link's frame.
    fn answer_sealed(
        &self,
        c: &mut ConnLink,
        link: &Arc<LinkEnds>,
        plain: &[u8],
        out: &mut Vec<u8>,
        peer: &str,
    ) -> Outcome {
        let m = match msg::decode(plain) {
            Ok(m) => m,
            Err(e) => {
                let reason = format!("authenticated frame holds a malformed message: {e}");
                let b = error_body(ErrorCode::BadRequest, 0, &e.to_string());
                return match self.seal_reply(link, 0, b, out) {
                    Ok(()) => Outcome::ReplyAndClose(reason),
                    Err(se) => Outcome::Close(format!("{reason}; cannot answer: {se}")),
                };
            }
        };
        let reply = if c.link.is_none() {
            match &m.body {
                Body::Hello {
                    link: name,
                    c2s_stream,
                    s2c_stream,
                    client_recv_floor,
                } if *name == link.name
                    && *c2s_stream == link.recv_id
                    && *s2c_stream == link.send_id =>
                {
                    let mut tx = lock(&link.send);
                    // The client's floor is on the stream we send on: at most its pool's end.
                    let floor = (*client_recv_floor).min(tx.next_offset() + tx.remaining());
                    if floor > tx.next_offset() {
                        tracing::info!(
                            "link {} peer {peer}: client's receive stream starts at {floor}; \
                             skipping our send stream from {}",
                            link.name,
                            tx.next_offset()
                        );
                        if let Err(e) = tx.skip_to(floor) {
                            return Outcome::Close(format!("cannot skip send stream: {e}"));
                        }
                    }
                    drop(tx);
                    c.link = Some(link.clone());
                    c.unwelcomed = None;
                    tracing::info!("link {} peer {peer}: connected", link.name);
                    Reply::plain(Msg {
                        id: m.id,
                        body: Body::Welcome {
                            site: self.store.site().to_string(),
                        },
                    })
                }
                Body::Hello { link: name, .. } => {
                    return Outcome::Close(format!(
                        "HELLO names link {name:?} or streams that do not match link {}",
                        link.name
                    ))
                }
                other => {
                    return Outcome::Close(format!(
                        "first message is {} instead of HELLO",
                        other.name()
                    ))
                }
            }
        } else if matches!(m.body, Body::Hello { .. }) {
            Reply::plain(Msg {
                id: m.id,
                body: error_body(ErrorCode::BadRequest, 0, "second HELLO on one connection"),
            })
        } else {
            self.execute(&m, peer, &link.name)
        };
        self.seal_answer(link, m.id, reply, out)
    }

    /// Seal `reply` on `link` into `out`; a share it carries is sealed where it lies (and sent
    /// from there behind `out`, then its tag).
    fn seal_answer(&self, link: &LinkEnds, id: u64, reply: Reply, out: &mut Vec<u8>) -> Outcome {
        if let Some(mut share) = reply.share {
            // The share is sealed where it was read and sent from there.
            let mut head = reply.head;
            // The stream is held only to take the frame's key: the seal runs beside the
            // other connections' frames.
            let grant = lock(&link.send).grant(head.len() + share.bytes().len());
            let sealed = grant.and_then(|g| g.seal_in_place(&mut [&mut head, share.bytes_mut()]));
            return match sealed {
                Ok((header, tag)) => {
                    out.clear();
                    out.extend_from_slice(&header);
                    out.extend_from_slice(&head);
                    Outcome::SealedShare(share, tag)
                }
                // Too little key left to send the share: said so (sealed, on what is left)
                // if a small answer still fits, so the home reports the link's key, not a
                // site that hung up.
                Err(e @ LinkError::Exhausted { .. }) => {
                    let reason = format!("cannot seal the reply: {e}");
                    match self.seal_reply(
                        link,
                        id,
                        error_body(ErrorCode::KeyExhausted, 0, &e.to_string()),
                        out,
                    ) {
                        Ok(()) => Outcome::ReplyAndClose(reason),
                        Err(se) => Outcome::Close(format!("{reason}; cannot answer: {se}")),
                    }
                }
                Err(e) => Outcome::Close(format!("cannot seal the reply: {e}")),
            };
        }
        let sealed = lock(&link.send).seal_parts(&reply.parts(), out);
        match sealed {
            Ok(_) => Outcome::Reply(None),
            Err(e) => Outcome::Close(format!("cannot seal the reply: {e}")),
        }
    }

    /// The answer to a frame the link refused: a stale or replayed frame gets the link's floor
    /// notice (sealed for the first, resent as is: no key spent); anything else closes the
    /// connection.
    fn refuse_frame(&self, link: &LinkEnds, e: LinkError, out: &mut Vec<u8>) -> Outcome {
        match e {
            LinkError::KeyAlreadyUsed { .. } => {
                let n = link.stale_frames.fetch_add(1, Ordering::Relaxed) + 1;
                let reason = format!("replayed or stale frame: {e}");
                let mut kept = lock(&link.floor_notice);
                if kept.is_none() {
                    let mut notice = Vec::new();
                    let body = floor_notice(link.floor_at_start);
                    match self.seal_reply(link, msg::FLOOR_NOTICE_ID, body, &mut notice) {
                        Ok(()) => *kept = Some(Ok(notice)),
                        Err(e @ LinkError::Exhausted { .. }) => *kept = Some(Err(e.to_string())),
                        Err(e) => {
                            return Outcome::Close(format!(
                                "{reason}; not answered: cannot seal the link's floor notice: {e}"
                            ))
                        }
                    }
                }
                match kept.as_ref().expect("kept above") {
                    Ok(notice) => {
                        out.clear();
                        out.extend_from_slice(notice);
                        Outcome::ReplyAndClose(format!(
                            "{reason}; answered with the link's floor notice ({n} stale \
                             frames since start)"
                        ))
                    }
                    Err(why) => Outcome::Close(format!(
                        "{reason}; not answered: the link's floor notice could not be sealed: {why}"
                    )),
                }
            }
            LinkError::WrongStream { .. } => Outcome::Close(format!(
                "frame sealed with another link's or direction's key: {e}"
            )),
            LinkError::BadTag { .. } => Outcome::Close(format!("altered or forged frame: {e}")),
            other => Outcome::Close(other.to_string()),
        }
    }

    fn seal_reply(
        &self,
        link: &LinkEnds,
        id: u64,
        body: Body<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), LinkError> {
        let plain = Msg { id, body }.to_vec();
        lock(&link.send).seal(&plain, out)?;
        Ok(())
    }

    /// Run one request against the store and encode its reply (with the request's id).
    fn execute(&self, m: &Msg<'_>, peer: &str, via: &str) -> Reply {
        let reply = |body: Body<'_>| Reply::plain(Msg { id: m.id, body });
        let r = match &m.body {
            Body::Put { key, meta, data } => {
                if data.is_empty() || data.len() as u64 > self.limits.max_share_len {
                    return reply(error_body(
                        ErrorCode::BadRequest,
                        0,
                        &format!(
                            "site {}: {}: share of {} bytes (allowed 1..={})",
                            self.store.site(),
                            to_key(key),
                            data.len(),
                            self.limits.max_share_len
                        ),
                    ));
                }
                let mut b = self.store.share_buf(data.len());
                b.as_mut_slice().copy_from_slice(data);
                self.store
                    .put_buf(to_key(key), to_meta(meta), b)
                    .map(|()| reply(Body::Done))
            }
            Body::Get { key } => self.store.get(&to_key(key)).map(|d| share_reply(m.id, d)),
            Body::Delete { key } => self.store.delete(&to_key(key)).map(|()| reply(Body::Done)),
            Body::List {
                prefix,
                after,
                limit,
            } => self.list(prefix, after.as_ref(), *limit).map(reply),
            Body::Stat => Ok(reply(self.stat())),
            _ => {
                return reply(error_body(
                    ErrorCode::BadRequest,
                    0,
                    &format!("{} is not a request", m.body.name()),
                ))
            }
        };
        answer(m.id, m.body.name(), r, peer, via)
    }

    /// A PUT whose share was opened straight into the buffer it is written from.
    fn put_staged(&self, m: StagedPut, peer: &str, via: &str) -> Reply {
        let r = self
            .store
            .put_buf(to_key(&m.key), to_meta(&m.meta), m.buf)
            .map(|()| {
                Reply::plain(Msg {
                    id: m.id,
                    body: Body::Done,
                })
            });
        answer(m.id, "PUT", r, peer, via)
    }

    fn list(
        &self,
        prefix: &[u8],
        after: Option<&WireKey>,
        limit: u32,
    ) -> Result<Body<'static>, StoreError> {
        let after = match after {
            Some(k) => Some(to_key(k)),
            None => {
                // Start just before the first key that can carry the prefix.
                let mut file_id = [0u8; 16];
                file_id[..prefix.len()].copy_from_slice(prefix);
                predecessor(&ShareKey {
                    file_id,
                    chunk: 0,
                    share: 0,
                })
            }
        };
        let mut entries = Vec::new();
        let mut next = None;
        for item in self.store.list_after(after.as_ref()) {
            let (k, e) = item?;
            if !k.file_id.starts_with(prefix) {
                if k.file_id[..prefix.len()] > *prefix {
                    break;
                }
                continue;
            }
            if entries.len() as u32 == limit {
                next = entries.last().map(|e: &ListEntry| e.key);
                break;
            }
            entries.push(ListEntry {
                key: from_key(&k),
                meta: WireMeta {
                    k: e.meta.k,
                    n: e.meta.n,
                    secret_len: u32::try_from(e.meta.secret_len).unwrap_or(u32::MAX),
                },
                share_len: u32::try_from(e.share_len).unwrap_or(u32::MAX),
            });
        }
        Ok(Body::Listed { entries, next })
    }

    fn stat(&self) -> Body<'static> {
        let s = self.store.stat();
        Body::Stats(msg::SiteStat {
            site: s.site,
            capacity: s.capacity,
            free: s.free,
            largest_free: s.largest_free,
            shares: s.shares,
            health: match s.health {
                Health::Ok => msg::Health::Ok,
                Health::Damaged => msg::Health::Damaged,
            },
            links: self
                .links
                .iter()
                .map(|l| msg::LinkKeyLeft {
                    link: l.name.clone(),
                    send_remaining: l.send_remaining(),
                    recv_remaining: l.recv_remaining(),
                })
                .collect(),
        })
    }
}

/// The key just before `k` in index order, if any.
fn predecessor(k: &ShareKey) -> Option<ShareKey> {
    let mut b = k.encode();
    for i in (0..b.len()).rev() {
        if b[i] > 0 {
            b[i] -= 1;
            for x in &mut b[i + 1..] {
                *x = 0xff;
            }
            return ShareKey::decode(&b).ok();
        }
    }
    None
}

fn to_key(k: &WireKey) -> ShareKey {
    ShareKey {
        file_id: k.file,
        chunk: k.chunk,
        share: k.share,
    }
}

fn from_key(k: &ShareKey) -> WireKey {
    WireKey {
        file: k.file_id,
        chunk: k.chunk,
        share: k.share,
    }
}

fn to_meta(m: &WireMeta) -> ShareMeta {
    ShareMeta {
        k: m.k,
        n: m.n,
        secret_len: u64::from(m.secret_len),
    }
}

/// The DATA reply to GET `id`: the share goes out from the store's read buffer, so only its
/// head is encoded.
fn share_reply(id: u64, d: ShareData) -> Reply {
    let meta = WireMeta {
        k: d.meta.k,
        n: d.meta.n,
        secret_len: u32::try_from(d.meta.secret_len).unwrap_or(u32::MAX),
    };
    let mut head = Vec::new();
    let tail = Msg {
        id,
        body: Body::Data {
            meta,
            data: d.bytes(),
        },
    }
    .encode_head(&mut head)
    .len();
    debug_assert_eq!(tail, d.bytes().len());
    Reply {
        head,
        share: Some(d),
    }
}

fn error_body(code: ErrorCode, arg: u64, message: &str) -> Body<'static> {
    Body::Error {
        code,
        arg,
        message: message.to_string(),
    }
}

fn plain_error(out: &mut Vec<u8>, id: u64, code: ErrorCode, arg: u64, message: &str) {
    out.clear();
    Msg {
        id,
        body: error_body(code, arg, message),
    }
    .encode(out);
}

/// Pieces a sealed share is read and opened in (see `serve_conn`): each is hashed and
/// decrypted while still in cache, while the next is on its way.
const OPEN_PIECE: usize = 128 << 10;

/// A frame admitted by its link's receive stream while it is read (see `serve_conn`):
/// finished by `handle_sealed_put` with the tag's verdict, or, if the connection gives up
/// before that, on drop as unverified (its key range freed, never marked used).
struct Admission {
    link: Arc<LinkEnds>,
    frame: Option<AdmittedFrame>,
}

impl Admission {
    fn frame(&self) -> &AdmittedFrame {
        self.frame
            .as_ref()
            .expect("finished only once, by finish or drop")
    }

    fn finish(&mut self, verdict: Result<(), SealError<KeyError>>) -> Result<(), LinkError> {
        let frame = self.frame.take().expect("finished only once");
        lock(&self.link.recv).finish(frame, verdict).map(|_| ())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some(frame) = self.frame.take() else {
            return;
        };
        let verdict = Err(SealError::BadTag);
        // As at the admission: not on an async worker behind a window's sync.
        if let Some(mut rx) = try_lock(&self.link.recv) {
            let _ = rx.finish(frame, verdict);
            return;
        }
        let link = Arc::clone(&self.link);
        let finish = move || {
            let _ = lock(&link.recv).finish(frame, verdict);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(finish)),
            Err(_) => finish(),
        }
    }
}

/// Per-connection state of a sealed connection: the link, once HELLO named it.
struct ConnLink {
    link: Option<Arc<LinkEnds>>,
    /// Counted against its address until its HELLO is welcomed.
    unwelcomed: Option<Unwelcomed>,
}

/// TCP connections not yet welcomed, by source ([`source_of`]), and the refusals not logged.
#[derive(Default)]
struct UnwelcomedCounts {
    by_source: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// When a refusal was last logged, and how many were refused since without a line.
    log: Mutex<(Option<std::time::Instant>, u64)>,
}

/// How often a refusal for too many unwelcomed connections is logged at most (a client
/// reconnecting in a loop would flood the log otherwise).
const UNWELCOMED_LOG_EVERY: Duration = Duration::from_secs(10);

impl UnwelcomedCounts {
    /// A connection from `peer` closed unserved: its address had `cap` unwelcomed ones.
    fn refused(&self, peer: std::net::SocketAddr, cap: usize) {
        let mut log = lock(&self.log);
        log.1 += 1;
        let now = std::time::Instant::now();
        if log
            .0
            .is_some_and(|t| now.duration_since(t) < UNWELCOMED_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            "peer {peer}: closed unserved: {cap} connections from {} have not said HELLO yet \
             (limits.max_unwelcomed_per_address); {} refused so since the last such line",
            source_of(peer.ip()),
            log.1
        );
        *log = (Some(now), 0);
    }
}

/// Refusal lines per source ([`source_of`]): a burst of [`REFUSAL_BURST`], then one every
/// [`REFUSAL_EVERY`], the refusals not logged meanwhile counted in the next line. A peer with
/// no key that reconnects in a loop sending garbage (each refused at once, its slot free
/// again) would otherwise write thousands of lines a second, and journald's rate limit would
/// then drop the daemon's other lines with them (damaged shares, index failures).
#[derive(Default)]
struct RefusalLog {
    by_source: Mutex<std::collections::HashMap<std::net::IpAddr, RefusalBudget>>,
}

struct RefusalBudget {
    lines: u32,
    /// When `lines` was last topped up.
    since: std::time::Instant,
    unlogged: u64,
}

const REFUSAL_BURST: u32 = 32;
const REFUSAL_EVERY: Duration = Duration::from_secs(1);
/// Sources tracked at most; past that, the new ones share one budget.
const REFUSAL_SOURCES: usize = 4096;

impl RefusalLog {
    /// Whether a refusal from `source` gets a line: `Some(n)`, `n` the refusals from there not
    /// logged since its last line; `None`: not logged, but counted.
    fn admit(&self, source: std::net::IpAddr) -> Option<u64> {
        self.admit_at(source, std::time::Instant::now())
    }

    fn admit_at(&self, source: std::net::IpAddr, now: std::time::Instant) -> Option<u64> {
        let mut by = lock(&self.by_source);
        let mut key = source;
        if by.len() >= REFUSAL_SOURCES && !by.contains_key(&source) {
            // Forget the sources whose budget is whole again (their count of lines left out
            // goes with them: the table stays bounded whoever floods it).
            by.retain(|_, b| now.duration_since(b.since) < REFUSAL_EVERY * REFUSAL_BURST);
            if by.len() >= REFUSAL_SOURCES {
                key = std::net::Ipv6Addr::UNSPECIFIED.into();
            }
        }
        let b = by.entry(key).or_insert(RefusalBudget {
            lines: REFUSAL_BURST,
            since: now,
            unlogged: 0,
        });
        let earned = (now.duration_since(b.since).as_nanos() / REFUSAL_EVERY.as_nanos()) as u32;
        if earned > 0 {
            b.lines = b.lines.saturating_add(earned).min(REFUSAL_BURST);
            b.since += REFUSAL_EVERY * earned;
        }
        if b.lines == 0 {
            b.unlogged += 1;
            return None;
        }
        b.lines -= 1;
        Some(std::mem::take(&mut b.unlogged))
    }
}

/// Where a connection comes from, for [`Unwelcomed`]: its IPv4 address (also when mapped into
/// IPv6), or its IPv6 /64 (one host commonly holds a whole /64).
fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// One TCP connection counted against its source's unwelcomed connections, until its HELLO is
/// welcomed (dropped then) or it closes.
struct Unwelcomed {
    counts: Arc<UnwelcomedCounts>,
    source: std::net::IpAddr,
}

impl Unwelcomed {
    /// Count a connection from `ip`, unless its source already has `cap` unwelcomed.
    fn take(counts: &Arc<UnwelcomedCounts>, ip: std::net::IpAddr, cap: usize) -> Option<Self> {
        let source = source_of(ip);
        let mut m = lock(&counts.by_source);
        let n = m.entry(source).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            source,
        })
    }
}

impl Drop for Unwelcomed {
    fn drop(&mut self) {
        let mut m = lock(&self.counts.by_source);
        if let Some(n) = m.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

/// A PUT request whose share is already in the buffer the store writes from.
struct StagedPut {
    id: u64,
    key: WireKey,
    meta: WireMeta,
    buf: ShareBuf,
}

/// The reply to a request that ran as `r`: store errors become error replies (logged).
fn answer(id: u64, what: &str, r: Result<Reply, StoreError>, peer: &str, via: &str) -> Reply {
    r.unwrap_or_else(|e| {
        // A missing share is an answer, not a fault; a failing volume or index must show
        // in the site's own log at the default level.
        let code = match &e {
            StoreError::NotFound { .. } => ErrorCode::NotFound,
            StoreError::Damaged { .. } => ErrorCode::Damaged,
            StoreError::VolumeFull { .. } => ErrorCode::VolumeFull,
            StoreError::InvalidShare { .. } => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        };
        match code {
            ErrorCode::NotFound => tracing::debug!("{via} peer {peer}: {what} failed: {e}"),
            ErrorCode::Internal => tracing::error!("{via} peer {peer}: {what} failed: {e}"),
            _ => tracing::warn!("{via} peer {peer}: {what} failed: {e}"),
        }
        Reply::plain(Msg {
            id,
            body: error_body(code, 0, &e.to_string()),
        })
    })
}

/// Runs a request's blocking work (store and crypto) for its connection's task. On a
/// multi-thread runtime, on the task's own thread (`block_in_place`): the worker's other
/// tasks go to a thread of the blocking pool meanwhile, off the request's path, and the task
/// goes on when the work is done, without a wake-up. Else (a current-thread runtime) on a
/// blocking thread.
async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        tokio::task::block_in_place(f)
    } else {
        tokio::task::spawn_blocking(f).await.expect("request task")
    }
}

/// [`write_all_parts`] within `limit`; a peer that does not take the bytes by then is an error.
async fn write_by<S: AsyncWrite + Unpin>(
    limit: Duration,
    s: &mut S,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    match tokio::time::timeout(limit, write_all_parts(s, parts)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "peer took no reply within {limit:?} (limits.frame_timeout_secs, and the time \
                 the reply takes at {} KiB/s)",
                qgenome::wire::SLOWEST_LINK >> 10
            ),
        )),
    }
}

/// Write all of `parts` (a length, a head, a share) with vectored writes: usually one system
/// call for the lot instead of one per piece.
async fn write_all_parts<S: AsyncWrite + Unpin>(s: &mut S, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> =
        parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    std::io::IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match s.write_vectored(rest).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => std::io::IoSlice::advance_slices(&mut rest, n),
        }
    }
    Ok(())
}

/// An encoded reply: `head`, then the bytes of `share` when it carries one (GET), sent from
/// the store's buffer without being copied behind the head.
struct Reply {
    head: Vec<u8>,
    share: Option<ShareData>,
}

impl Reply {
    fn plain(m: Msg<'_>) -> Self {
        Self {
            head: m.to_vec(),
            share: None,
        }
    }

    fn parts(&self) -> [&[u8]; 2] {
        [&self.head, self.share.as_ref().map_or(&[], |d| d.bytes())]
    }
}

enum Outcome {
    /// Send the reply in the output buffer, then these share bytes (unsealed socket only).
    Reply(Option<ShareData>),
    /// Send the output buffer (a frame's header and sealed message head), then this share
    /// (sealed in place), then the frame's tag.
    SealedShare(ShareData, [u8; frame::TAG_LEN]),
    ReplyAndClose(String),
    Close(String),
}

/// A connection permit from `sem`, then what `accept` gives. Both are cancel-safe, so the
/// accept loop may drop this future when another listener's connection comes first.
async fn with_permit<T>(
    sem: &Arc<Semaphore>,
    accept: impl Future<Output = T>,
) -> (tokio::sync::OwnedSemaphorePermit, T) {
    let permit = sem
        .clone()
        .acquire_owned()
        .await
        .expect("semaphore never closed");
    (permit, accept.await)
}

/// Seconds a TCP connection may be silent before the kernel probes its peer; probes every
/// `KEEPALIVE_INTERVAL_SECS`, and gives up (resetting the connection) after `KEEPALIVE_PROBES`.
const KEEPALIVE_IDLE_SECS: u32 = 60;
const KEEPALIVE_INTERVAL_SECS: u32 = 10;
const KEEPALIVE_PROBES: u32 = 6;

/// Turn on TCP keepalive for an accepted connection, so that a peer that vanished (host down,
/// cable cut: no FIN, no RST) is found out in about two minutes instead of never.
fn set_keepalive(s: &tokio::net::TcpStream) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(s, sockopt::KeepAlive, &true)?;
    setsockopt(s, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECS)?;
    setsockopt(s, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECS)?;
    setsockopt(s, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)
}

async fn accept_unix(l: Option<&UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn accept_tcp(
    l: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Read the fixed start of a frame: the 40-byte sealed header or the 4-byte plain length.
/// `None` when the peer closed cleanly before the first byte.
async fn read_first<S: AsyncRead + Unpin>(
    s: &mut S,
    sealed: bool,
) -> std::io::Result<Option<Vec<u8>>> {
    let n = if sealed {
        frame::HEADER_LEN
    } else {
        msg::PLAIN_PREFIX
    };
    let mut b = vec![0u8; n];
    let got = read_full(s, &mut b).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("truncated frame: peer closed after {got} of the {n} header bytes"),
        ));
    }
    Ok(Some(b))
}

/// Read until `buf` is full or the peer closes; returns the bytes read.
async fn read_full<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        let n = s.read(&mut buf[at..]).await?;
        if n == 0 {
            break;
        }
        at += n;
    }
    Ok(at)
}

fn unknown_stream(id: &[u8; 16]) -> String {
    format!(
        "frame sealed for stream {} which no link of this site receives \
         (another link's key or another site)",
        hex(id)
    )
}

/// Total bytes of the frame whose start is `prefix` (including the prefix for sealed frames,
/// excluding it for plain ones), refusing absurd lengths before anything is allocated: on a
/// link before its HELLO, anything longer than a HELLO.
fn frame_len(prefix: &[u8], sealed: bool, before_hello: bool) -> Result<usize, String> {
    if sealed {
        let p: &[u8; frame::HEADER_LEN] = prefix.try_into().expect("header length");
        let (max, when) = match before_hello {
            true => (msg::MAX_HELLO, " before HELLO"),
            false => (msg::MAX_MSG, ""),
        };
        let h = FrameHeader::parse_prefix(p, max as u64).map_err(|e| match e {
            frame::FrameError::PayloadTooLarge { declared } => format!(
                "absurd length: frame declares a {declared}-byte payload (at most {max}{when})"
            ),
            e => format!("malformed frame header: {e}"),
        })?;
        Ok(h.frame_len())
    } else {
        let p: [u8; msg::PLAIN_PREFIX] = prefix.try_into().expect("prefix length");
        let n = msg::plain_len(p).map_err(|e| match e {
            msg::MsgError::TooLarge { len } => format!(
                "absurd length: frame declares {len} bytes (at most {})",
                msg::MAX_MSG
            ),
            e => format!("malformed frame length: {e}"),
        })?;
        // The plain frame buffer holds the prefix too; handle() is given the message only.
        Ok(n + msg::PLAIN_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site's link whose window is larger than its pool ("64G" for "64M") is refused
    /// before its ledgers are made, naming the link and the pool; one of the whole pool opens.
    #[test]
    fn a_link_whose_window_is_larger_than_its_pool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        pool::provision("home-s", 4 << 20, &a, &b).unwrap();
        let config = |window| crate::config::LinkConfig {
            name: "home-s".into(),
            key_dir: b.clone(),
            end: crate::config::LinkEnd::B,
            window,
        };
        let Err(e) = LinkEnds::open(&config(64 << 30)) else {
            panic!("a 64 GiB window over a 4 MiB pool was taken");
        };
        let e = e.to_string();
        assert!(
            e.contains("home-s") && e.contains("larger than pool") && e.contains(".pool"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&b).unwrap().count(), 2, "only the pools");
        LinkEnds::open(&config(4 << 20)).unwrap();
    }

    #[test]
    fn refusals_are_logged_in_a_burst_then_one_a_second_counting_those_left_out() {
        let log = RefusalLog::default();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let (a, t0) = (ip("192.0.2.7"), std::time::Instant::now());
        for _ in 0..REFUSAL_BURST {
            assert_eq!(log.admit_at(a, t0), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(log.admit_at(a, t0), None);
        }
        // Another source has a budget of its own.
        assert_eq!(log.admit_at(ip("192.0.2.8"), t0), Some(0));
        assert_eq!(log.admit_at(a, t0 + REFUSAL_EVERY / 2), None);
        // A second on: one line, which counts the 101 left out.
        assert_eq!(log.admit_at(a, t0 + REFUSAL_EVERY), Some(101));
        assert_eq!(log.admit_at(a, t0 + REFUSAL_EVERY), None);
        // After a long quiet, a whole burst again (no more than that).
        let later = t0 + REFUSAL_EVERY * 1000;
        assert_eq!(log.admit_at(a, later), Some(1));
        for _ in 1..REFUSAL_BURST {
            assert_eq!(log.admit_at(a, later), Some(0));
        }
        assert_eq!(log.admit_at(a, later), None);
    }

    #[test]
    fn refusal_budgets_past_the_sources_tracked_are_shared_until_old_ones_are_forgotten() {
        let log = RefusalLog::default();
        let t0 = std::time::Instant::now();
        let nth = |i: usize| std::net::IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
        for i in 0..REFUSAL_SOURCES {
            assert_eq!(log.admit_at(nth(i), t0), Some(0));
        }
        // Every tracked source was refused just now: the next ones share one budget.
        let late = |i: usize, t| log.admit_at(nth(REFUSAL_SOURCES + i), t);
        for i in 0..REFUSAL_BURST as usize {
            assert_eq!(late(i, t0), Some(0));
        }
        assert_eq!(late(REFUSAL_BURST as usize, t0), None);
        assert!(lock(&log.by_source).len() <= REFUSAL_SOURCES + 1);
        // Once their budgets are whole again, the quiet sources are forgotten and a new one
        // has its own.
        let then = t0 + REFUSAL_EVERY * (REFUSAL_BURST + 1);
        assert_eq!(late(REFUSAL_BURST as usize + 1, then), Some(0));
        assert!(lock(&log.by_source).len() < 10);
    }

    #[test]
    fn unwelcomed_connections_are_counted_per_ipv4_address_or_ipv6_64() {
        let counts = Arc::new(UnwelcomedCounts::default());
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let a: Vec<_> = (0..2)
            .map(|_| Unwelcomed::take(&counts, ip("192.0.2.7"), 2).unwrap())
            .collect();
        assert!(Unwelcomed::take(&counts, ip("192.0.2.7"), 2).is_none());
        // The same host mapped into IPv6 is the same source; another address is not.
        assert!(Unwelcomed::take(&counts, ip("::ffff:192.0.2.7"), 2).is_none());
        let b = Unwelcomed::take(&counts, ip("192.0.2.8"), 2).unwrap();
        // Two addresses of one IPv6 /64 are one source; the next /64 another.
        let c: Vec<_> = ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9"]
            .iter()
            .map(|s| Unwelcomed::take(&counts, ip(s), 2).unwrap())
            .collect();
        assert!(Unwelcomed::take(&counts, ip("2001:db8:1:2::77"), 2).is_none());
        assert!(Unwelcomed::take(&counts, ip("2001:db8:1:3::1"), 2).is_some());
        // A connection welcomed or closed gives its place back; none are left counted.
        drop(a);
        let again = Unwelcomed::take(&counts, ip("192.0.2.7"), 2).unwrap();
        drop((again, b, c));
        assert!(lock(&counts.by_source).is_empty());
    }

    /// The key of the share `server_with_share` holds in these tests.
    const SHARE_K: WireKey = WireKey {
        file: [3; 16],
        chunk: 1,
        share: 0,
    };

    /// A server over an in-memory volume holding one share of `len` bytes under key `k`,
    /// with `inflight` bytes allowed in flight.
    fn server_with_share(
        dir: &Path,
        inflight: u64,
        k: &WireKey,
        len: usize,
    ) -> Arc<Server<crate::volume::MemVolume>> {
        use crate::store::{FormatOptions, StoreOptions};
        use crate::volume::{Alignment, MemVolume};
        let v = MemVolume::new("mem-vol", 64 << 20, Alignment::new(512, 512).unwrap());
        Store::format(&v, "site-a", &FormatOptions::default()).unwrap();
        let store = Store::open(v, dir, StoreOptions::default()).unwrap();
        let meta = ShareMeta {
            k: 2,
            n: 3,
            secret_len: len as u64,
        };
        store.put(to_key(k), meta, &vec![7u8; len]).unwrap();
        let limits = ServerLimits {
            max_connections: 4,
            max_unwelcomed_per_address: 4,
            max_inflight_bytes: inflight,
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            max_share_len: msg::MAX_DATA as u64,
        };
        Arc::new(Server::new(store, Vec::new(), limits))
    }

    #[tokio::test]
    async fn a_get_reply_holds_in_flight_bytes_for_its_share_not_its_request() {
        let dir = tempfile::tempdir().unwrap();
        let k = SHARE_K;
        let srv = server_with_share(dir.path(), 64 << 20, &k, 3 << 20);
        let all = srv.memory.available_permits();
        let mut permit = Some(srv.reserve(100).await);
        let r = srv.get_awaited(9, &k, &mut permit, "test", "unix").await;
        assert_eq!(r.share.as_ref().unwrap().bytes(), &vec![7u8; 3 << 20][..]);
        let held = all - srv.memory.available_permits();
        assert_eq!(held, permit.as_ref().unwrap().num_permits());
        assert!(
            held as u64 * KIB >= 3 << 20,
            "{held} KiB held for a 3 MiB reply"
        );
        drop((r, permit));
        assert_eq!(srv.memory.available_permits(), all);

        // A share larger than everything allowed in flight is served (alone), not stuck.
        let dir = tempfile::tempdir().unwrap();
        let srv = server_with_share(dir.path(), 1 << 20, &k, 3 << 20);
        let mut permit = Some(srv.reserve(100).await);
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            srv.get_awaited(9, &k, &mut permit, "test", "unix"),
        )
        .await
        .expect("a GET above the in-flight limit waited forever");
        assert!(r.share.is_some());
        assert_eq!(srv.memory.available_permits(), 0);
    }

    /// On a current-thread runtime a request's blocking work goes to a blocking thread
    /// (`run_blocking`; the daemon's multi-thread runtime runs it in place, which a
    /// current-thread runtime cannot): a put and a delete (blocking work) and gets, over the
    /// Unix socket.
    #[tokio::test]
    async fn requests_are_served_on_a_current_thread_runtime() {
        use qgenome::sites::{MountdSite, ShareSite};
        let dir = tempfile::tempdir().unwrap();
        let k = SHARE_K;
        let srv = server_with_share(dir.path(), 64 << 20, &k, 1000);
        let sock = dir.path().join("site.sock");
        let listeners = Listeners {
            unix: Some((bind_unix(&sock).unwrap(), sock.clone())),
            tcp: None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(srv.run(listeners, async {
            let _ = stop_rx.await;
        }));
        tokio::task::spawn_blocking(move || {
            let site = MountdSite::unix("site-a", &sock);
            let k2 = WireKey { chunk: 2, ..k };
            let meta = WireMeta {
                k: 2,
                n: 3,
                secret_len: 5000,
            };
            site.put(&k2, &meta, &[9u8; 5000]).unwrap();
            assert_eq!(site.get(&k2).unwrap(), vec![9u8; 5000]);
            assert_eq!(site.get(&k).unwrap(), vec![7u8; 1000]);
            site.delete(&k2).unwrap();
            assert!(site.get(&k2).is_err());
        })
        .await
        .unwrap();
        stop_tx.send(()).unwrap();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn accepted_tcp_connections_get_keepalive() {
        use nix::sys::socket::{getsockopt, sockopt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(!getsockopt(&s, sockopt::KeepAlive).unwrap());
        set_keepalive(&s).unwrap();
        assert!(getsockopt(&s, sockopt::KeepAlive).unwrap());
        assert_eq!(
            getsockopt(&s, sockopt::TcpKeepIdle).unwrap(),
            KEEPALIVE_IDLE_SECS
        );
        assert_eq!(
            getsockopt(&s, sockopt::TcpKeepInterval).unwrap(),
            KEEPALIVE_INTERVAL_SECS
        );
        assert_eq!(
            getsockopt(&s, sockopt::TcpKeepCount).unwrap(),
            KEEPALIVE_PROBES
        );
    }
}
