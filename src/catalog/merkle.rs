//! The per-file Merkle tree over chunk hashes (pure).
//!
//! As in RFC 6962: a leaf is `SHA-256(0x00 || chunk plaintext)`, an inner node
//! `SHA-256(0x01 || left || right)`, a node without a sibling is promoted unchanged, and the root
//! of an empty file is the SHA-256 of the empty string. The domain bytes keep a chunk from ever
//! passing for an inner node or the empty root.
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

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
