//! Messages of the share protocol between the mount (or a peer site) and `qgenome-mountd`.
//! Pure: encode into a `Vec`, decode from a slice; no I/O. Formats in `docs/design.md` ("mountd").
//!
//! ```text
//! offset size field
//!      0    4 magic "QGMS"
//!      4    1 format version (1)
//!      5    1 kind (request 0x01..0x06, reply 0x81..0x86, error 0xff)
//!      6    2 reserved, zero
//!      8    8 request id, u64 LE (a reply carries the id of its request; 0 = connection)
//!     16    . body (per kind, every length checked against the bytes present)
//! ```
//! A message is at most [`MAX_MSG`] bytes; share data at most [`MAX_DATA`]. Every declared
//! length is checked against these limits and against the bytes present before anything is
//! allocated, so a hostile length can never make the reader allocate.
use crate::sites::{ShareKey, ShareMeta};

pub const MAGIC: [u8; 4] = *b"QGMS";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
/// Largest share carried by one message.
pub const MAX_DATA: usize = 16 << 20;
/// Largest message (share data plus room for any header and body fields).
pub const MAX_MSG: usize = MAX_DATA + 4096;
/// Most entries in one LIST reply.
pub const MAX_LIST: u32 = 4096;
/// The id of a site's floor notice: the one `KeyAlreadyUsed` answer it gives every stale
/// frame of a link, sealed once per start (a stale frame is refused unopened, so its request
/// id is unknown). Never a request's id: clients start theirs at random below 2^62.
pub const FLOOR_NOTICE_ID: u64 = u64::MAX;
/// Most links reported by one STAT reply.
pub const MAX_LINKS: usize = 64;
/// Longest error message, site or link name on the wire.
pub const MAX_TEXT: usize = 1024;
/// Largest HELLO: header, the link's name (length and text), both stream ids and the
/// client's receive floor. Before a connection's HELLO a site takes no larger frame.
pub const MAX_HELLO: usize = HEADER_LEN + 2 + MAX_TEXT + 16 + 16 + 8;
pub const KEY_LEN: usize = 25;
/// Bytes of one LIST entry: key, k, n, secret length u32, share length u32.
pub const LIST_ENTRY_LEN: usize = KEY_LEN + 2 + 4 + 4;

/// Why a byte string is not a well-formed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MsgError {
    #[error("message of {len} bytes is shorter than its {need}-byte {what}")]
    Truncated {
        len: usize,
        need: usize,
        what: &'static str,
    },
    #[error("message of {len} bytes exceeds the maximum {MAX_MSG}")]
    TooLarge { len: usize },
    #[error("bad message magic {found:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("message format version {found} is not supported (this build speaks {VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("reserved message bytes are not zero")]
    ReservedNotZero,
    #[error("unknown message kind {kind:#04x}")]
    UnknownKind { kind: u8 },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{extra} bytes after the end of a {kind} message")]
    TrailingBytes { kind: &'static str, extra: usize },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> MsgError {
    MsgError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The typed reason of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    NotFound,
    Damaged,
    VolumeFull,
    KeyExhausted,
    BadRequest,
    /// The frame used key the receiver already counts as consumed (e.g. after its restart);
    /// `arg` is where the receiver's unused key starts: the sender skips there and retries.
    KeyAlreadyUsed,
    /// The daemon is stopping; try again later or elsewhere.
    ShuttingDown,
    Internal,
}

impl ErrorCode {
    fn to_u8(self) -> u8 {
        match self {
            ErrorCode::NotFound => 1,
            ErrorCode::Damaged => 2,
            ErrorCode::VolumeFull => 3,
            ErrorCode::KeyExhausted => 4,
            ErrorCode::BadRequest => 5,
            ErrorCode::KeyAlreadyUsed => 6,
            ErrorCode::ShuttingDown => 7,
            ErrorCode::Internal => 8,
        }
    }

    fn from_u8(v: u8) -> Result<Self, MsgError> {
        Ok(match v {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::Damaged,
            3 => ErrorCode::VolumeFull,
            4 => ErrorCode::KeyExhausted,
            5 => ErrorCode::BadRequest,
            6 => ErrorCode::KeyAlreadyUsed,
            7 => ErrorCode::ShuttingDown,
            8 => ErrorCode::Internal,
            _ => return Err(invalid("error code", format!("{v}"))),
        })
    }
}

/// One entry of a LIST reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListEntry {
    pub key: ShareKey,
    pub meta: ShareMeta,
    pub share_len: u32,
}

/// Key left on one link of the answering site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkKeyLeft {
    pub link: String,
    /// Key bytes the site can still send on this link.
    pub send_remaining: u64,
    /// Key bytes the site can still receive on this link.
    pub recv_remaining: u64,
}

/// Site health in a STAT reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// A read since start failed verification; a scrub is due.
    Damaged,
}

/// A STAT reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteStat {
    pub site: String,
    pub capacity: u64,
    pub free: u64,
    pub largest_free: u64,
    pub shares: u64,
    pub health: Health,
    pub links: Vec<LinkKeyLeft>,
}

/// The body of a message. Share data is borrowed from the decoded buffer (no copy).
#[derive(Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// First message on a sealed link connection: which link and streams the client keys,
    /// and where its receive stream's unused key starts (the server skips its send stream
    /// there, so replies never use key the client already counts as consumed).
    Hello {
        link: String,
        c2s_stream: [u8; 16],
        s2c_stream: [u8; 16],
        client_recv_floor: u64,
    },
    Put {
        key: ShareKey,
        meta: ShareMeta,
        data: &'a [u8],
    },
    Get {
        key: ShareKey,
    },
    Delete {
        key: ShareKey,
    },
    /// Shares whose file id starts with `prefix` (at most 16 bytes), in key order, starting
    /// after `after` (for paging), at most `limit` of them.
    List {
        prefix: Vec<u8>,
        after: Option<ShareKey>,
        limit: u32,
    },
    Stat,
    /// Reply to HELLO: the server's site name.
    Welcome {
        site: String,
    },
    /// Reply to PUT and DELETE.
    Done,
    /// Reply to GET.
    Data {
        meta: ShareMeta,
        data: &'a [u8],
    },
    /// Reply to LIST; `next` is where the following page starts (None: no more).
    Listed {
        entries: Vec<ListEntry>,
        next: Option<ShareKey>,
    },
    /// Reply to STAT.
    Stats(SiteStat),
    Error {
        code: ErrorCode,
        /// KeyAlreadyUsed: the first unused key offset; otherwise 0.
        arg: u64,
        message: String,
    },
}

impl std::fmt::Debug for Body<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Share bytes never appear in Debug output.
        match self {
            Body::Put { key, meta, data } => f
                .debug_struct("Put")
                .field("key", key)
                .field("meta", meta)
                .field("len", &data.len())
                .finish(),
            Body::Data { meta, data } => f
                .debug_struct("Data")
                .field("meta", meta)
                .field("len", &data.len())
                .finish(),
            Body::Hello {
                link,
                client_recv_floor,
                ..
            } => f
                .debug_struct("Hello")
                .field("link", link)
                .field("client_recv_floor", client_recv_floor)
                .finish_non_exhaustive(),
            Body::Get { key } => f.debug_struct("Get").field("key", key).finish(),
            Body::Delete { key } => f.debug_struct("Delete").field("key", key).finish(),
            Body::List {
                prefix,
                after,
                limit,
            } => f
                .debug_struct("List")
                .field("prefix", prefix)
                .field("after", after)
                .field("limit", limit)
                .finish(),
            Body::Stat => f.write_str("Stat"),
            Body::Welcome { site } => f.debug_struct("Welcome").field("site", site).finish(),
            Body::Done => f.write_str("Done"),
            Body::Listed { entries, next } => f
                .debug_struct("Listed")
                .field("entries", &entries.len())
                .field("next", next)
                .finish(),
            Body::Stats(s) => f.debug_tuple("Stats").field(s).finish(),
            Body::Error { code, arg, message } => f
                .debug_struct("Error")
                .field("code", code)
                .field("arg", arg)
                .field("message", message)
                .finish(),
        }
    }
}

/// A whole message: request id and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg<'a> {
    pub id: u64,
    pub body: Body<'a>,
}

const K_HELLO: u8 = 0x06;
const K_PUT: u8 = 0x01;
const K_GET: u8 = 0x02;
const K_DELETE: u8 = 0x03;
const K_LIST: u8 = 0x04;
const K_STAT: u8 = 0x05;
const K_DONE: u8 = 0x81;
const K_DATA: u8 = 0x82;
const K_LISTED: u8 = 0x84;
const K_STATS: u8 = 0x85;
const K_WELCOME: u8 = 0x86;
const K_ERROR: u8 = 0xff;

impl Body<'_> {
    fn kind(&self) -> u8 {
        match self {
            Body::Hello { .. } => K_HELLO,
            Body::Put { .. } => K_PUT,
            Body::Get { .. } => K_GET,
            Body::Delete { .. } => K_DELETE,
            Body::List { .. } => K_LIST,
            Body::Stat => K_STAT,
            Body::Welcome { .. } => K_WELCOME,
            Body::Done => K_DONE,
            Body::Data { .. } => K_DATA,
            Body::Listed { .. } => K_LISTED,
            Body::Stats(_) => K_STATS,
            Body::Error { .. } => K_ERROR,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        K_HELLO => "HELLO",
        K_PUT => "PUT",
        K_GET => "GET",
        K_DELETE => "DELETE",
        K_LIST => "LIST",
        K_STAT => "STAT",
        K_WELCOME => "WELCOME",
        K_DONE => "DONE",
        K_DATA => "DATA",
        K_LISTED => "LISTED",
        K_STATS => "STATS",
        K_ERROR => "ERROR",
        _ => "?",
    }
}

fn put_key(out: &mut Vec<u8>, k: &ShareKey) {
    out.extend_from_slice(&k.file);
    out.extend_from_slice(&k.chunk.to_le_bytes());
    out.push(k.share);
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    // Longer texts are cut at a character boundary (encode never fails).
    let mut n = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn put_meta(out: &mut Vec<u8>, m: &ShareMeta) {
    out.push(m.k);
    out.push(m.n);
    out.extend_from_slice(&m.secret_len.to_le_bytes());
}

impl Msg<'_> {
    /// Encoded length (without building it).
    pub fn encoded_len(&self) -> usize {
        match &self.body {
            Body::Put { data, .. } => PUT_HEAD_LEN + data.len(),
            Body::Data { data, .. } => DATA_HEAD_LEN + data.len(),
            _ => {
                let mut v = Vec::new();
                self.encode(&mut v);
                v.len()
            }
        }
    }

    /// Append the encoded message to `out`. Data longer than [`MAX_DATA`] is the caller's
    /// error: it is encoded, and the receiver refuses it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let tail = self.encode_head(out);
        out.extend_from_slice(tail);
    }

    /// Append all of the encoding but its trailing share bytes (PUT and DATA; empty for the
    /// others), which are returned: the encoding is `out`'s new bytes followed by them. Lets a
    /// sender write or seal a share without first copying it behind its head.
    pub fn encode_head<'s>(&'s self, out: &mut Vec<u8>) -> &'s [u8] {
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.body.kind());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.id.to_le_bytes());
        match &self.body {
            Body::Hello {
                link,
                c2s_stream,
                s2c_stream,
                client_recv_floor,
            } => {
                put_text(out, link);
                out.extend_from_slice(c2s_stream);
                out.extend_from_slice(s2c_stream);
                out.extend_from_slice(&client_recv_floor.to_le_bytes());
            }
            Body::Put { key, meta, data } => {
                put_key(out, key);
                put_meta(out, meta);
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                return data;
            }
            Body::Get { key } | Body::Delete { key } => put_key(out, key),
            Body::List {
                prefix,
                after,
                limit,
            } => {
                out.push(prefix.len().min(16) as u8);
                let mut p = [0u8; 16];
                let n = prefix.len().min(16);
                p[..n].copy_from_slice(&prefix[..n]);
                out.extend_from_slice(&p);
                match after {
                    Some(k) => {
                        out.push(1);
                        put_key(out, k);
                    }
                    None => {
                        out.push(0);
                        out.extend_from_slice(&[0u8; KEY_LEN]);
                    }
                }
                out.extend_from_slice(&limit.to_le_bytes());
            }
            Body::Stat | Body::Done => {}
            Body::Welcome { site } => put_text(out, site),
            Body::Data { meta, data } => {
                put_meta(out, meta);
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                return data;
            }
            Body::Listed { entries, next } => {
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for e in entries {
                    put_key(out, &e.key);
                    put_meta(out, &e.meta);
                    out.extend_from_slice(&e.share_len.to_le_bytes());
                }
                match next {
                    Some(k) => {
                        out.push(1);
                        put_key(out, k);
                    }
                    None => {
                        out.push(0);
                        out.extend_from_slice(&[0u8; KEY_LEN]);
                    }
                }
            }
            Body::Stats(s) => {
                put_text(out, &s.site);
                for v in [s.capacity, s.free, s.largest_free, s.shares] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.push(match s.health {
                    Health::Ok => 0,
                    Health::Damaged => 1,
                });
                out.extend_from_slice(&(s.links.len().min(MAX_LINKS) as u16).to_le_bytes());
                for l in s.links.iter().take(MAX_LINKS) {
                    put_text(out, &l.link);
                    out.extend_from_slice(&l.send_remaining.to_le_bytes());
                    out.extend_from_slice(&l.recv_remaining.to_le_bytes());
                }
            }
            Body::Error { code, arg, message } => {
                out.push(code.to_u8());
                out.extend_from_slice(&arg.to_le_bytes());
                put_text(out, message);
            }
        }
        &[]
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode(&mut v);
        v
    }
}

/// A cursor over a message body; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    what: &'static str,
    /// Share bytes that follow `b` (see [`decode_split`]): the message's data field.
    tail: Option<&'a [u8]>,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(MsgError::Truncated {
                len: self.b.len(),
                need: self.at.saturating_add(n),
                what: self.what,
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, MsgError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, MsgError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, MsgError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, MsgError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn id16(&mut self) -> Result<[u8; 16], MsgError> {
        Ok(self.take(16)?.try_into().expect("16"))
    }
    fn key(&mut self) -> Result<ShareKey, MsgError> {
        Ok(ShareKey {
            file: self.id16()?,
            chunk: self.u64()?,
            share: self.u8()?,
        })
    }
    fn opt_key(&mut self, field: &'static str) -> Result<Option<ShareKey>, MsgError> {
        let flag = self.u8()?;
        let k = self.key()?;
        match flag {
            0 if k == ShareKey::default_zero() => Ok(None),
            0 => Err(invalid(field, "absent key is not zero")),
            1 => Ok(Some(k)),
            f => Err(invalid(field, format!("presence flag {f}"))),
        }
    }
    fn meta(&mut self) -> Result<ShareMeta, MsgError> {
        let m = ShareMeta {
            k: self.u8()?,
            n: self.u8()?,
            secret_len: self.u32()?,
        };
        if m.k == 0 || m.k > m.n {
            return Err(invalid("scheme", format!("k={} n={}", m.k, m.n)));
        }
        Ok(m)
    }
    fn text(&mut self, field: &'static str) -> Result<String, MsgError> {
        let n = self.u16()? as usize;
        if n > MAX_TEXT {
            return Err(invalid(field, format!("{n} bytes (at most {MAX_TEXT})")));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid(field, "not UTF-8"))
    }
    fn data(&mut self) -> Result<&'a [u8], MsgError> {
        let n = self.u32()? as usize;
        if n > MAX_DATA {
            return Err(invalid("data length", format!("{n} (at most {MAX_DATA})")));
        }
        match self.tail.take() {
            None => self.take(n),
            Some(t) if n == t.len() && self.at == self.b.len() => Ok(t),
            Some(t) => Err(invalid(
                "data length",
                format!(
                    "{n} bytes declared, {} follow the head, which has {} more",
                    t.len(),
                    self.b.len() - self.at
                ),
            )),
        }
    }
    fn finish(&self, kind: u8) -> Result<(), MsgError> {
        if let Some(t) = self.tail {
            return Err(MsgError::TrailingBytes {
                kind: kind_name(kind),
                extra: t.len(),
            });
        }
        if self.at != self.b.len() {
            return Err(MsgError::TrailingBytes {
                kind: kind_name(kind),
                extra: self.b.len() - self.at,
            });
        }
        Ok(())
    }
}

impl ShareKey {
    fn default_zero() -> Self {
        ShareKey {
            file: [0; 16],
            chunk: 0,
            share: 0,
        }
    }
}

/// Check the fixed header of a message (magic, version, reserved bytes) and its length.
pub fn check_len(len: usize) -> Result<(), MsgError> {
    if len > MAX_MSG {
        return Err(MsgError::TooLarge { len });
    }
    Ok(())
}

/// Decode one whole message. Never panics; allocations are bounded by the input length.
pub fn decode(b: &[u8]) -> Result<Msg<'_>, MsgError> {
    decode_parts(b, None)
}

/// Decode the message `head ‖ tail` whose share bytes (PUT, DATA) are exactly `tail`, as
/// received into two buffers (see `RecvStream::open_in_place`). Refused like [`decode`] would
/// refuse the concatenation, and also when `tail` is not exactly the data field.
pub fn decode_split<'a>(head: &'a [u8], tail: &'a [u8]) -> Result<Msg<'a>, MsgError> {
    check_len(head.len() + tail.len())?;
    decode_parts(head, Some(tail))
}

/// Whether `head`, the start of a message, is that of a PUT (its kind byte only: the whole
/// message is still checked by [`decode_split`]). Lets a receiver read a PUT's share
/// straight into the buffer it stores it from.
pub fn is_put(head: &[u8]) -> bool {
    head.len() > 5 && head[5] == K_PUT
}

/// Whether `head`, the start of a message, is that of an ERROR (its kind byte only, as
/// [`is_put`]): lets a client look for a site's floor notice without decoding every reply.
pub fn is_error(head: &[u8]) -> bool {
    head.len() > 5 && head[5] == K_ERROR
}

/// Length of the encoding of a PUT without its share bytes.
pub const PUT_HEAD_LEN: usize = HEADER_LEN + KEY_LEN + 2 + 4 + 4;

/// Length of the encoding of a DATA reply without its share bytes.
pub const DATA_HEAD_LEN: usize = HEADER_LEN + 2 + 4 + 4;

fn decode_parts<'a>(b: &'a [u8], tail: Option<&'a [u8]>) -> Result<Msg<'a>, MsgError> {
    check_len(b.len())?;
    if b.len() < HEADER_LEN {
        return Err(MsgError::Truncated {
            len: b.len(),
            need: HEADER_LEN,
            what: "header",
        });
    }
    let magic: [u8; 4] = b[0..4].try_into().expect("4");
    if magic != MAGIC {
        return Err(MsgError::BadMagic { found: magic });
    }
    if b[4] != VERSION {
        return Err(MsgError::UnsupportedVersion { found: b[4] });
    }
    if b[6..8] != [0, 0] {
        return Err(MsgError::ReservedNotZero);
    }
    let kind = b[5];
    let id = u64::from_le_bytes(b[8..16].try_into().expect("8"));
    let mut r = Reader {
        b,
        at: HEADER_LEN,
        what: kind_name(kind),
        tail,
    };
    let body = match kind {
        K_HELLO => {
            let link = r.text("link")?;
            if link.is_empty() {
                return Err(invalid("link", "empty"));
            }
            Body::Hello {
                link,
                c2s_stream: r.id16()?,
                s2c_stream: r.id16()?,
                client_recv_floor: r.u64()?,
            }
        }
        K_PUT => {
            let key = r.key()?;
            let meta = r.meta()?;
            if key.share >= meta.n {
                return Err(invalid(
                    "share index",
                    format!("{} of n={}", key.share, meta.n),
                ));
            }
            Body::Put {
                key,
                meta,
                data: r.data()?,
            }
        }
        K_GET => Body::Get { key: r.key()? },
        K_DELETE => Body::Delete { key: r.key()? },
        K_LIST => {
            let n = r.u8()? as usize;
            if n > 16 {
                return Err(invalid("list prefix", format!("{n} bytes (at most 16)")));
            }
            let p = r.take(16)?;
            if p[n..].iter().any(|&x| x != 0) {
                return Err(invalid("list prefix", "padding is not zero"));
            }
            let after = r.opt_key("list after")?;
            let limit = r.u32()?;
            if limit == 0 || limit > MAX_LIST {
                return Err(invalid("list limit", format!("{limit} (1..={MAX_LIST})")));
            }
            Body::List {
                prefix: p[..n].to_vec(),
                after,
                limit,
            }
        }
        K_STAT => Body::Stat,
        K_WELCOME => Body::Welcome {
            site: r.text("site")?,
        },
        K_DONE => Body::Done,
        K_DATA => Body::Data {
            meta: r.meta()?,
            data: r.data()?,
        },
        K_LISTED => {
            let count = r.u32()?;
            if count > MAX_LIST {
                return Err(invalid(
                    "list count",
                    format!("{count} (at most {MAX_LIST})"),
                ));
            }
            // The entries must be present before any is allocated.
            let need = count as usize * LIST_ENTRY_LEN + 1 + KEY_LEN;
            if b.len() - r.at != need {
                return Err(invalid(
                    "list count",
                    format!(
                        "{count} entries need {need} bytes, {} present",
                        b.len() - r.at
                    ),
                ));
            }
            let mut entries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let key = r.key()?;
                let meta = r.meta()?;
                let share_len = r.u32()?;
                entries.push(ListEntry {
                    key,
                    meta,
                    share_len,
                });
            }
            Body::Listed {
                entries,
                next: r.opt_key("list next")?,
            }
        }
        K_STATS => {
            let site = r.text("site")?;
            let capacity = r.u64()?;
            let free = r.u64()?;
            let largest_free = r.u64()?;
            let shares = r.u64()?;
            let health = match r.u8()? {
                0 => Health::Ok,
                1 => Health::Damaged,
                h => return Err(invalid("health", format!("{h}"))),
            };
            let n = r.u16()? as usize;
            if n > MAX_LINKS {
                return Err(invalid("link count", format!("{n} (at most {MAX_LINKS})")));
            }
            let mut links = Vec::with_capacity(n);
            for _ in 0..n {
                links.push(LinkKeyLeft {
                    link: r.text("link")?,
                    send_remaining: r.u64()?,
                    recv_remaining: r.u64()?,
                });
            }
            Body::Stats(SiteStat {
                site,
                capacity,
                free,
                largest_free,
                shares,
                health,
                links,
            })
        }
        K_ERROR => Body::Error {
            code: ErrorCode::from_u8(r.u8()?)?,
            arg: r.u64()?,
            message: r.text("error message")?,
        },
        other => return Err(MsgError::UnknownKind { kind: other }),
    };
    r.finish(kind)?;
    Ok(Msg { id, body })
}

/// Length prefix of a plain (Unix socket) frame: `u32 LE length` then the message.
pub const PLAIN_PREFIX: usize = 4;

/// The declared message length of a plain frame's prefix, refused before any allocation
/// when it is zero or above [`MAX_MSG`].
pub fn plain_len(prefix: [u8; PLAIN_PREFIX]) -> Result<usize, MsgError> {
    let n = u32::from_le_bytes(prefix) as usize;
    check_len(n)?;
    if n < HEADER_LEN {
        return Err(MsgError::Truncated {
            len: n,
            need: HEADER_LEN,
            what: "header",
        });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_error_tells_an_error_from_other_replies_by_its_kind_byte() {
        let err = Msg {
            id: 7,
            body: Body::Error {
                code: ErrorCode::KeyAlreadyUsed,
                arg: 1,
                message: "m".into(),
            },
        }
        .to_vec();
        let done = Msg {
            id: 7,
            body: Body::Done,
        }
        .to_vec();
        assert!(is_error(&err));
        assert!(!is_error(&done) && !is_error(&err[..3]));
    }
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = ShareKey> {
        (any::<[u8; 16]>(), any::<u64>(), any::<u8>()).prop_map(|(file, chunk, share)| ShareKey {
            file,
            chunk,
            share,
        })
    }

    fn meta() -> impl Strategy<Value = ShareMeta> {
        (1u8..=255, any::<u32>()).prop_flat_map(|(n, secret_len)| {
            (1..=n).prop_map(move |k| ShareMeta { k, n, secret_len })
        })
    }

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 ._é-]{0,40}"
    }

    #[derive(Debug, Clone)]
    enum Owned {
        Hello(String, [u8; 16], [u8; 16], u64),
        Put(ShareKey, ShareMeta, Vec<u8>),
        Get(ShareKey),
        Delete(ShareKey),
        List(Vec<u8>, Option<ShareKey>, u32),
        Stat,
        Welcome(String),
        Done,
        Data(ShareMeta, Vec<u8>),
        Listed(Vec<ListEntry>, Option<ShareKey>),
        Stats(SiteStat),
        Error(u8, u64, String),
    }

    fn owned() -> impl Strategy<Value = Owned> {
        let data = proptest::collection::vec(any::<u8>(), 0..300);
        let entry = (key(), meta(), any::<u32>()).prop_map(|(key, meta, share_len)| ListEntry {
            key,
            meta,
            share_len,
        });
        let link = (text(), any::<u64>(), any::<u64>()).prop_map(|(link, s, r)| LinkKeyLeft {
            link,
            send_remaining: s,
            recv_remaining: r,
        });
        let stats = (
            text(),
            any::<[u64; 4]>(),
            any::<bool>(),
            proptest::collection::vec(link, 0..5),
        )
            .prop_map(|(site, v, d, links)| SiteStat {
                site,
                capacity: v[0],
                free: v[1],
                largest_free: v[2],
                shares: v[3],
                health: if d { Health::Damaged } else { Health::Ok },
                links,
            });
        prop_oneof![
            (
                "[a-z0-9._-]{1,64}",
                any::<[u8; 16]>(),
                any::<[u8; 16]>(),
                any::<u64>()
            )
                .prop_map(|(l, a, b, f)| Owned::Hello(l, a, b, f)),
            (key(), meta(), data.clone())
                .prop_filter("share < n", |(k, m, _)| k.share < m.n)
                .prop_map(|(k, m, d)| Owned::Put(k, m, d)),
            key().prop_map(Owned::Get),
            key().prop_map(Owned::Delete),
            (
                proptest::collection::vec(any::<u8>(), 0..=16),
                proptest::option::of(key()),
                1..=MAX_LIST
            )
                .prop_map(|(p, a, l)| Owned::List(p, a, l)),
            Just(Owned::Stat),
            text().prop_map(Owned::Welcome),
            Just(Owned::Done),
            (meta(), data).prop_map(|(m, d)| Owned::Data(m, d)),
            (
                proptest::collection::vec(entry, 0..20),
                proptest::option::of(key())
            )
                .prop_map(|(e, n)| Owned::Listed(e, n)),
            stats.prop_map(Owned::Stats),
            (1u8..=8, any::<u64>(), text()).prop_map(|(c, a, m)| Owned::Error(c, a, m)),
        ]
    }

    fn body(o: &Owned) -> Body<'_> {
        match o {
            Owned::Hello(l, a, b, f) => Body::Hello {
                link: l.clone(),
                c2s_stream: *a,
                s2c_stream: *b,
                client_recv_floor: *f,
            },
            Owned::Put(k, m, d) => Body::Put {
                key: *k,
                meta: *m,
                data: d,
            },
            Owned::Get(k) => Body::Get { key: *k },
            Owned::Delete(k) => Body::Delete { key: *k },
            Owned::List(p, a, l) => Body::List {
                prefix: p.clone(),
                after: *a,
                limit: *l,
            },
            Owned::Stat => Body::Stat,
            Owned::Welcome(s) => Body::Welcome { site: s.clone() },
            Owned::Done => Body::Done,
            Owned::Data(m, d) => Body::Data { meta: *m, data: d },
            Owned::Listed(e, n) => Body::Listed {
                entries: e.clone(),
                next: *n,
            },
            Owned::Stats(s) => Body::Stats(s.clone()),
            Owned::Error(c, a, m) => Body::Error {
                code: ErrorCode::from_u8(*c).unwrap(),
                arg: *a,
                message: m.clone(),
            },
        }
    }

    proptest! {
        #[test]
        fn every_message_round_trips(o in owned(), id in any::<u64>()) {
            let m = Msg { id, body: body(&o) };
            let bytes = m.to_vec();
            prop_assert_eq!(bytes.len(), m.encoded_len());
            prop_assert_eq!(decode(&bytes), Ok(m.clone()));
            // The head plus the returned tail is the same encoding, and decodes split.
            let mut head = Vec::new();
            let tail = m.encode_head(&mut head);
            if !tail.is_empty() {
                prop_assert_eq!(decode_split(&head, tail), Ok(m.clone()));
                // Cut anywhere else, it is refused.
                let whole = [&head[..], tail].concat();
                for cut in [head.len() - 1, head.len() + 1] {
                    if cut < whole.len() {
                        prop_assert!(decode_split(&whole[..cut], &whole[cut..]).is_err());
                    }
                }
            } else {
                prop_assert!(decode_split(&head, &[0]).is_err(), "no data field, yet a tail accepted");
            }
            head.extend_from_slice(tail);
            prop_assert_eq!(&head, &bytes);
            // Every strict prefix is refused (lengths are exact), never a panic.
            for cut in 0..bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err(), "prefix {} accepted", cut);
            }
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(decode(&longer).is_err());
        }

        #[test]
        fn decode_never_panics_on_random_bytes(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&b);
        }

        #[test]
        fn decode_never_panics_on_mutated_messages(o in owned(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let mut b = Msg { id: 7, body: body(&o) }.to_vec();
            for (at, x) in flips {
                let i = at % b.len();
                b[i] ^= x;
            }
            let _ = decode(&b);
        }
    }

    #[test]
    fn the_longest_hello_is_max_hello_bytes() {
        let hello = Msg {
            id: u64::MAX,
            body: Body::Hello {
                link: "l".repeat(MAX_TEXT + 10),
                c2s_stream: [1; 16],
                s2c_stream: [2; 16],
                client_recv_floor: u64::MAX,
            },
        };
        assert_eq!(hello.to_vec().len(), MAX_HELLO);
    }

    #[test]
    fn absurd_lengths_are_refused_before_allocating() {
        assert_eq!(
            plain_len((u32::MAX).to_le_bytes()),
            Err(MsgError::TooLarge {
                len: u32::MAX as usize
            })
        );
        assert!(plain_len(3u32.to_le_bytes()).is_err());
        assert_eq!(plain_len(100u32.to_le_bytes()), Ok(100));
        // A LISTED claiming 4096 entries in a short message is refused by arithmetic.
        let mut b = Msg {
            id: 1,
            body: Body::Listed {
                entries: vec![],
                next: None,
            },
        }
        .to_vec();
        b[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&MAX_LIST.to_le_bytes());
        assert!(matches!(
            decode(&b),
            Err(MsgError::Invalid {
                field: "list count",
                ..
            })
        ));
        // A PUT declaring more data than MAX_DATA.
        let mut b = Msg {
            id: 1,
            body: Body::Put {
                key: ShareKey::default_zero(),
                meta: ShareMeta {
                    k: 1,
                    n: 1,
                    secret_len: 1,
                },
                data: b"x",
            },
        }
        .to_vec();
        let at = HEADER_LEN + KEY_LEN + 6;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&b),
            Err(MsgError::Invalid {
                field: "data length",
                ..
            })
        ));
    }

    #[test]
    fn debug_never_shows_share_bytes() {
        let secret = b"GATTACAGATTACA";
        let m = Msg {
            id: 1,
            body: Body::Data {
                meta: ShareMeta {
                    k: 2,
                    n: 3,
                    secret_len: 14,
                },
                data: secret,
            },
        };
        let d = format!("{m:?}");
        assert!(!d.contains("71") && !d.contains("GATTACA"), "{d}");
        assert!(d.contains("len: 14"));
    }
}
