//! Key sources: where one-time key for a link direction comes from.
//!
//! A [`KeySource`] is a byte string of key addressed by offset (0 = first key byte), as
//! pre-stored QKD key in a pool file ([`pool::PoolFile`]) or, later, keys fetched from a
//! KME over ETSI GS QKD 014 (key arrives as bytes at offsets too). [`MemKeySource`] holds
//! key in memory for fast tests. Which key is free to use is not the source's business:
//! the crash-safe ledger in [`crate::link::stream`] decides that.
use std::ops::Range;
use std::path::{Path, PathBuf};

use zeroize::Zeroize;

pub mod pool;
pub mod tmpfs;

pub use pool::{Direction, End, PoolFile, PoolHeader};

/// Errors of key sources. Every variant names the link and the file (or source) at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("link {link:?}: {op} {path}: {source}")]
    Io {
        link: String,
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a qgenome key pool ({reason})")]
    NotAPool { path: PathBuf, reason: String },
    #[error("link {link:?}: pool {path} has format version {found}, newer than this build reads ({supported})")]
    UnsupportedVersion {
        link: String,
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error("link {link:?}: pool {path} is {actual} bytes but its header says {expected} (truncated or padded)")]
    Truncated {
        link: String,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("link {link:?}: pool {path} belongs to {found}, expected {expected}")]
    ForeignPool {
        link: String,
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("link {link:?}: refusing to overwrite existing {path}")]
    Exists { link: String, path: PathBuf },
    #[error("link {link:?}: pool {path} is in use by another stream (another qgenome or qgenome-mountd, or a second key directory linking the same pool); two users of one pool would reuse key: stop the other first")]
    InUse { link: String, path: PathBuf },
    #[error("link {link:?}: pool {path} can be read or written by other users (mode {mode:o}): one-time-pad key is for its owner alone; `chmod 600` it (and check who else may have read it)")]
    Exposed {
        link: String,
        path: PathBuf,
        mode: u32,
    },
    #[error("link {link:?}: bad pool size for {path}: {reason}")]
    BadSize {
        link: String,
        path: PathBuf,
        reason: String,
    },
    #[error("link {link:?}: both ends would be written to the same directory {path}")]
    SameDirectory { link: String, path: PathBuf },
    #[error("invalid link name {name:?}: {reason}")]
    InvalidLinkName { name: String, reason: &'static str },
    #[error(
        "link {link:?}: key range {start}..{end} is outside the {key_len} key bytes of {path}"
    )]
    OutOfRange {
        link: String,
        path: PathBuf,
        start: u64,
        end: u64,
        key_len: u64,
    },
}

/// What a key source holds: which link direction, which end, and how much key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub link: String,
    pub direction: Direction,
    pub end: End,
    /// Random id shared by both ends of one direction; frames carry it.
    pub stream_id: [u8; 16],
    /// Key bytes in the source.
    pub key_len: u64,
}

/// How used key was destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destroyed {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the blocks were released (partial blocks zeroed).
    Punched,
    /// Punching unsupported: the range was overwritten with zeros.
    Overwritten,
    /// Memory only: zeroed in place.
    Zeroed,
    /// Handed to a background destroyer; done by the next `sync`.
    Queued,
}

/// Key addressed by offset. Implementations: [`PoolFile`], [`MemKeySource`].
///
/// Shared between threads (`&self` everywhere): a link's send stream takes each frame's key
/// range under its lock, then seals with it outside the lock, several frames at once
/// ([`crate::link::FrameGrant`]). Callers only ever read or destroy ranges they took, never
/// two threads the same range.
pub trait KeySource: Send + Sync {
    fn info(&self) -> &StreamInfo;
    /// Where the key lives, for error messages (a pool file path, a KME address).
    fn location(&self) -> &Path;
    /// Make the key below `end` available for reading (a QKD client fetches it here).
    fn reserve(&self, end: u64) -> Result<(), KeyError> {
        self.check_range(0..end)
    }
    /// Read `buf.len()` key bytes starting at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), KeyError>;
    /// The `len` key bytes at `offset` in place, when the source holds them mapped in memory
    /// (a pool on huge pages): sealing then XORs straight from them instead of copying them
    /// out first. `None` (the default) means: use [`KeySource::read_at`].
    fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let _ = (offset, len);
        None
    }
    /// Destroy the key in `range` so it can never be read again.
    fn destroy(&self, range: Range<u64>) -> Result<Destroyed, KeyError>;
    /// Finish earlier destruction and make it durable.
    fn sync(&self) -> Result<(), KeyError> {
        Ok(())
    }
    /// Key bytes in the source.
    fn len(&self) -> u64 {
        self.info().key_len
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn check_range(&self, r: Range<u64>) -> Result<(), KeyError> {
        if r.start > r.end || r.end > self.len() {
            return Err(KeyError::OutOfRange {
                link: self.info().link.clone(),
                path: self.location().to_path_buf(),
                start: r.start,
                end: r.end,
                key_len: self.len(),
            });
        }
        Ok(())
    }
}

/// Key held in memory (zeroized on drop). For tests and benchmarks.
pub struct MemKeySource {
    info: StreamInfo,
    location: PathBuf,
    key: std::sync::Mutex<Vec<u8>>,
}

impl std::fmt::Debug for MemKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemKeySource")
            .field("info", &self.info)
            .field("key", &format_args!("<{} bytes>", self.info.key_len))
            .finish()
    }
}

impl Drop for MemKeySource {
    fn drop(&mut self) {
        self.key_mut().zeroize();
    }
}

impl MemKeySource {
    fn key(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.key.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key_mut(&mut self) -> &mut Vec<u8> {
        self.key.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    /// The sending and receiving ends of one direction of `link`, sharing `len` random key bytes.
    pub fn pair(link: &str, direction: Direction, len: usize) -> (Self, Self) {
        let mut key = vec![0u8; len];
        getrandom::getrandom(&mut key).expect("OS random source");
        let mut stream_id = [0u8; 16];
        getrandom::getrandom(&mut stream_id).expect("OS random source");
        let info = |end| StreamInfo {
            link: link.to_string(),
            direction,
            end,
            stream_id,
            key_len: len as u64,
        };
        let location = PathBuf::from(format!("<memory:{link}.{direction}>"));
        (
            Self {
                info: info(direction.sender()),
                location: location.clone(),
                key: std::sync::Mutex::new(key.clone()),
            },
            Self {
                info: info(direction.receiver()),
                location,
                key: std::sync::Mutex::new(key),
            },
        )
    }
}

impl KeySource for MemKeySource {
    fn info(&self) -> &StreamInfo {
        &self.info
    }
    fn location(&self) -> &Path {
        &self.location
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), KeyError> {
        let end = offset.saturating_add(buf.len() as u64);
        self.check_range(offset..end)?;
        buf.copy_from_slice(&self.key()[offset as usize..end as usize]);
        Ok(())
    }
    fn destroy(&self, r: Range<u64>) -> Result<Destroyed, KeyError> {
        self.check_range(r.clone())?;
        self.key()[r.start as usize..r.end as usize].zeroize();
        Ok(Destroyed::Zeroed)
    }
}
