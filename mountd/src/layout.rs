//! On-volume byte formats, pure: the superblock, the share header, the index entry, and the
//! geometry of an extent. Every integer is little-endian. See `docs/design.md` ("mountd").
//!
//! ```text
//! volume:  [superblock block | ... padding to data_start ... | extent | extent | free | ...]
//! extent:  [share header, one block | share bytes, padded to a block | padding to the unit]
//! ```

use sha2::{Digest, Sha256};

/// "QGVOLUM1": a qgenome share volume.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"QGVOLUM1";
/// "QGSHARE1": the first block of a stored share extent.
pub const HEADER_MAGIC: [u8; 8] = *b"QGSHARE1";
pub const FORMAT_VERSION: u16 = 2;
/// Encoded superblock bytes (the rest of its block is zero).
pub const SUPERBLOCK_LEN: usize = 160;
/// Encoded share header bytes (the rest of its block is zero).
pub const HEADER_LEN: usize = 160;
/// The longest site name the superblock holds.
pub const MAX_SITE_LEN: usize = 63;
/// Encoded index entry bytes.
pub const INDEX_ENTRY_LEN: usize = 80;
/// Encoded share key bytes (the index key).
pub const SHARE_KEY_LEN: usize = 25;

/// Why bytes did not decode. Layout errors carry no location; callers add volume and share.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The bytes found are not named: they may be another share's, and this error is logged
    /// and sent to the requester.
    #[error("bad magic: not a {what}")]
    BadMagic { what: &'static str },
    #[error("unsupported format version {found}")]
    BadVersion { found: u16 },
    #[error("checksum mismatch")]
    Checksum,
    #[error("too short: {len} bytes, need {need}")]
    Short { len: usize, need: usize },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> LayoutError {
    LayoutError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The checksum of a share's bytes: XXH3-128, little-endian.
///
/// It detects damage on the volume (scrub, and every GET before it answers); it is not what
/// stops a malicious site: the home checks every rebuilt chunk against its SHA-256 in the
/// catalog, and a site could recompute any checksum of its own anyway. XXH3 runs at memory
/// speed where SHA-256 cost the site more CPU than everything else it does for a share.
/// twox-hash picks its AVX2 kernel at run time (a build for baseline x86-64 would otherwise
/// get SSE2 only); the value is XXH3's, whichever kernel computes it.
pub fn share_sum(bytes: &[u8]) -> [u8; 16] {
    twox_hash::XxHash3_128::oneshot(bytes).to_le_bytes()
}

/// [`share_sum`] of a share that arrives piece by piece: each piece hashed while it is still
/// in cache (the site hashes what it has just decrypted, as the next piece is on the wire).
/// Equal to `share_sum` of the pieces joined.
///
/// The hasher keeps the last bytes it was fed (up to 256) and accumulators mixed from all of
/// them; fed a frame that then fails its tag, those are bytes of an attacker's ciphertext XOR
/// the pad. So its memory is zeroed when it is dropped, like every other buffer of a frame.
pub struct ShareSummer(std::mem::MaybeUninit<twox_hash::XxHash3_128>);

impl ShareSummer {
    pub fn new() -> Self {
        Self(std::mem::MaybeUninit::new(twox_hash::XxHash3_128::new()))
    }

    fn hasher(&self) -> &twox_hash::XxHash3_128 {
        // SAFETY: initialized by `new`, and only dropped by `drop`.
        unsafe { self.0.assume_init_ref() }
    }

    /// The next piece of the share.
    pub fn update(&mut self, piece: &[u8]) {
        // SAFETY: as in `hasher`.
        unsafe { self.0.assume_init_mut() }.write(piece);
    }

    pub fn finish(&self) -> [u8; 16] {
        self.hasher().finish_128().to_le_bytes()
    }
}

impl Drop for ShareSummer {
    fn drop(&mut self) {
        // SAFETY: initialized by `new`, dropped here only; its memory is plain bytes after.
        unsafe { self.0.assume_init_drop() };
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl Default for ShareSummer {
    fn default() -> Self {
        Self::new()
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn arr<const N: usize>(b: &[u8], o: usize) -> [u8; N] {
    b[o..o + N].try_into().expect("N bytes")
}

/// Identifies one stored share: which file, which chunk of it, which of the n shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShareKey {
    pub file_id: [u8; 16],
    pub chunk: u64,
    pub share: u8,
}

impl ShareKey {
    /// The index key: file id, chunk (big-endian, so keys sort by file then chunk), share.
    pub fn encode(&self) -> [u8; SHARE_KEY_LEN] {
        let mut k = [0u8; SHARE_KEY_LEN];
        k[..16].copy_from_slice(&self.file_id);
        k[16..24].copy_from_slice(&self.chunk.to_be_bytes());
        k[24] = self.share;
        k
    }

    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        if b.len() != SHARE_KEY_LEN {
            return Err(invalid(
                "share key",
                format!("{} bytes, need {SHARE_KEY_LEN}", b.len()),
            ));
        }
        Ok(Self {
            file_id: arr(b, 0),
            chunk: u64::from_be_bytes(arr(b, 16)),
            share: b[24],
        })
    }
}

impl std::fmt::Display for ShareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.file_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, " chunk {} share {}", self.chunk, self.share)
    }
}

/// What the sharing scheme says about a share: (k, n) and the length of the chunk it encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareMeta {
    pub k: u8,
    pub n: u8,
    /// Bytes of the chunk plaintext (the secret) this share is one of n shares of.
    pub secret_len: u64,
}

impl ShareMeta {
    /// Checks 1 <= k <= n and that `key.share` is one of the n.
    pub fn validate(&self, key: &ShareKey) -> Result<(), LayoutError> {
        if self.k == 0 || self.k > self.n {
            return Err(invalid(
                "scheme",
                format!("k={} n={} (need 1 <= k <= n)", self.k, self.n),
            ));
        }
        if key.share >= self.n {
            return Err(invalid(
                "share index",
                format!("{} of n={}", key.share, self.n),
            ));
        }
        Ok(())
    }
}

/// The volume's first block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub volume_id: [u8; 16],
    pub site: String,
    /// Header block size and request granularity; a multiple of the device's alignment.
    pub block_size: u32,
    /// Extents start and end on multiples of this; a multiple of `block_size`.
    pub alloc_unit: u32,
    /// Bytes of the volume in use: a multiple of `alloc_unit`, at most the device size.
    pub volume_len: u64,
    /// Offset of the first extent: the end of the superblock's allocation unit.
    pub data_start: u64,
    /// Seconds since the Unix epoch at format time (information only).
    pub created: u64,
    /// 0 while no share was written since format; then the tag of the one index that
    /// describes the volume (random, nonzero, also kept in that index). Written durably before
    /// the first share (or when an index holding shares is opened and it is still 0), and by
    /// a rebuild of the index: a volume holding shares is then opened only with its own index,
    /// so a missing, mistyped or stale state directory cannot serve it as empty and
    /// reallocate its shares' space.
    pub index_tag: u32,
}

impl Superblock {
    /// Builds a superblock for a device of `device_len` bytes, checking the geometry.
    pub fn new(
        volume_id: [u8; 16],
        site: &str,
        block_size: u32,
        alloc_unit: u32,
        device_len: u64,
        created: u64,
    ) -> Result<Self, LayoutError> {
        let unit = u64::from(alloc_unit);
        if unit > 0 && device_len < 2 * unit {
            return Err(invalid(
                "volume length",
                format!(
                    "the device has {device_len} bytes; a volume needs at least {} (a unit of {unit} for the superblock and one for shares)",
                    2 * unit
                ),
            ));
        }
        let sb = Self {
            volume_id,
            site: site.to_owned(),
            block_size,
            alloc_unit,
            volume_len: device_len / u64::from(alloc_unit.max(1)) * u64::from(alloc_unit.max(1)),
            data_start: u64::from(alloc_unit),
            created,
            index_tag: 0,
        };
        sb.validate()?;
        Ok(sb)
    }

    fn validate(&self) -> Result<(), LayoutError> {
        if self.site.is_empty() || self.site.len() > MAX_SITE_LEN {
            return Err(invalid(
                "site",
                format!("{} bytes, need 1..={MAX_SITE_LEN}", self.site.len()),
            ));
        }
        if !self.block_size.is_power_of_two() || self.block_size < 512 {
            return Err(invalid(
                "block size",
                format!("{} (need a power of two >= 512)", self.block_size),
            ));
        }
        if self.alloc_unit == 0 || !self.alloc_unit.is_multiple_of(self.block_size) {
            return Err(invalid(
                "allocation unit",
                format!(
                    "{} (need a multiple of the block size {})",
                    self.alloc_unit, self.block_size
                ),
            ));
        }
        if self.data_start != u64::from(self.alloc_unit) {
            return Err(invalid("data start", self.data_start.to_string()));
        }
        if !self.volume_len.is_multiple_of(u64::from(self.alloc_unit))
            || self.volume_len <= self.data_start
        {
            return Err(invalid(
                "volume length",
                format!(
                    "{} (need a multiple of {} above {})",
                    self.volume_len, self.alloc_unit, self.data_start
                ),
            ));
        }
        Ok(())
    }

    pub fn encode(&self) -> [u8; SUPERBLOCK_LEN] {
        let mut b = [0u8; SUPERBLOCK_LEN];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(SUPERBLOCK_LEN as u16).to_le_bytes());
        b[12..16].copy_from_slice(&self.index_tag.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id);
        b[32..36].copy_from_slice(&self.block_size.to_le_bytes());
        b[36..40].copy_from_slice(&self.alloc_unit.to_le_bytes());
        b[40..48].copy_from_slice(&self.volume_len.to_le_bytes());
        b[48..56].copy_from_slice(&self.data_start.to_le_bytes());
        b[56..64].copy_from_slice(&self.created.to_le_bytes());
        let site = self.site.as_bytes();
        b[64] = site.len() as u8;
        b[65..65 + site.len()].copy_from_slice(site);
        let sum = sha256(&b[..128]);
        b[128..160].copy_from_slice(&sum);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        if b.len() < SUPERBLOCK_LEN {
            return Err(LayoutError::Short {
                len: b.len(),
                need: SUPERBLOCK_LEN,
            });
        }
        let magic: [u8; 8] = arr(b, 0);
        if magic != SUPERBLOCK_MAGIC {
            return Err(LayoutError::BadMagic {
                what: "qgenome volume superblock",
            });
        }
        if sha256(&b[..128]) != arr::<32>(b, 128) {
            return Err(LayoutError::Checksum);
        }
        let version = u16_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(LayoutError::BadVersion { found: version });
        }
        let site_len = usize::from(b[64]);
        if site_len > MAX_SITE_LEN {
            return Err(invalid("site", format!("length {site_len}")));
        }
        let site = std::str::from_utf8(&b[65..65 + site_len])
            .map_err(|_| invalid("site", "not UTF-8"))?
            .to_owned();
        let sb = Self {
            volume_id: arr(b, 16),
            site,
            block_size: u32_at(b, 32),
            alloc_unit: u32_at(b, 36),
            volume_len: u64_at(b, 40),
            data_start: u64_at(b, 48),
            created: u64_at(b, 56),
            index_tag: u32_at(b, 12),
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Bytes written for a share of `share_len` bytes: header block + share rounded to blocks.
    pub fn write_len(&self, share_len: u64) -> u64 {
        let bs = u64::from(self.block_size);
        bs + share_len.div_ceil(bs) * bs
    }

    /// Bytes allocated for a share of `share_len` bytes: the write rounded up to the unit.
    pub fn extent_len(&self, share_len: u64) -> u64 {
        let au = u64::from(self.alloc_unit);
        self.write_len(share_len).div_ceil(au) * au
    }
}

/// Generations a put can have given: far above any a store reaches (they are reserved 2^16
/// at a time), so that a rebuild's next one, one above the highest found, never overflows.
pub const MAX_GENERATION: u64 = 1 << 62;

/// The self-describing first block of every stored share extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareHeader {
    /// The volume this extent belongs to (a header copied from elsewhere does not validate).
    pub volume_id: [u8; 16],
    pub key: ShareKey,
    pub meta: ShareMeta,
    pub share_len: u64,
    /// Store-wide sequence number, never reused: the newest generation of a key wins.
    pub generation: u64,
    /// Bytes allocated to this extent, header included (lets a scan skip over it).
    pub extent_len: u64,
    /// [`share_sum`] of the share bytes.
    pub share_sum: [u8; 16],
}

impl ShareHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id);
        b[32..48].copy_from_slice(&self.key.file_id);
        b[48..56].copy_from_slice(&self.key.chunk.to_le_bytes());
        b[56] = self.key.share;
        b[57] = self.meta.k;
        b[58] = self.meta.n;
        b[64..72].copy_from_slice(&self.meta.secret_len.to_le_bytes());
        b[72..80].copy_from_slice(&self.share_len.to_le_bytes());
        b[80..88].copy_from_slice(&self.generation.to_le_bytes());
        b[88..96].copy_from_slice(&self.extent_len.to_le_bytes());
        b[96..112].copy_from_slice(&self.share_sum);
        let sum = sha256(&b[..128]);
        b[128..160].copy_from_slice(&sum);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        if b.len() < HEADER_LEN {
            return Err(LayoutError::Short {
                len: b.len(),
                need: HEADER_LEN,
            });
        }
        let magic: [u8; 8] = arr(b, 0);
        if magic != HEADER_MAGIC {
            return Err(LayoutError::BadMagic {
                what: "share header",
            });
        }
        if sha256(&b[..128]) != arr::<32>(b, 128) {
            return Err(LayoutError::Checksum);
        }
        let version = u16_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(LayoutError::BadVersion { found: version });
        }
        let h = Self {
            volume_id: arr(b, 16),
            key: ShareKey {
                file_id: arr(b, 32),
                chunk: u64_at(b, 48),
                share: b[56],
            },
            meta: ShareMeta {
                k: b[57],
                n: b[58],
                secret_len: u64_at(b, 64),
            },
            share_len: u64_at(b, 72),
            generation: u64_at(b, 80),
            extent_len: u64_at(b, 88),
            share_sum: arr(b, 96),
        };
        h.meta.validate(&h.key)?;
        Ok(h)
    }

    /// True when the header could describe an extent of a volume with this superblock: one
    /// a put could have written (its header and share in a single request, a generation
    /// below [`MAX_GENERATION`]), lying whole within the volume. The length is bounded before
    /// any arithmetic on it, so that a crafted header (its checksum is no secret) neither
    /// overflows the extent's size nor has a rebuild allocate the volume's size to read it.
    pub fn fits(&self, sb: &Superblock, offset: u64) -> bool {
        let most = crate::volume::MAX_REQUEST as u64 - u64::from(sb.block_size);
        self.volume_id == sb.volume_id
            && (1..=most).contains(&self.share_len)
            && self.generation < MAX_GENERATION
            && self.extent_len == sb.extent_len(self.share_len)
            && offset >= sb.data_start
            && offset.is_multiple_of(u64::from(sb.alloc_unit))
            && offset
                .checked_add(self.extent_len)
                .is_some_and(|end| end <= sb.volume_len)
    }
}

/// What the index stores for one key: where the extent is and what its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub extent_len: u64,
    pub generation: u64,
    pub share_len: u64,
    pub meta: ShareMeta,
    pub share_sum: [u8; 16],
}

impl IndexEntry {
    pub fn from_header(h: &ShareHeader, offset: u64) -> Self {
        Self {
            offset,
            extent_len: h.extent_len,
            generation: h.generation,
            share_len: h.share_len,
            meta: h.meta,
            share_sum: h.share_sum,
        }
    }

    /// Whether a header read from the volume is exactly the one this entry recorded.
    pub fn matches(&self, h: &ShareHeader, key: &ShareKey, volume_id: &[u8; 16]) -> bool {
        h.volume_id == *volume_id
            && h.key == *key
            && IndexEntry::from_header(h, self.offset) == *self
    }

    pub fn encode(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[0] = 2; // entry version
        b[1] = self.meta.k;
        b[2] = self.meta.n;
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.extent_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b[32..40].copy_from_slice(&self.share_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.meta.secret_len.to_le_bytes());
        b[48..64].copy_from_slice(&self.share_sum);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        if b.len() != INDEX_ENTRY_LEN {
            return Err(LayoutError::Short {
                len: b.len(),
                need: INDEX_ENTRY_LEN,
            });
        }
        if b[0] != 2 {
            return Err(LayoutError::BadVersion {
                found: u16::from(b[0]),
            });
        }
        Ok(Self {
            offset: u64_at(b, 8),
            extent_len: u64_at(b, 16),
            generation: u64_at(b, 24),
            share_len: u64_at(b, 32),
            meta: ShareMeta {
                k: b[1],
                n: b[2],
                secret_len: u64_at(b, 40),
            },
            share_sum: arr(b, 48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_device_too_small_for_a_volume_says_how_small_and_what_it_needs() {
        let e = Superblock::new([1; 16], "s", 4096, 4096, 5000, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("5000 bytes") && e.contains("at least 8192"),
            "{e}"
        );
        Superblock::new([1; 16], "s", 4096, 4096, 10_000, 0).unwrap();
    }

    /// The checksum is on every volume: it must stay XXH3-128 whichever crate computes it
    /// (values from the reference, `XXH3_128bits` of "" = 0x99aa06d3014798d86001c324468d497f,
    /// and from xxhash-rust, which wrote the volumes before).
    #[test]
    fn share_sum_is_xxh3_128() {
        let big: Vec<u8> = (0..(1u32 << 20) + 13)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        let want: [(&[u8], u128); 3] = [
            (b"", 0x99aa06d3014798d86001c324468d497f),
            (b"qgenome share", 0xa25b52130d3df14bdd14252a429cef86),
            (&big, 0xaac1ba13f1a1e2c71d4c47b1ecfd19a8),
        ];
        for (bytes, sum) in want {
            assert_eq!(share_sum(bytes), sum.to_le_bytes(), "{} bytes", bytes.len());
        }
    }

    /// What a summer was fed (the last bytes, kept in its buffer) does not outlive it.
    #[test]
    fn a_share_summer_leaves_nothing_of_what_it_was_fed() {
        let mut s = std::mem::ManuallyDrop::new(ShareSummer::new());
        s.update(&[0xAB; 300]);
        let bytes = |s: &ShareSummer| {
            let n = std::mem::size_of_val(&s.0);
            // SAFETY: the hasher's memory, initialized (by `new`, or zeroed by the drop).
            unsafe { std::slice::from_raw_parts(s.0.as_ptr().cast::<u8>(), n) }.to_vec()
        };
        assert!(bytes(&s).windows(64).any(|w| w.iter().all(|&b| b == 0xAB)));
        // SAFETY: dropped once; its memory stays readable inside the ManuallyDrop.
        unsafe { std::mem::ManuallyDrop::drop(&mut s) };
        assert!(
            bytes(&s).iter().all(|&b| b == 0),
            "the hasher's state was left"
        );
    }

    proptest! {
        /// Hashed in pieces of any sizes (the site's receive loop), the sum is the one-shot one.
        #[test]
        fn a_share_summed_piece_by_piece_has_the_one_shot_sum(
            // Short lengths as often as long ones: XXH3 hashes up to 240 bytes another way,
            // and the streaming hasher buffers 256.
            len in prop_oneof![0usize..600, 0usize..300_000],
            cuts in proptest::collection::vec(prop_oneof![1usize..300, 1usize..140_000], 0..8),
            seed in any::<u8>(),
        ) {
            let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let mut s = ShareSummer::new();
            let mut rest = &bytes[..];
            for c in cuts {
                let (now, later) = rest.split_at(c.min(rest.len()));
                s.update(now);
                rest = later;
            }
            s.update(rest);
            prop_assert_eq!(s.finish(), share_sum(&bytes));
        }
    }

    fn sb() -> Superblock {
        Superblock::new(
            [7; 16],
            "sendai-1",
            4096,
            65536,
            (1 << 30) + 12345,
            1_700_000_000,
        )
        .unwrap()
    }

    prop_compose! {
        fn header()(vid in any::<[u8; 16]>(), fid in any::<[u8; 16]>(), chunk in any::<u64>(),
                    n in 1u8..=255, kf in any::<u8>(), sf in any::<u8>(), secret_len in any::<u64>(),
                    share_len in any::<u64>(), generation in any::<u64>(), extent_len in any::<u64>(),
                    sha in any::<[u8; 16]>()) -> ShareHeader {
            let k = 1 + kf % n;
            let share = sf % n;
            ShareHeader {
                volume_id: vid,
                key: ShareKey { file_id: fid, chunk, share },
                meta: ShareMeta { k, n, secret_len },
                share_len, generation, extent_len, share_sum: sha,
            }
        }
    }

    proptest! {
        #[test]
        fn header_round_trips(h in header()) {
            prop_assert_eq!(ShareHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn any_flipped_header_bit_is_caught(h in header(), bit in 0usize..(HEADER_LEN * 8)) {
            let mut b = h.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(ShareHeader::decode(&b).is_err());
        }

        #[test]
        fn random_bytes_never_decode(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert!(ShareHeader::decode(&b).is_err());
            prop_assert!(Superblock::decode(&b).is_err());
        }

        #[test]
        fn superblock_round_trips(vid in any::<[u8; 16]>(), site in "[a-z0-9-]{1,63}",
                                  bs_shift in 9u32..14, au_mult in 1u32..64, len in 0u64..(1 << 44),
                                  created in any::<u64>()) {
            let bs = 1 << bs_shift;
            let au = bs * au_mult;
            if let Ok(sb) = Superblock::new(vid, &site, bs, au, len, created) {
                prop_assert_eq!(sb.volume_len % u64::from(au), 0);
                prop_assert!(sb.volume_len <= len);
                prop_assert_eq!(Superblock::decode(&sb.encode()), Ok(sb.clone()));
                let held = Superblock { index_tag: created as u32 | 1, ..sb.clone() };
                prop_assert_eq!(Superblock::decode(&held.encode()), Ok(held.clone()));
                let mut b = sb.encode();
                b[(created as usize) % SUPERBLOCK_LEN] ^= 0x10;
                prop_assert!(Superblock::decode(&b).is_err());
            } else {
                prop_assert!(len < 2 * u64::from(au));
            }
        }

        #[test]
        fn extent_geometry(share_len in 1u64..(1 << 30)) {
            let s = sb();
            let w = s.write_len(share_len);
            let e = s.extent_len(share_len);
            prop_assert!(w >= share_len + 4096 && w < share_len + 2 * 4096);
            prop_assert_eq!(w % 4096, 0);
            prop_assert!(e >= w && e - w < 65536 && e.is_multiple_of(65536));
        }

        #[test]
        fn index_entry_round_trips(h in header(), offset in any::<u64>()) {
            let e = IndexEntry::from_header(&h, offset);
            prop_assert_eq!(IndexEntry::decode(&e.encode()), Ok(e));
            prop_assert!(e.matches(&h, &h.key, &h.volume_id));
        }

        #[test]
        fn share_keys_sort_by_file_then_chunk(a in any::<([u8; 16], u64, u8)>(), b in any::<([u8; 16], u64, u8)>()) {
            let ka = ShareKey { file_id: a.0, chunk: a.1, share: a.2 };
            let kb = ShareKey { file_id: b.0, chunk: b.1, share: b.2 };
            prop_assert_eq!(ka.encode().cmp(&kb.encode()), ka.cmp(&kb));
            prop_assert_eq!(ShareKey::decode(&ka.encode()), Ok(ka));
        }
    }

    #[test]
    fn header_from_another_volume_or_place_does_not_fit() {
        let s = sb();
        let h = ShareHeader {
            volume_id: s.volume_id,
            key: ShareKey {
                file_id: [1; 16],
                chunk: 3,
                share: 0,
            },
            meta: ShareMeta {
                k: 2,
                n: 3,
                secret_len: 1 << 20,
            },
            share_len: 1 << 20,
            generation: 9,
            extent_len: s.extent_len(1 << 20),
            share_sum: [0; 16],
        };
        assert!(h.fits(&s, s.data_start));
        assert!(!h.fits(&s, s.data_start + 4096), "not on a unit boundary");
        assert!(!h.fits(&s, s.volume_len - 65536), "runs past the end");
        assert!(!ShareHeader {
            volume_id: [8; 16],
            ..h.clone()
        }
        .fits(&s, s.data_start));
        assert!(!ShareHeader {
            extent_len: 1,
            ..h.clone()
        }
        .fits(&s, s.data_start));
        // Lengths and generations no put makes, whose arithmetic would overflow (a crafted
        // header: its checksum is no secret): refused, not wrapped.
        for share_len in [u64::MAX, u64::MAX / 2, 1 << 30] {
            let crafted = ShareHeader {
                share_len,
                extent_len: u64::from(s.alloc_unit),
                ..h.clone()
            };
            assert!(!crafted.fits(&s, s.data_start), "{share_len}");
        }
        assert!(!ShareHeader {
            generation: u64::MAX,
            ..h
        }
        .fits(&s, s.data_start));
    }

    #[test]
    fn bad_magic_errors_carry_no_bytes_from_the_volume() {
        // Where a header was expected lie another share's bytes (say the index points at
        // space reused since): the error, logged and sent to the requester, names none.
        let mut b = vec![0u8; 4096];
        b[..8].copy_from_slice(b"SECRETxy");
        for e in [
            ShareHeader::decode(&b).unwrap_err(),
            Superblock::decode(&b).unwrap_err(),
        ] {
            let (shown, debug) = (e.to_string(), format!("{e:?}"));
            for text in [&shown, &debug] {
                assert!(
                    !text.contains("SECRET")
                        && !text.contains("53, 45")
                        && !text.contains("83, 69"),
                    "{text}"
                );
            }
            assert!(shown.starts_with("bad magic: not a "), "{shown}");
        }
    }

    #[test]
    fn invalid_scheme_is_named() {
        let key = ShareKey {
            file_id: [0; 16],
            chunk: 0,
            share: 3,
        };
        let e = ShareMeta {
            k: 2,
            n: 3,
            secret_len: 1,
        }
        .validate(&key)
        .unwrap_err();
        assert!(e.to_string().contains("share index"), "{e}");
        let e = ShareMeta {
            k: 4,
            n: 3,
            secret_len: 1,
        }
        .validate(&ShareKey { share: 0, ..key })
        .unwrap_err();
        assert!(e.to_string().contains("scheme"), "{e}");
        assert!(Superblock::new([0; 16], "", 4096, 4096, 1 << 20, 0).is_err());
        assert!(Superblock::new([0; 16], "s", 4096, 6000, 1 << 20, 0).is_err());
    }
}
