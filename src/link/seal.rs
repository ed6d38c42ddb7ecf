//! Sealing and opening of frames: one-time pad + Wegman–Carter POLYVAL tag. Pure: the key
//! comes in through a [`FrameKey`], so these functions do no I/O themselves and can be
//! tested with in-memory key.
//!
//! Key range of a frame: `[off, off + 32 + len)`. Bytes 0..16 are the POLYVAL key `H`,
//! 16..32 the one-time mask `s`, the rest the pad. Tag =
//! `POLYVAL_H(header || 0-pad || ciphertext || 0-pad || le64(header bits) || le64(ct bits)) ^ s`.
//!
//! XOR and MAC are fused per `CHUNK` bytes: the pad of a chunk is read by the key source
//! straight into `out` (where the result goes), the data is XORed into it, and the chunk is
//! hashed while still in cache. No other copy of the pad is made.
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::polyval::Polyval;
use crate::wire::frame::{FrameHeader, HEADER_LEN, MAC_KEY_LEN, TAG_LEN};

/// Bytes processed at a time (fits in L2 together with the pad it meets).
pub const CHUNK: usize = 128 * 1024;

/// The key range of one frame; offsets are relative to the start of the range.
pub trait FrameKey {
    type Error;
    /// Copy key bytes into `buf` (the MAC key, and each chunk's pad, read straight into the
    /// output buffer).
    fn read(&mut self, rel: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}

/// Key held in a slice (tests, benchmarks).
impl FrameKey for &[u8] {
    type Error = std::convert::Infallible;
    fn read(&mut self, rel: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        buf.copy_from_slice(&self[rel as usize..rel as usize + buf.len()]);
        Ok(())
    }
}

/// Why sealing or opening failed. `E` is the error of the key source.
#[derive(Debug)]
pub enum SealError<E> {
    /// Reading key failed.
    Key(E),
    /// The frame's MAC key reads as zeros: that key was destroyed (used before).
    KeyDestroyed,
    /// The tag does not match: the frame was altered or forged.
    BadTag,
}

/// Seal `payload` under `header` into `out` (resized to the frame, capacity reused). On error `out`
/// is wiped.
pub fn seal<K: FrameKey>(
    header: &FrameHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
    key: &mut K,
) -> Result<(), SealError<K::Error>> {
    debug_assert_eq!(header.payload_len, payload.len() as u64);
    let (mut mac, s) = mac_init(key)?;
    let hdr = header.encode();
    // Sized without clearing: every byte is overwritten below, and a buffer reused for frames
    // of one size is never memset.
    out.resize(header.frame_len(), 0);
    out[..HEADER_LEN].copy_from_slice(&hdr);
    mac.update_padded(&hdr);
    for (i, p) in payload.chunks(CHUNK).enumerate() {
        let at = HEADER_LEN + i * CHUNK;
        let c = &mut out[at..at + p.len()];
        if let Err(e) = key.read(MAC_KEY_LEN + (i * CHUNK) as u64, c) {
            out.zeroize();
            return Err(SealError::Key(e));
        }
        xor_into(c, p);
        mac.update_padded(c);
    }
    let tag = finish(mac, &s, payload.len());
    out[HEADER_LEN + payload.len()..].copy_from_slice(&tag);
    Ok(())
}

/// Open a whole `frame` whose header was parsed into `header`: verify its tag and write the
/// payload into `out` (resized to the payload). On any failure `out` is wiped (its whole capacity
/// zeroized) before returning, so no plaintext of an unauthenticated frame is ever handed out.
pub fn open<K: FrameKey>(
    header: &FrameHeader,
    frame: &[u8],
    out: &mut Vec<u8>,
    key: &mut K,
) -> Result<(), SealError<K::Error>> {
    let len = header.payload_len as usize;
    debug_assert_eq!(frame.len(), header.frame_len());
    let (mut mac, s) = mac_init(key)?;
    mac.update_padded(&frame[..HEADER_LEN]);
    let ct = &frame[HEADER_LEN..HEADER_LEN + len];
    let got_tag = &frame[HEADER_LEN + len..];
    out.resize(len, 0);
    for (i, c) in ct.chunks(CHUNK).enumerate() {
        mac.update_padded(c);
        let p = &mut out[i * CHUNK..i * CHUNK + c.len()];
        if let Err(e) = key.read(MAC_KEY_LEN + (i * CHUNK) as u64, p) {
            out.zeroize();
            return Err(SealError::Key(e));
        }
        xor_into(p, c);
    }
    let want = finish(mac, &s, len);
    if bool::from(want.ct_eq(got_tag)) {
        Ok(())
    } else {
        out.zeroize();
        Err(SealError::BadTag)
    }
}

/// POLYVAL keyed with `H` and the one-time mask `s`.
type MacState = (Polyval, Zeroizing<[u8; 16]>);

fn mac_init<K: FrameKey>(key: &mut K) -> Result<MacState, SealError<K::Error>> {
    let mut mk = Zeroizing::new([0u8; MAC_KEY_LEN as usize]);
    key.read(0, &mut mk[..]).map_err(SealError::Key)?;
    // Destroyed key reads as zeros; H = 0, s = 0 would make every tag 0.
    if bool::from(mk.ct_eq(&[0u8; MAC_KEY_LEN as usize])) {
        return Err(SealError::KeyDestroyed);
    }
    let h: &[u8; 16] = mk[..16].try_into().expect("16 bytes");
    let s = Zeroizing::new(<[u8; 16]>::try_from(&mk[16..32]).expect("16 bytes"));
    Ok((Polyval::new(h), s))
}

fn finish(mac: Polyval, s: &[u8; 16], ct_len: usize) -> [u8; TAG_LEN] {
    let mut mac = mac;
    let mut lens = [0u8; 16];
    lens[..8].copy_from_slice(&((HEADER_LEN as u64) * 8).to_le_bytes());
    lens[8..].copy_from_slice(&((ct_len as u64) * 8).to_le_bytes());
    mac.update_blocks(&lens);
    let mut tag = mac.finalize();
    for (t, m) in tag.iter_mut().zip(s) {
        *t ^= m;
    }
    tag
}

/// `dst ^= src`, written so the compiler vectorises it.
#[inline]
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    let mut d = dst.chunks_exact_mut(64);
    let mut s = src.chunks_exact(64);
    for (d, s) in (&mut d).zip(&mut s) {
        for (a, b) in d.iter_mut().zip(s) {
            *a ^= *b;
        }
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a ^= *b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn round_trip_and_every_bit_flip_fails() {
        let payload: Vec<u8> = (0..64u8).collect();
        let h = FrameHeader {
            stream_id: [9; 16],
            key_offset: 0,
            payload_len: 64,
        };
        let k = key(32 + 64, 5);
        let mut frame = Vec::new();
        seal(&h, &payload, &mut frame, &mut &k[..]).unwrap();
        assert_ne!(&frame[HEADER_LEN..HEADER_LEN + 64], &payload[..]);
        let mut out = Vec::new();
        open(&h, &frame, &mut out, &mut &k[..]).unwrap();
        assert_eq!(out, payload);
        for bit in HEADER_LEN * 8..frame.len() * 8 {
            let mut f = frame.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            let r = open(&h, &f, &mut out, &mut &k[..]);
            assert!(matches!(r, Err(SealError::BadTag)), "bit {bit}");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn zero_mac_key_is_refused() {
        let h = FrameHeader {
            stream_id: [9; 16],
            key_offset: 0,
            payload_len: 4,
        };
        let k = [0u8; 36];
        let mut frame = Vec::new();
        let r = seal(&h, b"abcd", &mut frame, &mut &k[..]);
        assert!(matches!(r, Err(SealError::KeyDestroyed)));
    }
}
