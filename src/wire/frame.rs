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
//! The frame uses the key range `[key_offset, key_offset + 32 + payload_len)`: 32 bytes of
//! one-time MAC key, then the pad.
use std::ops::Range;

pub const MAGIC: [u8; 4] = *b"QGLF";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 40;
pub const TAG_LEN: usize = 16;
/// One-time MAC key bytes at the start of every frame's key range (`H` then `s`).
pub const MAC_KEY_LEN: u64 = 32;
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

    /// Key bytes this frame uses: `[key_offset, key_offset + 32 + payload_len)`.
    pub fn key_range(&self) -> Result<Range<u64>, FrameError> {
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

/// Key bytes needed to seal a payload of `payload_len` bytes.
pub fn key_len_for(payload_len: u64) -> Option<u64> {
    payload_len.checked_add(MAC_KEY_LEN)
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
        fn header_round_trips(id in any::<[u8; 16]>(), off in 0u64..u64::MAX / 2, len in 0u64..5000) {
            let h = FrameHeader { stream_id: id, key_offset: off, payload_len: len };
            prop_assert_eq!(FrameHeader::parse_frame(&frame(&h)), Ok(h));
        }

        #[test]
        fn prefix_agrees_with_whole_frame(id in any::<[u8; 16]>(), off in 0u64..u64::MAX / 2, len in 0u64..5000) {
            let h = FrameHeader { stream_id: id, key_offset: off, payload_len: len };
            prop_assert_eq!(FrameHeader::parse_prefix(&h.encode(), 5000), Ok(h));
            prop_assert!(FrameHeader::parse_prefix(&h.encode(), len.saturating_sub(1)).is_err() || len == 0);
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
            key_offset: 7,
            payload_len: 3,
        };
        let good = frame(&h);
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
        f[4] = 2;
        assert_eq!(
            FrameHeader::parse_frame(&f),
            Err(FrameError::UnsupportedVersion { found: 2 })
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
            key_offset: u64::MAX - 10,
            ..h
        };
        assert!(matches!(
            FrameHeader::parse_frame(&frame(&big)),
            Err(FrameError::KeyRangeOverflow { .. })
        ));
    }
}
