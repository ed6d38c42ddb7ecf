//! The Kurihara–Kiyomoto–Fukushima–Tanaka XOR (k,n) threshold secret sharing scheme.
//!
//! Only XOR, perfect secrecy, each share the size of the (padded) secret. With p the smallest
//! prime >= n, the secret is padded and cut into p-1 pieces s_1..s_{p-1} (s_0 = 0), k-1 random
//! strings R^h of p pieces are drawn, and piece j of share i is
//!
//! ```text
//! w[i][j] = s[(j - i) mod p] XOR (XOR over h = 0..k-2 of r^h[(h*i + j) mod p])
//! ```
//!
//! - [`plan`]: the GF(2) algebra: which received pieces rebuild a secret or a lost share.
//! - [`scheme`]: the byte engine (split, combine, regenerate, refresh) over caller buffers.
//! - [`xor`]: vectorised XOR kernels.
//! - [`random`]: the random sources (an OS-seeded AES-256-CTR DRBG by default).
//!
//! The share byte layout and the padding rule are in `docs/design.md`.
pub mod plan;
pub mod random;
pub mod scheme;
pub mod xor;

pub use random::{Drbg, OsRandom, RandomError, RandomSource};
pub use scheme::{k_subsets, with_thread_drbg, Scheme, PIECE_ALIGN, TILE};

/// Why a sharing operation was refused. Nothing is written to the output on error except where
/// noted by the operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SharingError {
    #[error("scheme ({k},{n}) is not supported: need 2 <= k <= n <= 16")]
    Parameters { k: usize, n: usize },
    #[error("expected {expected} share buffers, got {actual}")]
    ShareCount { expected: usize, actual: usize },
    #[error("share {index}: {actual} bytes where {expected} were expected")]
    ShareLength {
        index: usize,
        expected: usize,
        actual: usize,
    },
    #[error("share index {index} is out of range for n = {n}")]
    ShareIndex { index: usize, n: usize },
    #[error("share {index} was given twice")]
    DuplicateShare { index: usize },
    #[error("{have} shares given, at least {need} are needed")]
    TooFewShares { have: usize, need: usize },
    #[error("output buffer is {actual} bytes, the secret is {expected}")]
    OutputLength { expected: usize, actual: usize },
    #[error("chunk length must be greater than zero")]
    ChunkLength,
    #[error("shares {subset:?} do not determine the target (scheme fault)")]
    Unsolvable { subset: Vec<usize> },
    #[error(transparent)]
    Random(#[from] RandomError),
}
