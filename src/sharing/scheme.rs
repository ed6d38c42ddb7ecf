//! The byte engine of the (k,n) scheme: split, combine, regenerate, refresh.
//!
//! Shares are written into caller-provided buffers. The work is done tile by tile (a slice of
//! [`TILE`] bytes at the same offset in every piece), so the random pieces of a tile and the
//! tiles being XORed stay in L1, and the only per-chunk memory is a per-thread scratch that is
//! allocated once and wiped after every chunk.
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rayon::prelude::*;

use super::plan::{self, Layout, Plan, Target, Term};
use super::random::{Drbg, RandomError, RandomSource};
use super::xor::xor_sources;
use super::SharingError;

/// Pieces are padded to a multiple of this many bytes (a cache line, and a multiple of every
/// O_DIRECT alignment divisor once multiplied by the piece count and rounded by the volume).
pub const PIECE_ALIGN: usize = 64;
/// Bytes of each piece processed together.
pub const TILE: usize = 8 << 10;
/// Most sources one output piece can have in a split: one secret piece and k-1 random pieces.
const MAX_SPLIT_TERMS: usize = 16;

/// A (k, n) threshold scheme: any k of the n shares rebuild the secret, any k-1 reveal nothing.
#[derive(Debug)]
pub struct Scheme {
    layout: Layout,
    plans: RwLock<HashMap<(u32, Target), Arc<Plan>>>,
}

#[derive(Default)]
struct Scratch {
    random: Vec<u8>,
    padded: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static THREAD_DRBG: RefCell<Option<Drbg>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's own [`Drbg`], created from the OS on first use.
pub fn with_thread_drbg<T>(f: impl FnOnce(&mut Drbg) -> T) -> Result<T, RandomError> {
    THREAD_DRBG.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Drbg::from_os()?);
        }
        Ok(f(slot.as_mut().expect("just set")))
    })
}

/// Every k-element subset of `0..n` (n < 32), each in increasing order: the sets of shares
/// a chunk can be rebuilt from.
pub fn k_subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    assert!(n < 32, "k_subsets: {n} elements");
    (0u32..1 << n)
        .filter(|m| m.count_ones() as usize == k)
        .map(|m| (0..n).filter(|i| m >> i & 1 == 1).collect())
        .collect()
}

impl Scheme {
    pub fn new(k: usize, n: usize) -> Result<Self, SharingError> {
        if !(2..=16).contains(&n) || !(2..=n).contains(&k) {
            return Err(SharingError::Parameters { k, n });
        }
        Ok(Self {
            layout: Layout::new(k, n),
            plans: RwLock::new(HashMap::new()),
        })
    }

    pub fn k(&self) -> usize {
        self.layout.k
    }

    pub fn n(&self) -> usize {
        self.layout.n
    }

    /// The prime p >= n the scheme is built on; a share has p-1 pieces.
    pub fn p(&self) -> usize {
        self.layout.p
    }

    /// Bytes per piece for a secret of `secret_len` bytes.
    pub fn piece_len(&self, secret_len: usize) -> usize {
        secret_len
            .div_ceil(self.layout.pieces())
            .next_multiple_of(PIECE_ALIGN)
    }

    /// Bytes per share for a secret of `secret_len` bytes: the secret padded with zeros to p-1
    /// pieces of [`Scheme::piece_len`] bytes.
    pub fn share_len(&self, secret_len: usize) -> usize {
        self.piece_len(secret_len) * self.layout.pieces()
    }

    /// Random bytes one split of `secret_len` bytes draws.
    pub fn random_len(&self, secret_len: usize) -> usize {
        self.piece_len(secret_len) * self.layout.random_pieces()
    }

    /// Split `secret` into the n shares `shares[0..n]`, each [`Scheme::share_len`] bytes.
    ///
    /// Draws [`Scheme::random_len`] bytes from `rng`, tile by tile; within a tile, the random
    /// pieces in order (R^0's p-1 pieces, then p pieces of each further R^h).
    pub fn split(
        &self,
        secret: &[u8],
        rng: &mut dyn RandomSource,
        shares: &mut [&mut [u8]],
    ) -> Result<(), SharingError> {
        self.check_share_set(shares, self.share_len(secret.len()))?;
        self.share_tiles(Some(secret), rng, shares)
    }

    /// Split consecutive chunks of `data` (`chunk_len` bytes each, the last one shorter) in
    /// parallel, each rayon thread with its own [`Drbg`]. Share i of every chunk goes to
    /// `shares[i]`, chunk after chunk: chunk c's share starts at the sum of the share lengths of
    /// the chunks before it.
    pub fn split_chunks(
        &self,
        data: &[u8],
        chunk_len: usize,
        shares: &mut [&mut [u8]],
    ) -> Result<(), SharingError> {
        if chunk_len == 0 {
            return Err(SharingError::ChunkLength);
        }
        let total: usize = data
            .chunks(chunk_len)
            .map(|c| self.share_len(c.len()))
            .sum();
        self.check_share_set(shares, total)?;
        let mut jobs: Vec<(&[u8], Vec<&mut [u8]>)> = data
            .chunks(chunk_len)
            .map(|c| (c, Vec::with_capacity(self.n())))
            .collect();
        for share in shares.iter_mut() {
            let mut rest: &mut [u8] = share;
            for (chunk, out) in jobs.iter_mut() {
                let (head, tail) = rest.split_at_mut(self.share_len(chunk.len()));
                out.push(head);
                rest = tail;
            }
        }
        jobs.into_par_iter().try_for_each(|(chunk, mut out)| {
            with_thread_drbg(|rng| self.split(chunk, rng, &mut out))?
        })
    }

    /// Rebuild the secret of `secret_len` bytes into `out` from at least k distinct shares
    /// `(share index, bytes)`. The first k are used.
    pub fn combine(
        &self,
        shares: &[(usize, &[u8])],
        secret_len: usize,
        out: &mut [u8],
    ) -> Result<(), SharingError> {
        self.combine_observed(shares, secret_len, out, &mut |_| {})
    }

    /// [`combine`](Self::combine), handing `observe` the secret as it is rebuilt, a tile at
    /// a time and in order, while each tile is still in cache (to hash the chunk without
    /// reading it back from memory).
    pub fn combine_observed(
        &self,
        shares: &[(usize, &[u8])],
        secret_len: usize,
        out: &mut [u8],
        observe: &mut dyn FnMut(&[u8]),
    ) -> Result<(), SharingError> {
        if out.len() != secret_len {
            return Err(SharingError::OutputLength {
                expected: secret_len,
                actual: out.len(),
            });
        }
        let (chosen, plan) = self.chosen(shares, Target::Secret, self.share_len(secret_len))?;
        let piece_len = self.piece_len(secret_len);
        for (m, sources) in plan.outputs.iter().enumerate() {
            let start = (m * piece_len).min(secret_len);
            let end = ((m + 1) * piece_len).min(secret_len);
            gather(&chosen, sources, piece_len, &mut out[start..end], observe);
        }
        Ok(())
    }

    /// Regenerate share `lost` bit for bit from at least k other distinct shares.
    pub fn regenerate(
        &self,
        lost: usize,
        shares: &[(usize, &[u8])],
        out: &mut [u8],
    ) -> Result<(), SharingError> {
        if lost >= self.n() {
            return Err(SharingError::ShareIndex {
                index: lost,
                n: self.n(),
            });
        }
        let share_len = out.len();
        if !share_len.is_multiple_of(self.layout.pieces() * PIECE_ALIGN) {
            return Err(SharingError::ShareLength {
                index: lost,
                expected: share_len.next_multiple_of(self.layout.pieces() * PIECE_ALIGN),
                actual: share_len,
            });
        }
        let (chosen, plan) = self.chosen(shares, Target::Share(lost), share_len)?;
        let piece_len = share_len / self.layout.pieces();
        for (j, sources) in plan.outputs.iter().enumerate() {
            let dst = &mut out[j * piece_len..(j + 1) * piece_len];
            gather(&chosen, sources, piece_len, dst, &mut |_| {});
        }
        Ok(())
    }

    /// Re-randomise a complete share set in place without ever rebuilding the secret: XOR in a
    /// fresh sharing of zero. The refreshed shares rebuild the same secret, and no share of the
    /// old set combines with the new ones.
    pub fn refresh(
        &self,
        shares: &mut [&mut [u8]],
        rng: &mut dyn RandomSource,
    ) -> Result<(), SharingError> {
        let share_len = shares.first().map_or(0, |s| s.len());
        if !share_len.is_multiple_of(self.layout.pieces() * PIECE_ALIGN) {
            return Err(SharingError::ShareLength {
                index: 0,
                expected: share_len.next_multiple_of(self.layout.pieces() * PIECE_ALIGN),
                actual: share_len,
            });
        }
        self.check_share_set(shares, share_len)?;
        self.share_tiles(None, rng, shares)
    }

    fn check_share_set(&self, shares: &[&mut [u8]], share_len: usize) -> Result<(), SharingError> {
        if shares.len() != self.n() {
            return Err(SharingError::ShareCount {
                expected: self.n(),
                actual: shares.len(),
            });
        }
        match shares.iter().position(|s| s.len() != share_len) {
            Some(index) => Err(SharingError::ShareLength {
                index,
                expected: share_len,
                actual: shares[index].len(),
            }),
            None => Ok(()),
        }
    }

    /// With a secret: shares = its sharing. Without: shares ^= a sharing of zero.
    fn share_tiles(
        &self,
        secret: Option<&[u8]>,
        rng: &mut dyn RandomSource,
        shares: &mut [&mut [u8]],
    ) -> Result<(), SharingError> {
        let pieces = self.layout.pieces();
        let piece_len = shares[0].len() / pieces;
        let randoms = self.layout.random_pieces();
        SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            let tile_cap = piece_len.min(TILE);
            if scratch.random.len() < randoms * tile_cap {
                scratch.random.resize(randoms * tile_cap, 0);
            }
            if scratch.padded.len() < pieces * tile_cap {
                scratch.padded.resize(pieces * tile_cap, 0);
            }
            let result = (|| {
                for off in (0..piece_len).step_by(TILE) {
                    let tl = TILE.min(piece_len - off);
                    let random = &mut scratch.random[..randoms * tl];
                    rng.fill(random)?;
                    let random = &*random;
                    let mut secret_tiles: [&[u8]; 16] = [&[]; 16];
                    if let Some(secret) = secret {
                        for (m, pad) in scratch.padded.chunks_exact_mut(tl).take(pieces).enumerate()
                        {
                            secret_tiles[m] = secret_tile(secret, m * piece_len + off, tl, pad);
                        }
                    }
                    for (i, share) in shares.iter_mut().enumerate() {
                        for j in 0..pieces {
                            let mut sources: [&[u8]; MAX_SPLIT_TERMS] = [&[]; MAX_SPLIT_TERMS];
                            let mut count = 0;
                            for &term in self.layout.terms(i, j) {
                                sources[count] = match term {
                                    Term::Secret(_) if secret.is_none() => continue,
                                    Term::Secret(m) => secret_tiles[m as usize],
                                    Term::Random(q) => &random[q as usize * tl..][..tl],
                                };
                                count += 1;
                            }
                            let dst = &mut share[j * piece_len + off..][..tl];
                            // Ordinary (cached) stores: the shares are read again
                            // within moments (sealed, or copied into a socket). Streaming
                            // stores measured 20% slower here (docs/design.md).
                            xor_sources(dst, &sources[..count], secret.is_none());
                        }
                    }
                }
                Ok(())
            })();
            crate::wipe(&mut scratch.random);
            crate::wipe(&mut scratch.padded);
            result
        })
    }

    /// Validate the offered shares, pick the first k distinct ones sorted by index, and fetch
    /// (or solve) the plan for that subset.
    fn chosen<'a>(
        &self,
        shares: &[(usize, &'a [u8])],
        target: Target,
        share_len: usize,
    ) -> Result<(Vec<&'a [u8]>, Arc<Plan>), SharingError> {
        let k = self.k();
        if shares.len() < k {
            return Err(SharingError::TooFewShares {
                have: shares.len(),
                need: k,
            });
        }
        let mut mask = 0u32;
        for &(index, bytes) in &shares[..k] {
            if index >= self.n() {
                return Err(SharingError::ShareIndex { index, n: self.n() });
            }
            if mask & 1 << index != 0 {
                return Err(SharingError::DuplicateShare { index });
            }
            if bytes.len() != share_len {
                return Err(SharingError::ShareLength {
                    index,
                    expected: share_len,
                    actual: bytes.len(),
                });
            }
            mask |= 1 << index;
        }
        let mut sorted: Vec<(usize, &[u8])> = shares[..k].to_vec();
        sorted.sort_unstable_by_key(|s| s.0);
        let plan = self.plan(mask, target, &sorted)?;
        Ok((sorted.into_iter().map(|s| s.1).collect(), plan))
    }

    fn plan(
        &self,
        mask: u32,
        target: Target,
        sorted: &[(usize, &[u8])],
    ) -> Result<Arc<Plan>, SharingError> {
        if let Some(plan) = self.plans.read().expect("plan cache").get(&(mask, target)) {
            return Ok(plan.clone());
        }
        let subset: Vec<usize> = sorted.iter().map(|s| s.0).collect();
        let plan = plan::solve(&self.layout, &subset, target).ok_or(SharingError::Unsolvable {
            subset: subset.clone(),
        })?;
        let plan = Arc::new(plan);
        self.plans
            .write()
            .expect("plan cache")
            .insert((mask, target), plan.clone());
        Ok(plan)
    }
}

/// The tile of secret piece bytes at `start`, zero-padded past the secret's end (copied into
/// `pad` only when the tile crosses the end).
fn secret_tile<'a>(secret: &'a [u8], start: usize, len: usize, pad: &'a mut [u8]) -> &'a [u8] {
    if start + len <= secret.len() {
        return &secret[start..start + len];
    }
    let have = secret.len().saturating_sub(start);
    pad[..have].copy_from_slice(&secret[start.min(secret.len())..]);
    pad[have..].fill(0);
    pad
}

/// Most sources one output piece can have in a combine: every received piece, k(p-1) <= 16*16.
const MAX_PLAN_SOURCES: usize = 256;

/// `dst` = XOR of the planned source pieces, tile by tile; `dst` may be shorter than a piece
/// (the secret's last piece).
fn gather(
    chosen: &[&[u8]],
    sources: &[(u8, u8)],
    piece_len: usize,
    dst: &mut [u8],
    observe: &mut dyn FnMut(&[u8]),
) {
    let mut tile_sources: [&[u8]; MAX_PLAN_SOURCES] = [&[]; MAX_PLAN_SOURCES];
    for (t, dst_tile) in dst.chunks_mut(TILE).enumerate() {
        let off = t * TILE;
        for (slot, &(pos, j)) in tile_sources.iter_mut().zip(sources) {
            *slot = &chosen[pos as usize][j as usize * piece_len + off..][..dst_tile.len()];
        }
        xor_sources(dst_tile, &tile_sources[..sources.len()], false);
        observe(dst_tile);
    }
}
