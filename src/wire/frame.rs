//! The header of a sealed link frame (see `docs/design.md` ("Links")).
//!
//! ```text
//! offset size field
//!      0    4 magic "QGLF"
//!      4    1 format version (1)
//!      5    3 reserved, zero
//!      8   16 stream id (from the pool header of the link direction)
//!     24    8 key offset, u64 LE (relative to the start of the stream's key)
//!     32    8 payload length, u64 LE
//!     40    . ciphertext (payload XOR pad), then a 16-byte tag
//! ```
//! A stream's key is cut into blocks of [`KEY_BLOCK`] bytes, and the first [`MAC_KEY_LEN`]
//! bytes of every block are a MAC key slot, never pad. A frame starts on a block
//! (`key_offset` a multiple of [`KEY_BLOCK`]) and uses whole blocks: the slot of its first
//! block is its one-time MAC key, its pad is the rest of every block it uses, and the slots of
//! its other blocks go unused (destroyed with the frame). So no byte that was ever pad, and
//! could be learnt from a frame whose plaintext is known, can be claimed as another frame's
//! MAC key by a forged header (docs/design.md, "Links": key slots).
use std::ops::Range;

pub const MAGIC: [u8; 4] = *b"QGLF";
/// 2: frames on key blocks with MAC key slots (1 took its MAC key wherever it started).
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 40;
pub const TAG_LEN: usize = 16;
/// One-time MAC key bytes at the start of every key block (`H` then `s`).
pub const MAC_KEY_LEN: u64 = 32;
/// Frames start on, and use whole, blocks of this many key bytes.
pub const KEY_BLOCK: u64 = 4096;
/// Pad bytes in one key block (the rest is its MAC key slot).
pub const PAD_PER_BLOCK: u64 = KEY_BLOCK - MAC_KEY_LEN;
/// Largest payload a frame may carry; larger declared lengths are rejected before any work.
pub const MAX_PAYLOAD_LEN: u64 = 1 << 30;

/// Why a byte string is not a well-formed frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {len} bytes is shorter than header + tag ({min} bytes)")]
    TooShort { len: usize, min: usize },
    #[error("bad frame magic {found:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("frame format version {found} is not supported (this build reads {VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("reserved frame header bytes are not zero")]
    ReservedNotZero,
    #[error("declared payload length {declared} exceeds the maximum {MAX_PAYLOAD_LEN}")]
    PayloadTooLarge { declared: u64 },
    #[error("declared payload length {declared} but the frame carries {actual} bytes")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("key range of the frame overflows (offset {key_offset}, payload {payload_len})")]
    KeyRangeOverflow { key_offset: u64, payload_len: u64 },
    #[error("key offset {key_offset} is not on a key block of {KEY_BLOCK} bytes")]
    KeyOffsetMisaligned { key_offset: u64 },
}

/// The parsed, fixed-size frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub stream_id: [u8; 16],
    pub key_offset: u64,
    pub payload_len: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[8..24].copy_from_slice(&self.stream_id);
        b[24..32].copy_from_slice(&self.key_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Parse the header of a whole frame and check that the frame's length matches it.
    pub fn parse_frame(frame: &[u8]) -> Result<Self, FrameError> {
        let min = HEADER_LEN + TAG_LEN;
        if frame.len() < min {
            return Err(FrameError::TooShort {
                len: frame.len(),
                min,
            });
        }
        let magic: [u8; 4] = frame[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if frame[4] != VERSION {
            return Err(FrameError::UnsupportedVersion { found: frame[4] });
        }
        if frame[5..8] != [0, 0, 0] {
            return Err(FrameError::ReservedNotZero);
        }
        let h = Self {
            stream_id: frame[8..24].try_into().expect("16 bytes"),
            key_offset: u64::from_le_bytes(frame[24..32].try_into().expect("8 bytes")),
            payload_len: u64::from_le_bytes(frame[32..40].try_into().expect("8 bytes")),
        };
        if h.payload_len > MAX_PAYLOAD_LEN {
            return Err(FrameError::PayloadTooLarge {
                declared: h.payload_len,
            });
        }
        let actual = (frame.len() - min) as u64;
        if actual != h.payload_len {
            return Err(FrameError::LengthMismatch {
                declared: h.payload_len,
                actual,
            });
        }
        h.key_range()?;
        Ok(h)
    }

    /// Parse only the fixed header (first [`HEADER_LEN`] bytes) of a frame arriving on a
    /// stream, before its body is read: magic, version, reserved bytes, and a payload length
    /// of at most `max_payload` (so a hostile length is refused before anything is
    /// allocated). [`FrameHeader::parse_frame`] still checks the whole frame afterwards.
    pub fn parse_prefix(prefix: &[u8; HEADER_LEN], max_payload: u64) -> Result<Self, FrameError> {
        let magic: [u8; 4] = prefix[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if prefix[4] != VERSION {
            return Err(FrameError::UnsupportedVersion { found: prefix[4] });
        }
        if prefix[5..8] != [0, 0, 0] {
            return Err(FrameError::ReservedNotZero);
        }
        let h = Self {
            stream_id: prefix[8..24].try_into().expect("16 bytes"),
            key_offset: u64::from_le_bytes(prefix[24..32].try_into().expect("8 bytes")),
            payload_len: u64::from_le_bytes(prefix[32..40].try_into().expect("8 bytes")),
        };
        if h.payload_len > max_payload.min(MAX_PAYLOAD_LEN) {
            return Err(FrameError::PayloadTooLarge {
                declared: h.payload_len,
            });
        }
        h.key_range()?;
        Ok(h)
    }

    /// Key bytes this frame uses: the whole blocks from `key_offset` that hold its MAC key
    /// and its pad ([`key_len_for`]).
    pub fn key_range(&self) -> Result<Range<u64>, FrameError> {
        if !self.key_offset.is_multiple_of(KEY_BLOCK) {
            return Err(FrameError::KeyOffsetMisaligned {
                key_offset: self.key_offset,
            });
        }
        let end = key_len_for(self.payload_len)
            .and_then(|n| self.key_offset.checked_add(n))
            .ok_or(FrameError::KeyRangeOverflow {
                key_offset: self.key_offset,
                payload_len: self.payload_len,
            })?;
        Ok(self.key_offset..end)
    }

    /// Total length of the sealed frame.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize + TAG_LEN
    }
}

/// Key bytes a frame of `payload_len` bytes uses: whole blocks, at least one, with
/// [`PAD_PER_BLOCK`] bytes of pad each.
pub fn key_len_for(payload_len: u64) -> Option<u64> {
    payload_len
        .div_ceil(PAD_PER_BLOCK)
        .max(1)
        .checked_mul(KEY_BLOCK)
}

/// Where in its key range (relative to the range's start) the frame's key byte `rel` lies,
/// counting its key as the MAC key (`rel` below [`MAC_KEY_LEN`]) followed by its pad; and how
/// many key bytes from there lie together before the next slot.
pub fn key_position(rel: u64) -> (u64, u64) {
    if rel < MAC_KEY_LEN {
        return (rel, MAC_KEY_LEN - rel);
    }
    let p = rel - MAC_KEY_LEN;
    let (block, within) = (p / PAD_PER_BLOCK, p % PAD_PER_BLOCK);
    (
        block * KEY_BLOCK + MAC_KEY_LEN + within,
        PAD_PER_BLOCK - within,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(h: &FrameHeader) -> Vec<u8> {
        let mut f = h.encode().to_vec();
        f.resize(h.frame_len(), 0);
        f
    }

    proptest! {
        #[test]
        fn header_round_trips(id in any::<[u8; 16]>(), block in 0u64..u64::MAX / 2 / KEY_BLOCK, len in 0u64..5000) {
            let h = FrameHeader { stream_id: id, key_offset: block * KEY_BLOCK, payload_len: len };
            prop_assert_eq!(FrameHeader::parse_frame(&frame(&h)), Ok(h));
        }

        #[test]
        fn prefix_agrees_with_whole_frame(id in any::<[u8; 16]>(), block in 0u64..u64::MAX / 2 / KEY_BLOCK, len in 0u64..5000) {
            let h = FrameHeader { stream_id: id, key_offset: block * KEY_BLOCK, payload_len: len };
            prop_assert_eq!(FrameHeader::parse_prefix(&h.encode(), 5000), Ok(h));
            prop_assert!(FrameHeader::parse_prefix(&h.encode(), len.saturating_sub(1)).is_err() || len == 0);
        }

        /// Key positions: the MAC key first, then pad that never touches a slot; every
        /// position inside the frame's range, each used once.
        #[test]
        fn pad_never_touches_a_slot(len in 0u64..20_000) {
            let range = key_len_for(len).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            let mut rel = 0;
            while rel < MAC_KEY_LEN + len {
                let (at, run) = key_position(rel);
                prop_assert!(run > 0);
                let n = run.min(MAC_KEY_LEN + len - rel);
                for i in 0..n {
                    let pos = at + i;
                    prop_assert!(pos < range);
                    prop_assert_eq!(pos % KEY_BLOCK < MAC_KEY_LEN, rel + i < MAC_KEY_LEN, "{} at {}", rel + i, pos);
                    prop_assert!(seen.insert(pos));
                }
                rel += n;
            }
            // No block more than the pad needs.
            prop_assert!(range == KEY_BLOCK || (range / KEY_BLOCK - 1) * PAD_PER_BLOCK < len);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = FrameHeader::parse_frame(&bytes);
        }
    }

    #[test]
    fn malformed_headers_are_named() {
        let h = FrameHeader {
            stream_id: [1; 16],
            key_offset: 7 * KEY_BLOCK,
            payload_len: 3,
        };
        let good = frame(&h);
        let mut f = good.clone();
        f[24] = 7;
        assert_eq!(
            FrameHeader::parse_frame(&f),
            Err(FrameError::KeyOffsetMisaligned {
                key_offset: 7 * KEY_BLOCK + 7
            })
        );
        assert!(matches!(
            FrameHeader::parse_frame(&good[..HEADER_LEN]),
            Err(FrameError::TooShort { .. })
        ));
        let mut f = good.clone();
        f[0] ^= 1;
        assert!(matches!(
            FrameHeader::parse_frame(&f),
            Err(FrameError::BadMagic { .. })
        ));
        let mut f = good.clone();
        f[4] = 1;
        assert_eq!(
            FrameHeader::parse_frame(&f),
            Err(FrameError::UnsupportedVersion { found: 1 })
        );
        let mut f = good.clone();
        f[6] = 1;
        assert_eq!(
            FrameHeader::parse_frame(&f),
            Err(FrameError::ReservedNotZero)
        );
        let mut f = good.clone();
        f.pop();
        assert!(matches!(
            FrameHeader::parse_frame(&f),
            Err(FrameError::LengthMismatch {
                declared: 3,
                actual: 2
            })
        ));
        let mut f = good.clone();
        f[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            FrameHeader::parse_frame(&f),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        let big = FrameHeader {
            key_offset: u64::MAX / KEY_BLOCK * KEY_BLOCK,
            ..h
        };
        assert!(matches!(
            FrameHeader::parse_frame(&frame(&big)),
            Err(FrameError::KeyRangeOverflow { .. })
        ));
    }
}
