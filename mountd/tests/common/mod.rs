//! Helpers shared by the integration tests.
#![allow(dead_code)]

use qgenome_mountd::layout::{ShareKey, ShareMeta};

/// Deterministic bytes for a (seed, key): lets a parent verify what a child process wrote.
pub fn share_bytes(seed: u64, key: &ShareKey, len: usize) -> Vec<u8> {
    let mut x = seed ^ key.chunk.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(key.share) << 56;
    for b in key.file_id {
        x = x.rotate_left(8) ^ u64::from(b);
    }
    x |= 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn key(file: u8, chunk: u64, share: u8) -> ShareKey {
    let mut file_id = [0u8; 16];
    file_id[0] = file;
    file_id[15] = 0xF1;
    ShareKey {
        file_id,
        chunk,
        share,
    }
}

pub const META: ShareMeta = ShareMeta {
    k: 2,
    n: 3,
    secret_len: 1 << 20,
};
