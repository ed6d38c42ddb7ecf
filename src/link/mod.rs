//! One-time-pad links: key streams with a crash-safe ledger, and frame sealing with an
//! information-theoretic Wegman–Carter tag. Formats and arguments: `docs/design.md` ("Links").
//!
//! - [`stream`]: [`SendStream`] / [`RecvStream`], one per (link, direction) end.
//! - [`ledger`]: the two-slot ledger file that makes key reservation crash-safe.
//! - [`seal`]: pure sealing and opening of frames (pad XOR + POLYVAL tag, fused).
//! - [`polyval`]: POLYVAL with an 8-block aggregated PCLMULQDQ kernel.
use std::path::{Path, PathBuf};

use crate::keys::KeyError;
use crate::wire::frame::{FrameError, HEADER_LEN};

pub mod ledger;
pub mod polyval;
pub mod seal;
pub mod stream;

pub use stream::{
    AdmittedFrame, FrameGrant, FrameOpen, RecvStream, SealWriteError, SendStream, StreamOptions,
};

/// Errors of link streams. Each names the link and, where a file is at fault, the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("link {link:?}: {op} {path}: {source}")]
    LedgerIo {
        link: String,
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "link {link:?}: ledger {path} is corrupt ({reason}); refusing to guess which key is unused"
    )]
    LedgerCorrupt {
        link: String,
        path: PathBuf,
        reason: String,
    },
    #[error("link {link:?}: ledger {path} has format version {found}, newer than this build reads ({supported})")]
    LedgerFromFuture {
        link: String,
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error("link {link:?}: ledger {path} belongs to another stream than its pool")]
    LedgerForeign { link: String, path: PathBuf },
    #[error(
        "link {link:?}: ledger {path} says {value} but pool {pool} holds only {key_len} key bytes"
    )]
    LedgerBeyondPool {
        link: String,
        path: PathBuf,
        pool: PathBuf,
        value: u64,
        key_len: u64,
    },
    #[error("link {link:?}: ledger {path} is stale: key at its resume point {value} in {pool} was already destroyed (ledger restored from a backup?)")]
    StaleLedger {
        link: String,
        path: PathBuf,
        pool: PathBuf,
        value: u64,
    },
    #[error(
        "link {link:?}: no ledger {path} but pool {pool} has used key; refusing to start over"
    )]
    LedgerMissing {
        link: String,
        path: PathBuf,
        pool: PathBuf,
    },
    #[error("link {link:?}: ledger {path} is in use by another process")]
    Busy { link: String, path: PathBuf },
    #[error("link {link:?}: a key window of {window} bytes is larger than pool {pool} ({key_len} bytes of key): each restart may destroy up to a window of unused key; set the window (key_window at the home, window at the site) well below the pool (\"64M\" meant, not \"64G\"?)")]
    WindowTooLarge {
        link: String,
        pool: PathBuf,
        window: u64,
        key_len: u64,
    },
    #[error("link {link:?}: key stream in {pool} exhausted: frame needs {needed} key bytes, {remaining} remain")]
    Exhausted {
        link: String,
        pool: PathBuf,
        needed: u64,
        remaining: u64,
    },
    #[error("link {link:?}: key at offset {offset} of stream {stream} was already used (consumed until {consumed_until})")]
    KeyAlreadyUsed {
        link: String,
        stream: String,
        offset: u64,
        consumed_until: u64,
    },
    #[error("link {link:?}: frame is for stream {found}, this end reads stream {expected}")]
    WrongStream {
        link: String,
        expected: String,
        found: String,
    },
    #[error("link {link:?}: malformed frame: {source}")]
    BadFrame {
        link: String,
        #[source]
        source: FrameError,
    },
    #[error(
        "link {link:?}: frame at key offset {offset} failed authentication (altered or forged)"
    )]
    BadTag { link: String, offset: u64 },
    #[error("link {link:?}: key at offset {offset} in {pool} is destroyed")]
    KeyDestroyed {
        link: String,
        pool: PathBuf,
        offset: u64,
    },
    #[error("link {link:?}: frame key range {start}..{end} lies outside the {key_len} key bytes of {pool}")]
    OutsidePool {
        link: String,
        pool: PathBuf,
        start: u64,
        end: u64,
        key_len: u64,
    },
    #[error("link {link:?}: cannot skip back from key offset {from} to {to}")]
    SkipBackwards { link: String, from: u64, to: u64 },
    #[error("link {link:?}: payload of {len} bytes exceeds the frame maximum")]
    PayloadTooLarge { link: String, len: usize },
}

/// Lower-case hex of a stream id, for messages.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Result of [`bench_seal_detail`]: MB/s over the wall time of the seal and open calls, and
/// over the CPU time of the whole process during the loop (this includes the background key
/// destroyer threads, which the wall figure does not wait for).
#[derive(Debug, Clone, Copy)]
pub struct SealBench {
    pub wall_mbps: f64,
    /// Per CPU-second of the process (the key destroyers included).
    pub cpu_mbps: f64,
    /// The pools were on a tmpfs of huge pages (see [`crate::keys::tmpfs`]).
    pub huge_pages: bool,
}

/// Seal and open `size` payload bytes in 1 MiB frames through a freshly provisioned link
/// whose pools live under `dir` (use tmpfs, e.g. /dev/shm, to measure the CPU side; there,
/// as root, the pools get a tmpfs of huge pages of their own, as deployments keeping pools
/// in RAM should). `wall_mbps` = payload bytes / (total seal time + total open time) is the
/// `seal_mbps` of `qgenome bench split --json`. Removes its files.
pub fn bench_seal_detail(size: u64, dir: &Path) -> Result<SealBench, LinkError> {
    use crate::keys::{pool, Direction};
    use std::time::{Duration, Instant};
    const FRAME: usize = 1 << 20;
    let frames = size.div_ceil(FRAME as u64).max(1);
    let work = dir.join(format!("qgenome-bench-seal-{}", std::process::id()));
    let (a, b) = (work.join("a"), work.join("b"));
    let mk = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| {
            LinkError::Key(KeyError::Io {
                link: "bench".into(),
                path: p.to_path_buf(),
                op: "create bench directory",
                source,
            })
        })
    };
    // And the first key block, which a new stream destroys unused (`stream::open_ledger`).
    let key_len = frames * crate::wire::frame::key_len_for(FRAME as u64).expect("1 MiB")
        + crate::wire::frame::KEY_BLOCK;
    mk(&work)?;
    let huge = crate::keys::tmpfs::HugeTmpfs::over_tmpfs(
        &work,
        4 * (key_len + pool::HEADER_LEN) + (16 << 20),
    );
    mk(&a)?;
    mk(&b)?;
    let res = (|| {
        pool::provision("bench", key_len, &a, &b)?;
        let opts = StreamOptions::default();
        let mut tx = SendStream::from_dir(&a, "bench", Direction::AtoB, opts.clone())?;
        let mut rx = RecvStream::from_dir(&b, "bench", Direction::AtoB, opts)?;
        let mut payload = vec![0u8; FRAME];
        getrandom::getrandom(&mut payload).expect("OS random source");
        let mut frame = Vec::new();
        let (mut t_seal, mut t_open) = (Duration::ZERO, Duration::ZERO);
        let cpu0 = crate::process_cpu();
        for _ in 0..frames {
            let t = Instant::now();
            tx.seal(&payload, &mut frame)?;
            t_seal += t.elapsed();
            // Opened in place, as links open shares (the kernel's receive copy aside).
            let t = Instant::now();
            let (head, rest) = frame.split_at_mut(HEADER_LEN);
            let (ct, tag) = rest.split_at_mut(FRAME);
            let head: &[u8; HEADER_LEN] = (&*head).try_into().expect("header");
            rx.open_in_place(head, &mut [ct], tag)?;
            t_open += t.elapsed();
        }
        // Waiting for the destroyers to finish counts as seal and open time.
        let t = Instant::now();
        tx.flush()?;
        t_seal += t.elapsed();
        let t = Instant::now();
        rx.flush()?;
        t_open += t.elapsed();
        let cpu = crate::process_cpu() - cpu0;
        assert_eq!(
            frame[HEADER_LEN..][..FRAME],
            payload[..],
            "bench round trip"
        );
        let bytes = (frames * FRAME as u64) as f64;
        Ok(SealBench {
            wall_mbps: bytes / (t_seal + t_open).as_secs_f64() / 1e6,
            cpu_mbps: bytes / cpu.as_secs_f64() / 1e6,
            huge_pages: huge.is_some(),
        })
    })();
    drop(huge);
    let _ = std::fs::remove_dir_all(&work);
    res
}
