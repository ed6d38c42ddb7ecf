//! Sources of the random pieces that make a sharing secret.
//!
//! Any k-1 shares reveal nothing only if the random pieces are uniform, fresh for every chunk and
//! never used twice. [`Drbg`] is the default: AES-256 in counter mode under a key drawn from the
//! operating system, rekeyed from the OS every [`Drbg::RESEED_BYTES`]. Its state is neither
//! `Clone` nor `Copy`, so two sharings can never draw the same stream.
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use zeroize::Zeroizing;

/// Why random bytes could not be produced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RandomError {
    #[error("the operating system's random source failed: {0}")]
    Os(getrandom::Error),
    #[error("random pool {path}: {reason}")]
    Pool { path: String, reason: String },
}

/// A source of uniformly random bytes. Every call returns bytes never returned before.
pub trait RandomSource {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomError>;
}

/// AES-256 in counter mode, keyed from the OS (`getrandom`), rekeyed every
/// [`Drbg::RESEED_BYTES`].
///
/// Block i of the output is AES-256_K(nonce || i), nonce and i as little-endian u64s, with K and
/// the 64-bit nonce fresh from the OS at every rekey: no input block repeats under one key, so
/// no output block depends on anything but the key and a counter that only moves forward. The
/// counter blocks are written straight into the output and encrypted in place by the `aes`
/// crate (VAES when the CPU has it); the `ctr` crate's scalar counter path ran at half the
/// speed of the block cipher itself.
pub struct Drbg {
    cipher: aes::Aes256,
    nonce: u64,
    counter: u64,
    since_reseed: u64,
}

impl Drbg {
    /// Output between two rekeys from the OS: far below the 2^64-block birthday bound of AES,
    /// and 2^26 blocks, so the 64-bit counter never wraps.
    pub const RESEED_BYTES: u64 = 1 << 30;

    /// A generator keyed from the operating system's CSPRNG.
    pub fn from_os() -> Result<Self, RandomError> {
        let (cipher, nonce) = Self::os_key()?;
        Ok(Self {
            cipher,
            nonce,
            counter: 0,
            since_reseed: 0,
        })
    }

    fn os_key() -> Result<(aes::Aes256, u64), RandomError> {
        let mut seed = Zeroizing::new([0u8; 40]);
        getrandom::getrandom(&mut seed[..]).map_err(RandomError::Os)?;
        let cipher = aes::Aes256::new_from_slice(&seed[..32]).expect("AES-256 takes a 32-byte key");
        let nonce = u64::from_le_bytes(seed[32..].try_into().expect("8 bytes"));
        Ok((cipher, nonce))
    }

    /// Write the next counter blocks over `blocks` and encrypt them in place.
    fn keystream(&mut self, blocks: &mut [aes::Block]) {
        counter_blocks(blocks, self.nonce, self.counter);
        self.counter += blocks.len() as u64;
        self.cipher.encrypt_blocks(blocks);
    }
}

super::xor::multiversion! {
    /// Block i of `blocks` = `nonce || counter + i`, both little-endian u64s: as 64-bit words,
    /// the sequence nonce, c, nonce, c+1, ..., which the vectorised copies write a vector of
    /// blocks at a time (a block-by-block loop of 8-byte stores was an eighth of a split).
    fn counter_blocks(blocks: &mut [aes::Block], nonce: u64, counter: u64) {
        for (i, b) in blocks.iter_mut().enumerate() {
            let words = [nonce.to_le(), counter.wrapping_add(i as u64).to_le()];
            // SAFETY: a block is 16 bytes; the write is unaligned (blocks are byte arrays).
            unsafe { (b.as_mut_ptr() as *mut [u64; 2]).write_unaligned(words) };
        }
    }
}

impl RandomSource for Drbg {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomError> {
        // Rekey per call boundary, never mid-buffer: simpler, and a buffer is at most a tile.
        if self.since_reseed >= Self::RESEED_BYTES {
            (self.cipher, self.nonce) = Self::os_key()?;
            self.counter = 0;
            self.since_reseed = 0;
        }
        let (blocks, tail) = aes::Block::slice_as_chunks_mut(buf);
        self.keystream(blocks);
        if !tail.is_empty() {
            let mut last = Zeroizing::new([0u8; 16]);
            self.keystream(aes::Block::slice_as_chunks_mut(&mut last[..]).0);
            tail.copy_from_slice(&last[..tail.len()]);
        }
        self.since_reseed += buf.len() as u64;
        Ok(())
    }
}

impl std::fmt::Debug for Drbg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drbg")
            .field("since_reseed", &self.since_reseed)
            .finish_non_exhaustive()
    }
}

/// The operating system's CSPRNG directly: slower than [`Drbg`], no state in the process.
#[derive(Debug, Default)]
pub struct OsRandom;

impl RandomSource for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomError> {
        getrandom::getrandom(buf).map_err(RandomError::Os)
    }
}

impl<R: RandomSource + ?Sized> RandomSource for &mut R {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RandomError> {
        (**self).fill(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drbg_never_repeats_and_looks_uniform() {
        let mut a = Drbg::from_os().unwrap();
        let mut b = Drbg::from_os().unwrap();
        let mut x = vec![0u8; 1 << 16];
        let mut y = vec![0u8; 1 << 16];
        a.fill(&mut x).unwrap();
        a.fill(&mut y).unwrap();
        assert_ne!(x, y, "one generator repeated its output");
        b.fill(&mut y).unwrap();
        assert_ne!(x, y, "two generators produced the same stream");
        // Each bit position set about half the time: 2^16 bytes, 8 sigma is ~ +-512 around 32768.
        for bit in 0..8 {
            let ones = x.iter().filter(|v| *v >> bit & 1 == 1).count() as i64;
            assert!((ones - 32768).abs() < 1024, "bit {bit}: {ones} ones");
        }
    }

    #[test]
    fn counter_blocks_are_nonce_then_counter_little_endian() {
        use aes::cipher::BlockCipherDecrypt;
        let mut d = Drbg::from_os().unwrap();
        let start = 0x0102_0304_0506_07fe_u64; // a carry out of the low byte within the fill
        d.counter = start;
        let mut out = [0u8; 48];
        d.fill(&mut out).unwrap();
        for (i, block) in out.chunks(16).enumerate() {
            let mut b = aes::Block::try_from(block).unwrap();
            d.cipher.decrypt_block(&mut b);
            let want_counter = start + i as u64;
            assert_eq!(&b[..8], &d.nonce.to_le_bytes(), "block {i} nonce");
            assert_eq!(&b[8..], &want_counter.to_le_bytes(), "block {i} counter");
        }
    }

    #[test]
    fn drbg_rekeys_after_the_reseed_limit() {
        let mut d = Drbg::from_os().unwrap();
        d.since_reseed = Drbg::RESEED_BYTES;
        let mut x = [0u8; 64];
        d.fill(&mut x).unwrap();
        assert_eq!(d.since_reseed, 64);
        assert!(!format!("{d:?}").contains("cipher"));
    }
}
