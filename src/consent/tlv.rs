//! BER-TLV as used by PIV (NIST SP 800-73-4 part 2, ISO/IEC 7816-4 annex D): pure, no I/O.
//!
//! Tags are 1 to 3 bytes (`7C`, `5F2F`, `5FC102`); lengths are short (`00`..`7F`) or long with
//! `81 xx`, `82 xx xx` or `83 xx xx xx`. Indefinite lengths (`80`) never occur in PIV and are
//! refused. Decoding borrows from the input; encoding always writes the minimal length form.

use thiserror::Error;

/// A BER tag of 1 to 3 bytes, stored as its big-endian value (`0x5FC102`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(u32);

impl Tag {
    /// Dynamic authentication template (GENERAL AUTHENTICATE).
    pub const DYN_AUTH: Tag = Tag(0x7C);
    /// Data object wrapper of GET DATA / PUT DATA answers.
    pub const DATA: Tag = Tag(0x53);
    /// Tag list of GET DATA / PUT DATA commands.
    pub const TAG_LIST: Tag = Tag(0x5C);

    /// A tag from its big-endian value; `None` unless the value is a well-formed BER tag of 1 to
    /// 3 bytes (multi-byte tags start with low bits `1F`, continuation bytes carry bit 8 except
    /// the last).
    pub const fn new(value: u32) -> Option<Tag> {
        let bytes = value.to_be_bytes();
        let ok = if value <= 0xFF {
            (bytes[3] & 0x1F) != 0x1F
        } else if value <= 0xFFFF {
            (bytes[2] & 0x1F) == 0x1F && (bytes[3] & 0x80) == 0
        } else if value <= 0xFF_FFFF {
            (bytes[1] & 0x1F) == 0x1F && (bytes[2] & 0x80) != 0 && (bytes[3] & 0x80) == 0
        } else {
            false
        };
        if ok {
            Some(Tag(value))
        } else {
            None
        }
    }

    /// Like [`Tag::new`] for constants; panics (at compile time in const context) on a bad tag.
    pub const fn from_const(value: u32) -> Tag {
        match Tag::new(value) {
            Some(t) => t,
            None => panic!("malformed BER tag"),
        }
    }

    /// The tag's big-endian value.
    pub const fn value(self) -> u32 {
        self.0
    }

    /// Number of bytes the tag takes on the wire.
    pub const fn len(self) -> usize {
        if self.0 <= 0xFF {
            1
        } else if self.0 <= 0xFFFF {
            2
        } else {
            3
        }
    }

    /// Always false: a tag takes at least one byte. (Present for clippy's `len_without_is_empty`.)
    pub const fn is_empty(self) -> bool {
        false
    }

    /// The tag bytes as they go on the wire.
    pub fn to_bytes(self) -> Vec<u8> {
        self.0.to_be_bytes()[4 - self.len()..].to_vec()
    }

    /// Whether the constructed bit (0x20 of the first byte) is set.
    pub const fn is_constructed(self) -> bool {
        let first = (self.0 >> (8 * (self.len() as u32 - 1))) & 0xFF;
        first & 0x20 != 0
    }
}

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tag({:0width$X})", self.0, width = self.len() * 2)
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:0width$X}", self.0, width = self.len() * 2)
    }
}

/// Why a byte string is not BER-TLV. Offsets count from the start of the parsed slice.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlvError {
    #[error("TLV truncated at offset {offset}: need {needed} more byte(s) for the {part}")]
    Truncated {
        offset: usize,
        needed: usize,
        part: &'static str,
    },
    #[error("TLV tag at offset {offset} is longer than 3 bytes")]
    TagTooLong { offset: usize },
    #[error("TLV at offset {offset} uses the indefinite length form (80), not allowed in PIV")]
    IndefiniteLength { offset: usize },
    #[error("TLV length at offset {offset} uses {bytes} length bytes (at most 3 supported)")]
    LengthTooLong { offset: usize, bytes: usize },
    #[error("TLV value of {len} bytes too long to encode (at most 16 MiB - 1)")]
    ValueTooLong { len: usize },
    #[error("expected tag {expected} at offset {offset}, found {found}")]
    UnexpectedTag {
        offset: usize,
        expected: Tag,
        found: Tag,
    },
    #[error("tag {tag} missing")]
    Missing { tag: Tag },
    /// A tag whose value must have one length (a digest, a cipher block) has another.
    #[error("tag {tag} holds {len} byte(s), not {expected}")]
    WrongLength {
        tag: Tag,
        len: usize,
        expected: usize,
    },
    #[error("{extra} trailing byte(s) after the TLV at offset {offset}")]
    Trailing { offset: usize, extra: usize },
}

/// One decoded TLV, borrowing its value from the input.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub tag: Tag,
    pub value: &'a [u8],
}

impl std::fmt::Debug for Tlv<'_> {
    // Values may be key or patient material: show only tag and length.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tlv({}, {} bytes)", self.tag, self.value.len())
    }
}

impl<'a> Tlv<'a> {
    /// The TLVs directly inside this one's value.
    pub fn children(&self) -> Result<Vec<Tlv<'a>>, TlvError> {
        parse_all(self.value)
    }

    /// The first direct child with `tag`.
    pub fn child(&self, tag: Tag) -> Result<Tlv<'a>, TlvError> {
        find(self.value, tag)
    }
}

/// Reads a tag at `input[0..]`; returns it and the bytes it took.
fn parse_tag(input: &[u8], offset: usize) -> Result<(Tag, usize), TlvError> {
    let first = *input.first().ok_or(TlvError::Truncated {
        offset,
        needed: 1,
        part: "tag",
    })?;
    if first & 0x1F != 0x1F {
        return Ok((Tag(u32::from(first)), 1));
    }
    let mut value = u32::from(first);
    for i in 1..=3 {
        let b = *input.get(i).ok_or(TlvError::Truncated {
            offset: offset + i,
            needed: 1,
            part: "tag",
        })?;
        if i == 3 {
            return Err(TlvError::TagTooLong { offset });
        }
        value = (value << 8) | u32::from(b);
        if b & 0x80 == 0 {
            return Ok((Tag(value), i + 1));
        }
    }
    unreachable!("loop returns by i == 3")
}

/// Reads a length at `input[0..]`; returns it and the bytes it took.
fn parse_len(input: &[u8], offset: usize) -> Result<(usize, usize), TlvError> {
    let first = *input.first().ok_or(TlvError::Truncated {
        offset,
        needed: 1,
        part: "length",
    })?;
    match first {
        0x00..=0x7F => Ok((usize::from(first), 1)),
        0x80 => Err(TlvError::IndefiniteLength { offset }),
        0x81..=0x83 => {
            let n = usize::from(first & 0x7F);
            let bytes = input.get(1..1 + n).ok_or_else(|| TlvError::Truncated {
                offset: offset + 1,
                needed: 1 + n - input.len(),
                part: "length",
            })?;
            let len = bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            Ok((len, 1 + n))
        }
        _ => Err(TlvError::LengthTooLong {
            offset,
            bytes: usize::from(first & 0x7F),
        }),
    }
}

/// Parses one TLV at the start of `input` (`offset` is only used in error messages); returns it
/// and the rest of the input.
pub fn parse_one_at(input: &[u8], offset: usize) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    let (tag, tag_len) = parse_tag(input, offset)?;
    let (len, len_len) = parse_len(&input[tag_len..], offset + tag_len)?;
    let start = tag_len + len_len;
    let avail = input.len() - start;
    if len > avail {
        return Err(TlvError::Truncated {
            offset: offset + start,
            needed: len - avail,
            part: "value",
        });
    }
    Ok((
        Tlv {
            tag,
            value: &input[start..start + len],
        },
        &input[start + len..],
    ))
}

/// Parses one TLV at the start of `input`; returns it and the rest.
pub fn parse_one(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    parse_one_at(input, 0)
}

/// Parses `input` as exactly one TLV with tag `expected` and nothing after it.
pub fn parse_exact(input: &[u8], expected: Tag) -> Result<Tlv<'_>, TlvError> {
    let (tlv, rest) = parse_one(input)?;
    if tlv.tag != expected {
        return Err(TlvError::UnexpectedTag {
            offset: 0,
            expected,
            found: tlv.tag,
        });
    }
    if !rest.is_empty() {
        return Err(TlvError::Trailing {
            offset: input.len() - rest.len(),
            extra: rest.len(),
        });
    }
    Ok(tlv)
}

/// Parses a concatenation of TLVs covering all of `input`.
pub fn parse_all(input: &[u8]) -> Result<Vec<Tlv<'_>>, TlvError> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let offset = input.len() - rest.len();
        let (tlv, r) = parse_one_at(rest, offset)?;
        out.push(tlv);
        rest = r;
    }
    Ok(out)
}

/// The first TLV with `tag` among the concatenation in `input`.
pub fn find(input: &[u8], tag: Tag) -> Result<Tlv<'_>, TlvError> {
    parse_all(input)?
        .into_iter()
        .find(|t| t.tag == tag)
        .ok_or(TlvError::Missing { tag })
}

/// Appends the minimal BER length encoding of `len`.
pub fn encode_len(len: usize, out: &mut Vec<u8>) -> Result<(), TlvError> {
    match len {
        0..=0x7F => out.push(len as u8),
        0x80..=0xFF => out.extend_from_slice(&[0x81, len as u8]),
        0x100..=0xFFFF => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
        0x1_0000..=0xFF_FFFF => {
            out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8])
        }
        _ => return Err(TlvError::ValueTooLong { len }),
    }
    Ok(())
}

/// Appends `tag`, the length of `value` and `value`.
pub fn encode_into(tag: Tag, value: &[u8], out: &mut Vec<u8>) -> Result<(), TlvError> {
    out.extend_from_slice(&tag.to_bytes());
    encode_len(value.len(), out)?;
    out.extend_from_slice(value);
    Ok(())
}

/// `tag`, length and `value` as a new buffer.
pub fn encode(tag: Tag, value: &[u8]) -> Result<Vec<u8>, TlvError> {
    let mut out = Vec::with_capacity(value.len() + 8);
    encode_into(tag, value, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tags_of_one_two_three_bytes() {
        assert_eq!(Tag::new(0x7C).unwrap().to_bytes(), vec![0x7C]);
        assert_eq!(Tag::new(0x5F2F).unwrap().len(), 2);
        assert_eq!(
            Tag::new(0x5FC102).unwrap().to_bytes(),
            vec![0x5F, 0xC1, 0x02]
        );
        assert!(Tag::new(0x1F).is_none(), "1F alone announces more bytes");
        assert!(Tag::new(0x5F81).is_none(), "last byte must clear bit 8");
        assert!(Tag::new(0x5F0102).is_none(), "middle byte must set bit 8");
        assert!(
            Tag::new(0x7C00).is_none(),
            "two-byte tag must start with xx1F"
        );
        assert!(Tag::DYN_AUTH.is_constructed());
        assert!(!Tag::from_const(0x5FC102).is_constructed());
        assert_eq!(format!("{:?}", Tag::from_const(0x5FC102)), "Tag(5FC102)");
    }

    #[test]
    fn lengths_short_81_82_83() {
        for (len, want) in [
            (0usize, vec![0x00]),
            (0x7F, vec![0x7F]),
            (0x80, vec![0x81, 0x80]),
            (0xFF, vec![0x81, 0xFF]),
            (0x100, vec![0x82, 0x01, 0x00]),
            (0xFFFF, vec![0x82, 0xFF, 0xFF]),
            (0x10000, vec![0x83, 0x01, 0x00, 0x00]),
        ] {
            let mut out = Vec::new();
            encode_len(len, &mut out).unwrap();
            assert_eq!(out, want, "length {len}");
            assert_eq!(parse_len(&out, 0).unwrap(), (len, want.len()));
        }
        assert_eq!(
            encode_len(0x100_0000, &mut Vec::new()),
            Err(TlvError::ValueTooLong { len: 0x100_0000 })
        );
    }

    #[test]
    fn parses_general_authenticate_template_from_field_notes() {
        // 7C 24 82 00 81 20 <32-byte challenge>
        let mut apdu_data = vec![0x7C, 0x24, 0x82, 0x00, 0x81, 0x20];
        apdu_data.extend((0..32).map(|i| i as u8));
        let t = parse_exact(&apdu_data, Tag::DYN_AUTH).unwrap();
        let kids = t.children().unwrap();
        assert_eq!(kids.len(), 2);
        assert_eq!(kids[0].tag, Tag::from_const(0x82));
        assert!(kids[0].value.is_empty());
        assert_eq!(kids[1].tag, Tag::from_const(0x81));
        assert_eq!(kids[1].value.len(), 32);
        assert_eq!(kids[1].value[31], 31);
    }

    #[test]
    fn parses_nested_chuid_with_three_byte_tag_and_82_length() {
        let mut inner = Vec::new();
        encode_into(Tag::from_const(0x34), &[0xAB; 16], &mut inner).unwrap();
        encode_into(Tag::from_const(0x3E), &[0u8; 300], &mut inner).unwrap();
        let obj = encode(Tag::DATA, &inner).unwrap();
        assert_eq!(&obj[..4], &[0x53, 0x82, 0x01, 0x42]);
        let outer = parse_exact(&obj, Tag::DATA).unwrap();
        assert_eq!(
            outer.child(Tag::from_const(0x34)).unwrap().value,
            &[0xAB; 16]
        );
        assert_eq!(
            outer.child(Tag::from_const(0x35)),
            Err(TlvError::Missing {
                tag: Tag::from_const(0x35)
            })
        );
        let cmd = encode(Tag::TAG_LIST, &Tag::from_const(0x5FC102).to_bytes()).unwrap();
        assert_eq!(cmd, vec![0x5C, 0x03, 0x5F, 0xC1, 0x02]);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(
            parse_one(&[]).unwrap_err(),
            TlvError::Truncated {
                offset: 0,
                needed: 1,
                part: "tag"
            }
        );
        assert_eq!(
            parse_one(&[0x53, 0x80]).unwrap_err(),
            TlvError::IndefiniteLength { offset: 1 }
        );
        assert_eq!(
            parse_one(&[0x53, 0x84, 0, 0, 0, 1]).unwrap_err(),
            TlvError::LengthTooLong {
                offset: 1,
                bytes: 4
            }
        );
        assert_eq!(
            parse_one(&[0x53, 0x82, 0x01]).unwrap_err(),
            TlvError::Truncated {
                offset: 2,
                needed: 1,
                part: "length"
            }
        );
        assert_eq!(
            parse_one(&[0x53, 0x03, 0x01]).unwrap_err(),
            TlvError::Truncated {
                offset: 2,
                needed: 2,
                part: "value"
            }
        );
        assert_eq!(
            parse_one(&[0x5F, 0xC1, 0x82, 0x83, 0x00]).unwrap_err(),
            TlvError::TagTooLong { offset: 0 }
        );
        assert_eq!(
            parse_exact(&[0x53, 0x00, 0x00], Tag::DATA).unwrap_err(),
            TlvError::Trailing {
                offset: 2,
                extra: 1
            }
        );
        assert!(matches!(
            parse_exact(&[0x7C, 0x00], Tag::DATA),
            Err(TlvError::UnexpectedTag { .. })
        ));
        assert_eq!(
            parse_all(&[0x01, 0x00, 0x02, 0x05]).unwrap_err(),
            TlvError::Truncated {
                offset: 4,
                needed: 5,
                part: "value"
            }
        );
    }

    fn any_tag() -> impl Strategy<Value = Tag> {
        prop_oneof![
            (0u32..=0xFF).prop_filter_map("1-byte", Tag::new),
            (0u32..=0xFFFF)
                .prop_map(|v| v | 0x1F00)
                .prop_filter_map("2-byte", Tag::new),
            (0u32..=0xFF_FFFF)
                .prop_map(|v| v | 0x1F_8000)
                .prop_filter_map("3-byte", Tag::new),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// The parser never panics and never reads outside its input, on any bytes. This is
        /// the stable-toolchain companion of the cargo-fuzz target in fuzz/fuzz_targets/tlv.rs.
        #[test]
        fn parser_total_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(all) = parse_all(&bytes) {
                let total: usize = all.iter().map(|t| t.value.len()).sum();
                prop_assert!(total <= bytes.len());
                for t in &all {
                    let _ = t.children();
                }
            }
            let _ = parse_exact(&bytes, Tag::DATA);
        }

        /// Encoding then decoding gives back the same tags and values.
        #[test]
        fn roundtrip(items in proptest::collection::vec(
            (any_tag(), proptest::collection::vec(any::<u8>(), 0..400)), 0..6))
        {
            let mut buf = Vec::new();
            for (tag, value) in &items {
                encode_into(*tag, value, &mut buf).unwrap();
            }
            let back = parse_all(&buf).unwrap();
            prop_assert_eq!(back.len(), items.len());
            for (t, (tag, value)) in back.iter().zip(&items) {
                prop_assert_eq!(t.tag, *tag);
                prop_assert_eq!(t.value, &value[..]);
            }
        }
    }
}
