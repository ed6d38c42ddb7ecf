//! The per-file Merkle tree over chunk hashes (pure).
//!
//! As in RFC 6962: an inner node is `SHA-256(0x01 || left || right)`, a node without a sibling
//! is promoted unchanged, and the root of an empty file is the SHA-256 of the empty string. A
//! leaf, the hash of one chunk, is computed one of two ways ([`LeafHash`], fixed per version):
//! `SHA-256(0x00 || chunk plaintext)` for versions written before pieces were hashed side by
//! side, else `SHA-256(0x02 || h_0 || h_1 || ...)` where `h_i = SHA-256(0x00 || piece_i)` over
//! the chunk's [`PIECE`]-byte pieces (the last may be shorter; an empty chunk has no piece).
//! The domain bytes keep a chunk or a piece from ever passing for an inner node, for the other
//! kind of leaf, or for the empty root.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The piece size of [`LeafHash::Pieces`]: a 1 MiB chunk is 16 pieces, which SIMD lanes hash
/// side by side (one SHA-256 stream is serial: SHA-NI runs it at about 1.5 GB/s here, 16
/// lanes at about 3 GB/s).
pub const PIECE: usize = 64 << 10;

/// How a version's chunk hashes (its Merkle leaves) are computed. Stored in its catalog record
/// and its manifest; absent means [`LeafHash::Whole`], so records and manifests written before
/// the pieces read as they were.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeafHash {
    /// `SHA-256(0x00 || chunk)`: one serial stream.
    #[default]
    Whole,
    /// `SHA-256(0x02 || SHA-256(0x00 || piece_0) || ...)` over [`PIECE`]-byte pieces, hashed
    /// side by side: what new versions use.
    Pieces,
}

impl LeafHash {
    /// The leaf hash of new versions.
    pub const CURRENT: Self = Self::Pieces;

    pub fn is_whole(&self) -> bool {
        *self == Self::Whole
    }

    /// The hash of one chunk's plaintext.
    pub fn hash(self, data: &[u8]) -> Hash {
        match self {
            Self::Whole => chunk_hash(data),
            Self::Pieces => pieces_hash(data),
        }
    }
}

/// [`LeafHash::Pieces`] of `data`.
fn pieces_hash(data: &[u8]) -> Hash {
    let pieces: Vec<&[u8]> = data.chunks(PIECE).collect();
    let mut digests = vec![[0u8; 32]; pieces.len()];
    tape_sha256::hash_many_prefixed(&[0u8], &pieces, &mut digests);
    let mut h = Sha256::new();
    h.update([2u8]);
    for d in &digests {
        h.update(d);
    }
    h.finalize().into()
}

/// [`LeafHash::Whole`] of `data`.
pub fn chunk_hash(data: &[u8]) -> Hash {
    let mut h = ChunkHasher::new();
    h.update(data);
    h.finish()
}

/// [`chunk_hash`] of a chunk fed in pieces, in order (each while it is in cache, say).
pub struct ChunkHasher(Sha256);

impl ChunkHasher {
    pub fn new() -> Self {
        let mut h = Sha256::new();
        h.update([0u8]);
        Self(h)
    }

    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    pub fn finish(self) -> Hash {
        self.0.finalize().into()
    }
}

impl Default for ChunkHasher {
    fn default() -> Self {
        Self::new()
    }
}

pub fn root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return Sha256::digest([]).into();
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => {
                    let mut h = Sha256::new();
                    h.update([1u8]);
                    h.update(l);
                    h.update(r);
                    h.finalize().into()
                }
                [single] => *single,
                _ => unreachable!(),
            })
            .collect();
    }
    level[0]
}

/// Lower-case hex, for logs and JSON (hashes are not secret; plaintext never goes through here).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_hash_in_pieces_is_chunk_hash() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 13) as u8).collect();
        let mut h = ChunkHasher::new();
        for piece in data.chunks(8191) {
            h.update(piece);
        }
        assert_eq!(h.finish(), chunk_hash(&data));
        // RFC 6962 leaf: SHA-256(0x00 || data).
        let mut prefixed = vec![0u8];
        prefixed.extend_from_slice(&data);
        assert_eq!(
            chunk_hash(&data),
            <[u8; 32]>::from(Sha256::digest(&prefixed))
        );
    }

    /// The side-by-side piece hashes are plain SHA-256 (checked against `sha2`, one piece at
    /// a time), at lengths around the piece boundaries, at a full chunk, and at every piece
    /// count from 0 to 19 with a full and a short last piece: the hashing kernels take the
    /// pieces in groups (4 lanes, 16 lanes, a partly filled group for the rest), and each
    /// count fills them differently.
    #[test]
    fn pieces_hash_is_sha256_of_the_pieces_sha256() {
        let data: Vec<u8> = (0..19 * PIECE as u32 + 70_000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let want = |d: &[u8]| -> Hash {
            let mut top = Sha256::new();
            top.update([2u8]);
            for piece in d.chunks(PIECE) {
                let mut h = Sha256::new();
                h.update([0u8]);
                h.update(piece);
                top.update(h.finalize());
            }
            top.finalize().into()
        };
        for len in [
            0,
            1,
            55,
            64,
            PIECE - 1,
            PIECE,
            PIECE + 1,
            3 * PIECE + 17,
            15 * PIECE + 1,
            1 << 20,
            (1 << 20) + 1,
            data.len(),
        ]
        .into_iter()
        .chain((1..=19).flat_map(|pieces| [pieces * PIECE, pieces * PIECE - 4097]))
        {
            let d = &data[..len];
            assert_eq!(LeafHash::Pieces.hash(d), want(d), "length {len}");
        }
        assert_eq!(LeafHash::Whole.hash(&data), chunk_hash(&data));
        // The two kinds of leaf differ, also for an empty chunk.
        for len in [0, 1, PIECE, 1 << 20] {
            let d = &data[..len];
            assert_ne!(
                LeafHash::Pieces.hash(d),
                LeafHash::Whole.hash(d),
                "length {len}"
            );
        }
    }

    /// A changed byte anywhere in any piece changes the leaf.
    #[test]
    fn pieces_hash_changes_with_any_byte() {
        let mut data = vec![7u8; (1 << 20) - 3];
        let leaf = LeafHash::Pieces.hash(&data);
        for at in [0, PIECE - 1, PIECE, 9 * PIECE + 5, data.len() - 1] {
            data[at] ^= 0x10;
            assert_ne!(LeafHash::Pieces.hash(&data), leaf, "byte {at}");
            data[at] ^= 0x10;
        }
        assert_eq!(LeafHash::Pieces.hash(&data), leaf);
    }

    #[test]
    fn leaf_hash_serializes_by_name_and_defaults_to_whole() {
        assert_eq!(
            serde_json::to_string(&LeafHash::Pieces).unwrap(),
            "\"pieces\""
        );
        assert_eq!(LeafHash::default(), LeafHash::Whole);
    }

    #[test]
    fn root_changes_with_any_leaf_and_with_order() {
        let leaves: Vec<Hash> = (0u8..5).map(|i| chunk_hash(&[i])).collect();
        let r = root(&leaves);
        for i in 0..5 {
            let mut altered = leaves.clone();
            altered[i][0] ^= 1;
            assert_ne!(root(&altered), r, "leaf {i}");
        }
        let mut swapped = leaves.clone();
        swapped.swap(1, 2);
        assert_ne!(root(&swapped), r);
        assert_ne!(root(&leaves[..4]), r);
        assert_eq!(root(&leaves[..1]), leaves[0]);
        assert_ne!(root(&[]), root(&leaves[..1]));
    }
}
