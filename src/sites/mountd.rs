//! [`MountdSite`]: a [`ShareSite`] served by a `qgenome-mountd`, over its Unix socket (the home
//! site, plain frames) or over TCP with every frame sealed by the link's key streams.
//!
//! Blocking std sockets; a small pool of idle connections (one request at a time on each, so
//! concurrent callers use several). A failed connection is dropped and the call retried once
//! on a fresh one; if that fails too the error is `Unreachable` naming the site and address.
//! Key handling (see `docs/design.md` ("mountd"), "Share protocol"): the HELLO carries where our
//! receive stream's unused key starts, so the server never answers with key we count as
//! consumed; the site's floor notice (a `KeyAlreadyUsed` answer, the same bytes for every
//! stale frame) answering our HELLO (the server restarted) makes us skip our send stream to
//! the server's floor and say HELLO again. Key is never reused: skipping only moves forward.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{ShareKey, ShareMeta, ShareSite, SiteError};
use crate::keys::{pool, Direction, End, PoolFile};
use crate::link::{LinkError, RecvStream, SealWriteError, SendStream, StreamOptions};
use crate::wire::frame::{FrameHeader, HEADER_LEN, KEY_BLOCK, TAG_LEN};
use crate::wire::msg::{self, Body, ErrorCode, ListEntry, Msg, SiteStat};

/// Send buffer asked for on both ends of the home site's Unix socket: room for a whole share
/// message (1 MiB and its head), so that a writer hands a share over without sleeping until
/// the reader has drained the default ~208 KiB. Measured in session 9 (docs/benchmarks.md,
/// five alternating rounds of `qgenome bench e2e --size 1G`): store +1.6%, restore +2.2%,
/// each ahead in four rounds of five. The kernel caps it at `net.core.wmem_max`; it is only
/// advice.
pub const UNIX_SEND_BUFFER: usize = 2 << 20;

/// Ask for [`UNIX_SEND_BUFFER`] on a Unix socket; a refusal (or a lower cap) only costs speed.
pub fn size_unix_socket(s: &impl std::os::fd::AsFd) {
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &UNIX_SEND_BUFFER);
}

/// Where this end's key for a link lives.
#[derive(Debug, Clone)]
pub struct LinkKeys {
    /// Directory with this end's pools and ledgers (from `qgenome keys provision`).
    pub dir: PathBuf,
    pub link: String,
    /// The end this site holds.
    pub end: End,
    /// Must match the server's `window` for the link.
    pub options: StreamOptions,
}

struct ClientLink {
    name: String,
    send: Mutex<SendStream>,
    recv: Mutex<RecvStream>,
    send_id: [u8; 16],
    recv_id: [u8; 16],
    recv_key_len: u64,
    window: u64,
    /// A reply of the site opened (its tag verified) since this process opened the link: from
    /// then on the site knows our receive floor, so a reply below it cannot be genuine.
    heard: std::sync::atomic::AtomicBool,
    /// The one skip a reply below our floor may cause (both ends restarted) was taken.
    floor_skipped: std::sync::atomic::AtomicBool,
    /// The receive stream's key left, as of its last open: read on every request's way out
    /// without taking the stream, which a reply's check holds while it verifies a share.
    recv_left: AtomicU64,
    /// The site's floor notices opened last, newest at the back, at most [`NOTICES_KEPT`]:
    /// their resent copies cannot be opened again (their key is used), so they are known by
    /// header and tag. More than one: a connection's copy of a notice may come after a site
    /// restarted again and its next process's notice was opened.
    notices: Mutex<std::collections::VecDeque<FloorNotice>>,
}

/// How many of a site's floor notices the home knows copies of.
const NOTICES_KEPT: usize = 4;

/// A floor notice of the site that was opened (its tag verified): the answer it resends, as
/// is, to every stale frame of the link (`qgenome-mountd`'s `floor_notice`).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FloorNotice {
    header: [u8; HEADER_LEN],
    tag: [u8; TAG_LEN],
    floor: u64,
}

impl ClientLink {
    /// Where the site's unused key starts, if `header` and `tag` are those of the floor
    /// notice opened before. A copy whose ciphertext was altered is taken for the notice
    /// too, harmlessly: only the floor the genuine one said is acted on.
    fn known_notice(&self, header: &[u8; HEADER_LEN], tag: &[u8; TAG_LEN]) -> Option<u64> {
        lock(&self.notices)
            .iter()
            .find(|n| n.header == *header && n.tag == *tag)
            .map(|n| n.floor)
    }

    /// Keep `notice`, opened just now (with the receive stream still held).
    fn keep_notice(&self, notice: FloorNotice) {
        let mut kept = lock(&self.notices);
        if kept.len() == NOTICES_KEPT {
            kept.pop_front();
        }
        kept.push_back(notice);
    }
}

impl ClientLink {
    /// Open a reply with the receive stream, keeping [`ClientLink::recv_left`] current.
    fn open<T>(
        &self,
        f: impl FnOnce(&mut RecvStream) -> Result<T, LinkError>,
    ) -> Result<T, LinkError> {
        let mut rx = lock(&self.recv);
        let r = f(&mut rx);
        self.recv_left.store(rx.remaining(), Ordering::SeqCst);
        r
    }
}

enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// A connection to the site, whose reads and writes for one request end by that request's
/// deadline: the socket's own timeouts bound each system call only, so a site (or someone on
/// the path) answering a byte at a time held a FUSE read or an upload worker for as long as
/// it kept dripping.
struct Sock {
    s: Stream,
    /// When the request under way must be done by.
    deadline: Option<Instant>,
    /// The read and write timeout the socket has now.
    timeout: Duration,
    /// The timeout a request starts with ([`MountdSite::timeout`]).
    full: Duration,
}

impl Sock {
    fn new(s: Stream, timeout: Duration) -> std::io::Result<Self> {
        let mut sock = Self {
            s,
            deadline: None,
            timeout: Duration::ZERO,
            full: timeout,
        };
        sock.set_timeout(timeout)?;
        Ok(sock)
    }

    fn set_timeout(&mut self, t: Duration) -> std::io::Result<()> {
        let t = t.max(Duration::from_millis(1));
        match &self.s {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
            }
        }
        self.timeout = t;
        Ok(())
    }

    /// A request starts: all of its reads and writes must be done within the full timeout.
    fn start_request(&mut self) -> std::io::Result<()> {
        self.deadline = Some(Instant::now() + self.full);
        if self.timeout != self.full {
            self.set_timeout(self.full)?;
        }
        Ok(())
    }

    /// The request carries `bytes` more (a share sent or announced): its deadline moves on by
    /// the time they take at [`crate::wire::SLOWEST_LINK`].
    fn allow_bytes(&mut self, bytes: usize) {
        if let Some(d) = &mut self.deadline {
            *d += crate::wire::slowest_transfer(bytes as u64);
        }
    }

    /// Before a system call: fail once the deadline has passed; else bound the call by what
    /// is left of it, the socket's timeout lowered only when it exceeds twice that (a request
    /// may so take up to twice its timeout, for a dozen `setsockopt`s at most, not one per
    /// read of a share).
    fn before_call(&mut self) -> std::io::Result<()> {
        let Some(d) = self.deadline else {
            return Ok(());
        };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no whole answer within {:?}", self.full),
            ));
        }
        if self.timeout > left * 2 {
            self.set_timeout(left)?;
        }
        Ok(())
    }

    /// Whether the site may still be there: the connection is neither closed nor holding
    /// bytes no request asked for. Asked without blocking.
    fn is_live(&self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let fd = match &self.s {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        };
        let mut b = [0u8; 1];
        matches!(
            recv(fd, &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
            Err(nix::errno::Errno::EAGAIN)
        )
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.before_call()?;
        match &mut self.s {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
    fn read_vectored(&mut self, b: &mut [std::io::IoSliceMut<'_>]) -> std::io::Result<usize> {
        self.before_call()?;
        match &mut self.s {
            Stream::Unix(s) => s.read_vectored(b),
            Stream::Tcp(s) => s.read_vectored(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.before_call()?;
        match &mut self.s {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn write_vectored(&mut self, b: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.before_call()?;
        match &mut self.s {
            Stream::Unix(s) => s.write_vectored(b),
            Stream::Tcp(s) => s.write_vectored(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.s {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// One connection and its reusable buffers, one per role, so that none changes size from
/// one request to the next (growing a `Vec` again would memset it).
#[derive(Default)]
struct Bufs {
    /// The request's encoding without its share bytes.
    head: Vec<u8>,
    /// The sealed request.
    frame: Vec<u8>,
    /// The reply as read (sealed frame).
    reply: Vec<u8>,
    /// The reply's plaintext message.
    plain: Vec<u8>,
}

struct Conn {
    sock: Sock,
    b: Bufs,
}

/// Write all of `parts` in as few system calls as the socket takes.
fn write_all_parts(w: &mut impl Write, parts: &mut [std::io::IoSlice<'_>]) -> std::io::Result<()> {
    let mut parts = parts;
    std::io::IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        match w.write_vectored(parts) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fill all of `parts` (a reply's head, then its share) with vectored reads.
fn read_exact_parts(
    r: &mut impl Read,
    parts: &mut [std::io::IoSliceMut<'_>],
) -> std::io::Result<()> {
    let mut parts = parts;
    std::io::IoSliceMut::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        match r.read_vectored(parts) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => std::io::IoSliceMut::advance_slices(&mut parts, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why one exchange failed.
enum CallError {
    /// The connection broke: retry on a fresh one, then report Unreachable.
    Io(std::io::Error),
    /// The server counts our frame's key as used; its unused key starts here.
    KeyAlreadyUsed(u64),
    /// The server's reply used key our receive stream counts as consumed (both ends
    /// restarted): the server never saw our floor.
    ReplyBelowFloor,
    /// A definite answer or failure: no retry.
    Site(SiteError),
}

/// A `qgenome-mountd` reached over its Unix socket or a sealed TCP link.
pub struct MountdSite {
    name: String,
    addr: Addr,
    link: Option<ClientLink>,
    idle: Mutex<Vec<Conn>>,
    pool_size: usize,
    next_id: AtomicU64,
    timeout: Duration,
    connect_timeout: Duration,
    /// Connections being opened (HELLO not yet answered), at most [`CONNECTS_AT_ONCE`].
    connecting: (Mutex<usize>, std::sync::Condvar),
}

/// Connections a client opens to one site at once. A site closes, as it accepts them, the
/// connections from one address past `limits.max_unwelcomed_per_address` still without an
/// answered HELLO; a home that dialled for every request finding the pool empty at once (a
/// scatter step's closes after a quiet spell: manifests, uploads, read-ahead, FUSE loops,
/// some thirty) would have met that cap. Each waits one round trip.
const CONNECTS_AT_ONCE: usize = 4;

/// How often a connection the site closed before answering its HELLO (it was past the site's
/// cap of unwelcomed connections, or the site was restarting) is opened again before the
/// site counts as unreachable, and the first pause before that (doubled each time).
const REFUSED_HELLO_RETRIES: u32 = 3;
const REFUSED_HELLO_PAUSE: Duration = Duration::from_millis(25);

/// A connection closed (or reset) by the site before any answer.
fn closed_unanswered(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe)
}

/// One of the [`CONNECTS_AT_ONCE`] places to open a connection, held until dropped.
struct Connecting<'a>(&'a (Mutex<usize>, std::sync::Condvar));

impl<'a> Connecting<'a> {
    fn take(c: &'a (Mutex<usize>, std::sync::Condvar)) -> Self {
        let mut n = lock(&c.0);
        while *n >= CONNECTS_AT_ONCE {
            n = c.1.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Self(c)
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        *lock(&self.0 .0) -= 1;
        self.0 .1.notify_one();
    }
}

/// How long a TCP connection to a site may take to open. Without a limit a host that is off
/// (SYNs unanswered) costs the kernel's two minutes of retries for every attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect to `addr` (`host:port`), trying each address it resolves to for `timeout`.
fn connect_tcp(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        )
    }))
}

impl std::fmt::Debug for MountdSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountdSite")
            .field("name", &self.name)
            .field("addr", &self.addr.to_string())
            .field("link", &self.link.as_ref().map(|l| &l.name))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directions of a link as seen from `end`: (the one it sends on, the one it receives on).
fn directions(end: End) -> (Direction, Direction) {
    match end {
        End::A => (Direction::AtoB, Direction::BtoA),
        End::B => (Direction::BtoA, Direction::AtoB),
    }
}

impl MountdSite {
    /// The home site's own mountd on its Unix socket (no pad: the socket is mode 0600).
    pub fn unix(site: &str, socket: impl Into<PathBuf>) -> Self {
        Self::with_addr(site, Addr::Unix(socket.into()), None)
    }

    /// A remote mountd at `addr` ("host:port"), every frame sealed with the key of `keys`.
    /// Opens (and locks) both stream ends of the link in `keys.dir`.
    pub fn tcp(site: &str, addr: &str, keys: &LinkKeys) -> Result<Self, SiteError> {
        // Out of key only when the stream says so; a missing pool, a wrong directory, a pool in
        // use or a bad header is a link that cannot be opened, and says which file.
        let link_err = |e: LinkError| match e {
            LinkError::Exhausted { .. } => SiteError::KeyExhausted {
                site: site.to_string(),
                link: keys.link.clone(),
                reason: e.to_string(),
            },
            e => SiteError::Link {
                site: site.to_string(),
                link: keys.link.clone(),
                reason: e.to_string(),
            },
        };
        let (tx, rx) = directions(keys.end);
        let info = |d| {
            PoolFile::read_header(&pool::pool_path(&keys.dir, &keys.link, d), &keys.link)
                .map_err(|e| link_err(e.into()))
        };
        let (ti, ri) = (info(tx)?, info(rx)?);
        for (d, i) in [(tx, &ti), (rx, &ri)] {
            let pool = pool::pool_path(&keys.dir, &keys.link, d);
            crate::link::stream::check_window(&keys.link, &pool, i.key_len, keys.options.window)
                .map_err(link_err)?;
        }
        let send = SendStream::from_dir(&keys.dir, &keys.link, tx, keys.options.clone())
            .map_err(link_err)?;
        let recv = RecvStream::from_dir(&keys.dir, &keys.link, rx, keys.options.clone())
            .map_err(link_err)?;
        let recv_left = AtomicU64::new(recv.remaining());
        let link = ClientLink {
            name: keys.link.clone(),
            send: Mutex::new(send),
            recv: Mutex::new(recv),
            send_id: ti.stream_id,
            recv_id: ri.stream_id,
            recv_key_len: ri.key_len,
            window: keys.options.window,
            heard: Default::default(),
            floor_skipped: Default::default(),
            notices: Mutex::default(),
            recv_left,
        };
        Ok(Self::with_addr(
            site,
            Addr::Tcp(addr.to_string()),
            Some(link),
        ))
    }

    fn with_addr(site: &str, addr: Addr, link: Option<ClientLink>) -> Self {
        Self {
            name: site.to_string(),
            addr,
            link,
            idle: Mutex::new(Vec::new()),
            pool_size: 8,
            next_id: AtomicU64::new(first_request_id()),
            timeout: Duration::from_secs(60),
            connect_timeout: CONNECT_TIMEOUT,
            connecting: Default::default(),
        }
    }

    /// How long one request (its writes and the whole answer) may take (default 60 s; up to
    /// twice this when the site answers slowly to the end).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// How long opening a TCP connection may take (default 5 s).
    pub fn set_connect_timeout(&mut self, t: Duration) {
        self.connect_timeout = t;
    }

    /// Idle connections kept for reuse (default 8).
    pub fn set_pool_size(&mut self, n: usize) {
        self.pool_size = n;
    }

    /// One page of the site's shares whose file id starts with `prefix` (≤ 16 bytes), after
    /// `after`; returns the entries and where the next page starts (None: no more).
    pub fn list(
        &self,
        prefix: &[u8],
        after: Option<ShareKey>,
        limit: u32,
    ) -> Result<(Vec<ListEntry>, Option<ShareKey>), SiteError> {
        let body = Body::List {
            prefix: prefix.to_vec(),
            after,
            limit: limit.clamp(1, msg::MAX_LIST),
        };
        self.call(&body, |b| match b {
            Body::Listed { entries, next } => Ok((entries, next)),
            other => Err(self.unexpected(&other)),
        })
    }

    /// A page of the shares whose file id starts with `prefix`, as [`ShareSite`] lists them.
    fn share_page(
        &self,
        prefix: &[u8],
        after: Option<ShareKey>,
    ) -> Result<super::SharePage, SiteError> {
        let (entries, next) = self.list(prefix, after, msg::MAX_LIST)?;
        Ok((entries.into_iter().map(|e| (e.key, e.meta)).collect(), next))
    }

    /// Capacity, free space, share count, health and key left per link of the site.
    pub fn stat(&self) -> Result<SiteStat, SiteError> {
        self.call(&Body::Stat, |b| match b {
            Body::Stats(s) => Ok(s),
            other => Err(self.unexpected(&other)),
        })
    }

    fn unexpected(&self, b: &Body<'_>) -> SiteError {
        SiteError::Protocol {
            site: self.name.clone(),
            reason: format!("unexpected {} reply from {}", b.name(), self.addr),
        }
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> SiteError {
        SiteError::Unreachable {
            site: self.name.clone(),
            reason: format!("{}: {reason}", self.addr),
        }
    }

    fn link_error(&self, e: LinkError) -> SiteError {
        let link = self.link.as_ref().map_or("?", |l| &l.name).to_string();
        match e {
            LinkError::Exhausted { .. } => SiteError::KeyExhausted {
                site: self.name.clone(),
                link,
                reason: e.to_string(),
            },
            other => SiteError::Protocol {
                site: self.name.clone(),
                reason: other.to_string(),
            },
        }
    }

    /// Send one request and turn its reply into `T` (error replies become `SiteError`s).
    fn call<T>(
        &self,
        body: &Body<'_>,
        f: impl Fn(Body<'_>) -> Result<T, SiteError>,
    ) -> Result<T, SiteError> {
        self.call_into(body, None, f)
    }

    /// [`call`](Self::call) whose DATA reply's share lands in `tail` (see `exchange`); `f` then
    /// sees that share as the DATA's bytes.
    fn call_into<T>(
        &self,
        body: &Body<'_>,
        mut tail: Option<&mut Vec<u8>>,
        f: impl Fn(Body<'_>) -> Result<T, SiteError>,
    ) -> Result<T, SiteError> {
        let mut last = String::new();
        for attempt in 0..2 {
            // Taken in a statement of its own: a guard in the `match` below would be held
            // through `connect`, making every caller wait for one connection's HELLO.
            let idle = self.live_idle();
            let (mut conn, reused) = match idle {
                Some(c) => (c, true),
                None => (self.connect()?, false),
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            match self.exchange(&mut conn, id, body, tail.as_deref_mut()) {
                Ok(split) => {
                    let decoded = match tail.as_deref() {
                        Some(t) if split => msg::decode_split(&conn.b.plain, t),
                        _ => msg::decode(&conn.b.plain),
                    };
                    let r = match decoded {
                        // A DATA reply for a caller that gave a buffer is always read into it.
                        Ok(Msg {
                            body: Body::Data { .. },
                            ..
                        }) if tail.is_some() && !split => Err(SiteError::Protocol {
                            site: self.name.clone(),
                            reason: format!("DATA reply from {} out of its layout", self.addr),
                        }),
                        // Id 0: an error answering a request whose id the site could not read.
                        Ok(m)
                            if m.id == id
                                || (m.id == 0 && matches!(m.body, Body::Error { .. })) =>
                        {
                            self.reply(m.body, request_key(body), &f)
                        }
                        Ok(m) => Err(SiteError::Protocol {
                            site: self.name.clone(),
                            reason: format!("reply id {} for request {id}", m.id),
                        }),
                        Err(e) => Err(SiteError::Protocol {
                            site: self.name.clone(),
                            reason: format!("malformed reply from {}: {e}", self.addr),
                        }),
                    };
                    let mut idle = lock(&self.idle);
                    if idle.len() < self.pool_size {
                        idle.push(conn);
                    }
                    return r;
                }
                Err(CallError::KeyAlreadyUsed(floor)) => {
                    // A floor notice answers only a stale frame, and on a connection whose
                    // HELLO was welcomed our frames are not stale (the site skipped to our
                    // floor, and we never reuse key): this copy is someone else's, injected
                    // here. Not acted on: no key skipped, and no retry of a request the site
                    // may have done.
                    return Err(SiteError::Protocol {
                        site: self.name.clone(),
                        reason: format!(
                            "{}: the site's floor notice (key used up to {floor}) as the answer to a request after its HELLO was welcomed: not for ours, not acted on",
                            self.addr
                        ),
                    });
                }
                Err(CallError::Io(e)) if attempt == 0 || reused => {
                    // A broken idle connection usually means the server restarted: its
                    // siblings in the pool are dead too, so the retry must dial afresh.
                    if reused {
                        lock(&self.idle).clear();
                    }
                    last = e.to_string();
                }
                Err(CallError::Io(e)) => return Err(self.unreachable(e)),
                Err(CallError::ReplyBelowFloor) => {
                    return Err(SiteError::Protocol {
                        site: self.name.clone(),
                        reason: format!("{} answered with key we already used", self.addr),
                    })
                }
                Err(CallError::Site(e)) => return Err(e),
            }
        }
        Err(self.unreachable(last))
    }

    fn reply<T>(
        &self,
        body: Body<'_>,
        key: Option<ShareKey>,
        f: &impl Fn(Body<'_>) -> Result<T, SiteError>,
    ) -> Result<T, SiteError> {
        match body {
            Body::Error { code, message, .. } => Err(self.error_reply(code, message, key)),
            b => f(b),
        }
    }

    fn error_reply(&self, code: ErrorCode, message: String, key: Option<ShareKey>) -> SiteError {
        let site = self.name.clone();
        match (code, key) {
            (ErrorCode::NotFound, Some(key)) => return SiteError::NotFound { site, key },
            (ErrorCode::Damaged, Some(key)) => {
                return SiteError::Damaged {
                    site,
                    key,
                    reason: message,
                }
            }
            _ => {}
        }
        match code {
            ErrorCode::VolumeFull => SiteError::Full {
                site,
                reason: message,
            },
            ErrorCode::KeyExhausted => SiteError::KeyExhausted {
                site,
                link: self.link.as_ref().map_or("?", |l| &l.name).to_string(),
                reason: message,
            },
            ErrorCode::ShuttingDown => SiteError::Unreachable {
                site,
                reason: format!("{}: {message}", self.addr),
            },
            _ => SiteError::Protocol {
                site,
                reason: message,
            },
        }
    }

    /// An idle connection the site has not closed meanwhile, if the pool has one. The site
    /// closes connections idle past its `idle_timeout_secs` (and after some answers): a dead
    /// one taken blindly cost a whole sealed request's key (up to a share's worth) before its
    /// failure showed, on every quiet spell, for each upload worker.
    fn live_idle(&self) -> Option<Conn> {
        loop {
            let c = lock(&self.idle).pop()?;
            if c.sock.is_live() {
                return Some(c);
            }
        }
    }

    fn skip_send(&self, until: u64) -> Result<(), SiteError> {
        let Some(l) = &self.link else {
            return Ok(());
        };
        let mut tx = lock(&l.send);
        if until > tx.next_offset() {
            tx.skip_to(until).map_err(|e| self.link_error(e))?;
        }
        Ok(())
    }

    fn connect(&self) -> Result<Conn, SiteError> {
        let _place = Connecting::take(&self.connecting);
        let open = || -> std::io::Result<Sock> {
            Ok(match &self.addr {
                Addr::Unix(p) => {
                    let s = UnixStream::connect(p)?;
                    size_unix_socket(&s);
                    Sock::new(Stream::Unix(s), self.timeout)?
                }
                Addr::Tcp(a) => {
                    let s = connect_tcp(a, self.connect_timeout)?;
                    s.set_nodelay(true)?;
                    Sock::new(Stream::Tcp(s), self.timeout)?
                }
            })
        };
        let Some(link) = &self.link else {
            let sock = open().map_err(|e| self.unreachable(e))?;
            return Ok(Conn {
                sock,
                b: Bufs::default(),
            });
        };
        // HELLO; after a restart of the server (or of both ends) skip forward and retry; a
        // connection closed unanswered is opened again after a pause.
        let mut refused = 0;
        let mut pause = REFUSED_HELLO_PAUSE;
        let mut skips = 0;
        while skips < 3 {
            let sock = open().map_err(|e| self.unreachable(e))?;
            let mut conn = Conn {
                sock,
                b: Bufs::default(),
            };
            let floor = link.recv_key_len - lock(&link.recv).remaining();
            let hello = Body::Hello {
                link: link.name.clone(),
                c2s_stream: link.send_id,
                s2c_stream: link.recv_id,
                client_recv_floor: floor,
            };
            match self.exchange(&mut conn, 0, &hello, None) {
                Ok(_) => {
                    return match msg::decode(&conn.b.plain) {
                        Ok(Msg {
                            body: Body::Welcome { .. },
                            ..
                        }) => Ok(conn),
                        Ok(Msg {
                            body: Body::Error { code, message, .. },
                            ..
                        }) => Err(self.error_reply(code, message, None)),
                        Ok(m) => Err(self.unexpected(&m.body)),
                        Err(e) => Err(SiteError::Protocol {
                            site: self.name.clone(),
                            reason: format!("malformed HELLO reply from {}: {e}", self.addr),
                        }),
                    };
                }
                Err(CallError::KeyAlreadyUsed(until)) => {
                    skips += 1;
                    self.skip_send(until)?
                }
                Err(CallError::Io(e))
                    if closed_unanswered(&e) && refused < REFUSED_HELLO_RETRIES =>
                {
                    refused += 1;
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                Err(CallError::ReplyBelowFloor) => {
                    skips += 1;
                    // The server restarted and cannot read our HELLO, and its reply uses key
                    // below our own restart floor: skip one window, which lies above any
                    // floor the server can have (it is below our last frame + one window).
                    // Such a reply cannot be opened, so it may be anyone's: it is acted on
                    // only where it can be genuine, before any reply of the site opened since
                    // we started (after one, the site knows our floor), and once.
                    if link.heard.load(Ordering::SeqCst) {
                        return Err(SiteError::Protocol {
                            site: self.name.clone(),
                            reason: format!(
                                "{}: a reply on link {} below our receive floor, which the site cannot send once it knows that floor: not acted on (no key skipped)",
                                self.addr, link.name
                            ),
                        });
                    }
                    // Connections opened together after both restarts all get such a reply;
                    // the first skips, the others only try again (their next HELLO goes
                    // out past that skip), at a key block each.
                    if !link.floor_skipped.swap(true, Ordering::SeqCst) {
                        let next = lock(&link.send).next_offset();
                        self.skip_send(next.saturating_add(link.window))?;
                    }
                }
                Err(CallError::Io(e)) => return Err(self.unreachable(e)),
                Err(CallError::Site(e)) => return Err(e),
            }
        }
        Err(SiteError::Protocol {
            site: self.name.clone(),
            reason: format!("{}: HELLO refused after skipping forward", self.addr),
        })
    }

    /// The home's receive stream must hold at least one key block, the least any answer of
    /// the site takes: else the request is not sent at all (the site would do it and could
    /// not say so), and the link's key is named as what ran out.
    fn reply_key_check(&self, link: &ClientLink) -> Result<(), SiteError> {
        let left = link.recv_left.load(Ordering::SeqCst);
        if left < KEY_BLOCK {
            return Err(SiteError::KeyExhausted {
                site: self.name.clone(),
                link: link.name.clone(),
                reason: format!(
                    "{left} bytes left of the key for the site's answers, less than the {KEY_BLOCK} one answer takes: provision new key for this direction"
                ),
            });
        }
        Ok(())
    }

    /// Write one request and read its reply into `conn.b.plain` (decoded by the caller).
    /// With `tail`, a reply of at least [`msg::DATA_HEAD_LEN`] bytes has its first
    /// `DATA_HEAD_LEN` in `conn.b.plain` and the rest in `tail` (a DATA reply's share lands in
    /// the caller's buffer, uncopied); returns whether that is how the reply was left (a reply
    /// that is no DATA is put back together in `conn.b.plain`).
    fn exchange(
        &self,
        conn: &mut Conn,
        id: u64,
        body: &Body<'_>,
        mut tail_out: Option<&mut Vec<u8>>,
    ) -> Result<bool, CallError> {
        let io = CallError::Io;
        conn.sock.start_request().map_err(io)?;
        let m = Msg {
            id,
            body: body.clone(),
        };
        let b = &mut conn.b;
        b.head.clear();
        // The share bytes (PUT) go out from the caller's buffer, never copied behind the head.
        let tail = m.encode_head(&mut b.head);
        conn.sock.allow_bytes(tail.len());
        match &self.link {
            None => {
                let len = ((b.head.len() + tail.len()) as u32).to_le_bytes();
                write_all_parts(
                    &mut conn.sock,
                    &mut [
                        std::io::IoSlice::new(&len),
                        std::io::IoSlice::new(&b.head),
                        std::io::IoSlice::new(tail),
                    ],
                )
                .map_err(io)?;
                let mut p = [0u8; msg::PLAIN_PREFIX];
                conn.sock.read_exact(&mut p).map_err(io)?;
                let n = msg::plain_len(p).map_err(|e| {
                    CallError::Site(SiteError::Protocol {
                        site: self.name.clone(),
                        reason: format!("reply from {}: {e}", self.addr),
                    })
                })?;
                conn.sock.allow_bytes(n);
                // Sized without clearing: all of it is overwritten by the reads.
                let split = match tail_out.as_deref_mut() {
                    Some(t) if n >= msg::DATA_HEAD_LEN => {
                        crate::resize_wiped(&mut b.plain, msg::DATA_HEAD_LEN);
                        crate::resize_wiped(t, n - msg::DATA_HEAD_LEN);
                        read_exact_parts(
                            &mut conn.sock,
                            &mut [
                                std::io::IoSliceMut::new(&mut b.plain),
                                std::io::IoSliceMut::new(t),
                            ],
                        )
                        .map_err(io)?;
                        true
                    }
                    _ => {
                        crate::resize_wiped(&mut b.plain, n);
                        conn.sock.read_exact(&mut b.plain).map_err(io)?;
                        false
                    }
                };
                Ok(rejoin(&mut b.plain, tail_out, split))
            }
            Some(link) => {
                self.reply_key_check(link).map_err(CallError::Site)?;
                if tail.is_empty() {
                    lock(&link.send)
                        .seal_parts(&[&b.head], &mut b.frame)
                        .map_err(|e| CallError::Site(self.link_error(e)))?;
                    conn.sock.write_all(&b.frame).map_err(io)?;
                } else {
                    // A share goes out as it is sealed, a tile at a time, each piece of
                    // ciphertext written while still in cache. The stream is held only to
                    // take the frame's key: the link's other connections seal and send
                    // their frames meanwhile.
                    let sock = &mut conn.sock;
                    let grant = lock(&link.send)
                        .grant(b.head.len() + tail.len())
                        .map_err(|e| CallError::Site(self.link_error(e)))?;
                    grant
                        .seal_parts_to(&[&b.head, tail], &mut b.frame, |pieces| {
                            let mut v = pieces.map(std::io::IoSlice::new);
                            write_all_parts(sock, &mut v)
                        })
                        .map_err(|e| match e {
                            SealWriteError::Link(e) => CallError::Site(self.link_error(e)),
                            SealWriteError::Write(e) => io(e),
                        })?;
                }
                let mut h = [0u8; HEADER_LEN];
                conn.sock.read_exact(&mut h).map_err(io)?;
                let hdr = FrameHeader::parse_prefix(&h, msg::MAX_MSG as u64).map_err(|e| {
                    CallError::Site(SiteError::Protocol {
                        site: self.name.clone(),
                        reason: format!("reply frame from {}: {e}", self.addr),
                    })
                })?;
                let len = hdr.payload_len as usize;
                conn.sock.allow_bytes(len);
                let mut tag = [0u8; TAG_LEN];
                let opened = match tail_out.as_deref_mut() {
                    // A DATA reply's share is read straight into the caller's buffer and
                    // opened there, in place. Sized without clearing (no memset of a reused
                    // buffer): all of it is overwritten by the read.
                    Some(t) if len >= msg::DATA_HEAD_LEN => {
                        crate::resize_wiped(&mut b.plain, msg::DATA_HEAD_LEN);
                        crate::resize_wiped(t, len - msg::DATA_HEAD_LEN);
                        read_exact_parts(
                            &mut conn.sock,
                            &mut [
                                std::io::IoSliceMut::new(&mut b.plain),
                                std::io::IoSliceMut::new(t),
                                std::io::IoSliceMut::new(&mut tag),
                            ],
                        )
                        .map_err(io)?;
                        link.open(|rx| rx.open_in_place(&h, &mut [&mut b.plain, t], &tag))
                            .map(|_| true)
                    }
                    _ => {
                        b.reply.resize(hdr.frame_len(), 0);
                        b.reply[..HEADER_LEN].copy_from_slice(&h);
                        conn.sock
                            .read_exact(&mut b.reply[HEADER_LEN..])
                            .map_err(io)?;
                        tag.copy_from_slice(&b.reply[b.reply.len() - TAG_LEN..]);
                        link.open(|rx| {
                            rx.open(&b.reply, &mut b.plain)?;
                            // Known before the stream is let go: a copy on another
                            // connection fails to open only once the stream is ours again,
                            // and must then find this notice.
                            if let Some(floor) = notice_floor(&b.plain) {
                                link.keep_notice(FloorNotice {
                                    header: h,
                                    tag,
                                    floor,
                                });
                            }
                            Ok(false)
                        })
                    }
                };
                let split = match opened {
                    Ok(split) => {
                        link.heard.store(true, Ordering::SeqCst);
                        rejoin(&mut b.plain, tail_out, split)
                    }
                    // A resent copy of the floor notice we opened before (a pool's connections
                    // all sent stale frames after the site restarted): its key is used, so
                    // it is known by its header and tag.
                    Err(LinkError::KeyAlreadyUsed { .. }) => {
                        return Err(match link.known_notice(&h, &tag) {
                            Some(floor) => CallError::KeyAlreadyUsed(floor),
                            None => CallError::ReplyBelowFloor,
                        })
                    }
                    Err(e) => return Err(CallError::Site(self.link_error(e))),
                };
                if let Ok(Msg {
                    id,
                    body:
                        Body::Error {
                            code: ErrorCode::KeyAlreadyUsed,
                            arg,
                            ..
                        },
                }) = msg::decode(&b.plain)
                {
                    // The server could not read our frame (it refused it unopened), so it
                    // answers with its floor notice, the same for every stale frame; the
                    // caller acts on it only as the answer to a HELLO.
                    if id != msg::FLOOR_NOTICE_ID {
                        return Err(CallError::Site(SiteError::Protocol {
                            site: self.name.clone(),
                            reason: format!(
                                "{}: a KeyAlreadyUsed answer with request id {id}, which is not the site's floor notice: not acted on",
                                self.addr
                            ),
                        }));
                    }
                    return Err(CallError::KeyAlreadyUsed(arg));
                }
                Ok(split)
            }
        }
    }
}

/// Where a client's request ids start: at random in 1..2^62, not at 1. A reply is tied to its
/// request by the id alone, and a reply the site sealed that a home never opened (dropped on
/// the way before the home crashed) can still be opened by the home's next process, whose
/// receive stream counts only the key below its persisted window as used: with ids from 1 in
/// every process, a recorded DONE could be injected as the answer to the new process's
/// request of the same number, a PUT acknowledged that no site stored. (Fresh ids per process
/// leave a guess of one in 2^62.)
fn first_request_id() -> u64 {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("the OS random source");
    (u64::from_le_bytes(b) >> 2).max(1)
}

/// The floor a site's notice gives, if `plain` is one. Only an ERROR is decoded here (under
/// the receive stream's lock); every other reply is decoded once, by the caller.
fn notice_floor(plain: &[u8]) -> Option<u64> {
    if !msg::is_error(plain) {
        return None;
    }
    match msg::decode(plain) {
        Ok(Msg {
            id: msg::FLOOR_NOTICE_ID,
            body:
                Body::Error {
                    code: ErrorCode::KeyAlreadyUsed,
                    arg,
                    ..
                },
        }) => Some(arg),
        _ => None,
    }
}

impl ShareSite for MountdSite {
    fn name(&self) -> &str {
        &self.name
    }

    fn put(&self, key: &ShareKey, meta: &ShareMeta, data: &[u8]) -> Result<(), SiteError> {
        let body = Body::Put {
            key: *key,
            meta: *meta,
            data,
        };
        self.call(&body, |b| match b {
            Body::Done => Ok(()),
            other => Err(self.unexpected(&other)),
        })
    }

    fn get(&self, key: &ShareKey) -> Result<Vec<u8>, SiteError> {
        let mut out = Vec::new();
        self.get_into(key, &mut out)?;
        Ok(out)
    }

    fn get_into(&self, key: &ShareKey, out: &mut Vec<u8>) -> Result<(), SiteError> {
        // The share is opened (or read, on the Unix socket) straight into `out`.
        self.call_into(&Body::Get { key: *key }, Some(out), |b| match b {
            Body::Data { .. } => Ok(()),
            other => Err(self.unexpected(&other)),
        })
    }

    fn delete(&self, key: &ShareKey) -> Result<(), SiteError> {
        let r = self.call(&Body::Delete { key: *key }, |b| match b {
            Body::Done => Ok(()),
            other => Err(self.unexpected(&other)),
        });
        match r {
            // Deleting what is not there leaves the same state (and makes retries safe).
            Err(SiteError::NotFound { .. }) => Ok(()),
            r => r,
        }
    }

    fn list_shares(&self, after: Option<ShareKey>) -> Result<super::SharePage, SiteError> {
        self.share_page(&[], after)
    }

    fn list_shares_of(
        &self,
        id: &[u8; 16],
        after: Option<ShareKey>,
    ) -> Result<super::SharePage, SiteError> {
        self.share_page(id, after)
    }

    fn key_remaining(&self) -> Option<u64> {
        self.link.as_ref().map(|l| lock(&l.send).remaining())
    }

    fn reply_key_remaining(&self) -> Option<u64> {
        self.link.as_ref().map(|l| lock(&l.recv).remaining())
    }

    fn flush_link(&self) -> Result<(), SiteError> {
        let Some(l) = &self.link else { return Ok(()) };
        lock(&l.send).flush().map_err(|e| self.link_error(e))?;
        lock(&l.recv).flush().map_err(|e| self.link_error(e))
    }

    fn space(&self) -> Option<(u64, u64)> {
        let st = self.stat().ok()?;
        Some((st.capacity, st.free))
    }

    fn usage(&self) -> Option<serde_json::Value> {
        let st = self.stat().ok()?;
        Some(serde_json::json!({
            "capacity": st.capacity, "free": st.free, "shares": st.shares,
            "health": format!("{:?}", st.health),
        }))
    }
}

/// After a reply was read split (`split`): keep it so if it decodes as DATA, else put it back
/// together in `plain`. Returns whether it stays split.
fn rejoin(plain: &mut Vec<u8>, tail: Option<&mut Vec<u8>>, split: bool) -> bool {
    match tail {
        Some(t) if split => {
            if msg::decode_split(plain, t).is_ok() {
                return true;
            }
            plain.extend_from_slice(t);
            false
        }
        _ => false,
    }
}

fn request_key(b: &Body<'_>) -> Option<ShareKey> {
    match b {
        Body::Put { key, .. } | Body::Get { key } | Body::Delete { key } => Some(*key),
        _ => None,
    }
}

/// The path of a site's Unix socket in a directory, for tests and defaults.
pub fn socket_path(dir: &Path, site: &str) -> PathBuf {
    dir.join(format!("{site}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's deadline is the timeout, plus the time its share takes at the slowest link
    /// allowed: a 1 MiB share gives 4 s more.
    #[test]
    fn a_requests_deadline_grows_with_the_bytes_it_carries() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut s = Sock::new(Stream::Unix(a), Duration::from_secs(1)).unwrap();
        let before = Instant::now();
        s.start_request().unwrap();
        s.allow_bytes(1 << 20);
        let after = Instant::now();
        // Measured from both sides of the calls, so that a test thread descheduled between
        // them does not matter.
        let deadline = s.deadline.unwrap();
        assert!(
            deadline >= before + Duration::from_secs(5)
                && deadline <= after + Duration::from_secs(5),
            "{:?} after the start",
            deadline - before
        );
    }

    /// Each client numbers its requests from a random start, so a reply recorded from one
    /// process's exchange cannot answer the request of the same number in the next.
    #[test]
    fn request_ids_start_at_random_away_from_hello_and_the_floor_notice() {
        let firsts: std::collections::BTreeSet<u64> = (0..64)
            .map(|_| {
                let s = MountdSite::with_addr("s", Addr::Unix("/nonexistent".into()), None);
                s.next_id.load(Ordering::SeqCst)
            })
            .collect();
        assert_eq!(firsts.len(), 64, "two clients started at the same id");
        assert!(firsts
            .iter()
            .all(|&i| (1..1 << 62).contains(&i) && i != msg::FLOOR_NOTICE_ID));
    }

    /// A site whose host does not answer (SYNs dropped: here a listener whose accept queue is
    /// full) costs a request the connect timeout, not the kernel's two minutes of retries;
    /// the error names the site and its address.
    #[test]
    fn a_site_that_does_not_answer_costs_the_connect_timeout() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen on a socket this test owns; a backlog of 0 queues one connection.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let addr = l.local_addr().unwrap();
        let mut held = Vec::new();
        while let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            held.push(s);
            assert!(held.len() < 64, "the accept queue never filled");
        }
        let mut site = MountdSite::with_addr("far", Addr::Tcp(addr.to_string()), None);
        site.set_connect_timeout(Duration::from_millis(500));
        let t = std::time::Instant::now();
        let e = site.stat().unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a request to an unanswering site took {:?}",
            t.elapsed()
        );
        let msg = e.to_string();
        assert!(
            msg.contains("far") && msg.contains(&addr.to_string()),
            "{msg}"
        );
    }

    /// A link whose key directory is wrong is reported as a link that cannot be opened, naming
    /// the site, the link and the pool file, not as a link out of key material (which would
    /// send the operator to provision key that is not missing).
    #[test]
    fn a_wrong_key_directory_is_named_not_called_exhaustion() {
        let dir = tempfile::tempdir().unwrap();
        let keys = LinkKeys {
            dir: dir.path().join("no-such-dir"),
            link: "home-lsa".into(),
            end: End::A,
            options: StreamOptions::default(),
        };
        let e = MountdSite::tcp("lsa", "127.0.0.1:1", &keys).unwrap_err();
        assert!(matches!(e, SiteError::Link { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("site lsa")
                && msg.contains("link home-lsa")
                && msg.contains("no-such-dir")
                && !msg.contains("out of key"),
            "{msg}"
        );
    }

    /// A Unix socket gets the send buffer asked for, up to what the kernel allows
    /// (`net.core.wmem_max`; Linux reports twice the size it was given).
    #[test]
    fn unix_sockets_get_room_for_a_whole_share() {
        let (a, _b) = UnixStream::pair().unwrap();
        let before = nix::sys::socket::getsockopt(&a, nix::sys::socket::sockopt::SndBuf).unwrap();
        size_unix_socket(&a);
        let got = nix::sys::socket::getsockopt(&a, nix::sys::socket::sockopt::SndBuf).unwrap();
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let want = UNIX_SEND_BUFFER.min(cap);
        assert!(
            got >= want,
            "send buffer {got} (was {before}), asked for {UNIX_SEND_BUFFER}, wmem_max {cap}"
        );
    }
}
