//! The per-version *manifest*: everything the catalog knows about a committed version that the
//! sites' share headers do not carry (patient, name, size, chunk offsets and hashes, Merkle
//! root, attributes), stored at the sites as one more chunk with the reserved index
//! [`MANIFEST_CHUNK`] and split (k,n) like any data chunk. From the sites' listings and these
//! manifests a lost catalog is rebuilt (`qgenome catalog rebuild`).
//!
//! Plaintext layout (pure, no I/O; see `docs/design.md`, "Catalog rebuild"):
//!
//! ```text
//! JSON record (UTF-8, the fields of [`Manifest`]) || SHA-256 of the JSON (32 bytes)
//! ```
//!
//! The trailing hash makes a combination of shares from two different writes of the manifest
//! (a rewrite interrupted half-way across the sites) detectable: the combination is garbage and
//! its hash does not match, so another k-subset is tried.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::merkle::{self, LeafHash};
use super::{ChunkRecord, FileId, FileRecord, FileState, Hash, ShareLocation};

/// The chunk index under which a version's manifest shares are stored at the sites.
pub const MANIFEST_CHUNK: u64 = u64::MAX;

/// The manifest format this code writes for versions of [`LeafHash::Pieces`]: format 1 plus
/// the `leaf` field. Format 1 (no `leaf`: chunk hashes of [`LeafHash::Whole`]) is still written
/// for the versions that have it, so it stays readable by builds from before format 2.
pub const MANIFEST_FORMAT: u32 = 2;

/// The format of a version's manifest, by its leaf hash.
fn format_for(leaf: LeafHash) -> u32 {
    if leaf.is_whole() {
        1
    } else {
        MANIFEST_FORMAT
    }
}

/// Most bytes one chunk's entry takes in the manifest's JSON, at its longest:
/// `{"offset":<20 digits>,"len":<10 digits>,"hash":"<64 hex>"},` is 121.
const MAX_ENTRY_LEN: usize = 128;
/// Room for the manifest's other fields (a name of 255 bytes escaped at 6 bytes each among
/// them), its checksum and the scheme's padding of the share.
const OTHER_FIELDS_LEN: usize = 64 << 10;
/// Most chunks one version can have. Its manifest is stored at the sites like a chunk, as
/// shares of at most [`crate::wire::msg::MAX_DATA`] bytes: 130 560 chunks, so 136.9 GB at
/// 1 MiB chunks (a bigger `chunk_size` raises the bound in proportion).
pub const MAX_CHUNKS: u64 =
    ((crate::wire::msg::MAX_DATA - OTHER_FIELDS_LEN) / MAX_ENTRY_LEN) as u64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("manifest of file {file}: {len} bytes, too short to hold a checksum")]
    TooShort { file: String, len: usize },
    #[error(
        "manifest of file {file}: checksum mismatch (shares from different writes, or damaged)"
    )]
    Checksum { file: String },
    #[error("manifest of file {file}: not a manifest record: {reason}")]
    Parse { file: String, reason: String },
    #[error("manifest of file {file}: format {format} is not supported (this build reads 1 to {MANIFEST_FORMAT})")]
    Format { file: String, format: u32 },
    #[error("manifest of file {file}: {reason}")]
    Inconsistent { file: String, reason: String },
}

/// One chunk as the manifest records it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestChunk {
    pub offset: u64,
    pub len: u32,
    #[serde(with = "super::hex32")]
    pub hash: Hash,
}

/// A committed version, as stored (secret-shared) at the sites.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    #[serde(with = "super::hex16")]
    pub id: FileId,
    pub patient: String,
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    pub k: u8,
    pub n: u8,
    pub mode: u32,
    pub created: u64,
    pub mtime: u64,
    #[serde(with = "super::hex32")]
    pub root: Hash,
    /// How the chunk hashes were computed (absent in format 1: [`LeafHash::Whole`]).
    #[serde(default, skip_serializing_if = "LeafHash::is_whole")]
    pub leaf: LeafHash,
    /// When this manifest was written (ns since the Unix epoch, strictly increasing within a
    /// mount): of two versions claiming one name, the later-written manifest wins.
    pub seq: u64,
    pub chunks: Vec<ManifestChunk>,
}

impl std::fmt::Debug for Manifest {
    // Chunk hashes are kept out of logs (they would let a guess about a chunk be confirmed).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("id", &merkle::hex(&self.id))
            .field("patient", &self.patient)
            .field("name", &self.name)
            .field("size", &self.size)
            .field("chunks", &self.chunks.len())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// That chunks given as (offset, length, hash) tile `[0, size)` in order, none empty or longer
/// than `chunk_size`, and that their hashes make `root`: what a manifest or a catalog record
/// must hold before its chunks are used. The reason, if not.
pub fn check_chunks(
    chunks: impl Iterator<Item = (u64, u32, Hash)>,
    chunk_size: u32,
    size: u64,
    root: &Hash,
) -> Result<(), String> {
    let mut end = 0u64;
    let mut leaves = Vec::new();
    for (i, (offset, len, hash)) in chunks.enumerate() {
        if offset != end || len == 0 || len > chunk_size {
            return Err(format!(
                "chunk {i} at offset {offset} with {len} bytes does not follow the previous chunk (end {end}, chunk size {chunk_size})"
            ));
        }
        end += u64::from(len);
        leaves.push(hash);
    }
    if end != size {
        return Err(format!("chunks cover {end} bytes, size says {size}"));
    }
    if merkle::root(&leaves) != *root {
        return Err("Merkle root does not match the chunk hashes".into());
    }
    Ok(())
}

impl Manifest {
    /// The manifest of a version with its chunk records (in index order) and Merkle root.
    pub fn new(rec: &FileRecord, root: Hash, chunks: &[ChunkRecord], seq: u64) -> Self {
        Self {
            format: format_for(rec.leaf),
            id: rec.id,
            patient: rec.patient.clone(),
            name: rec.name.clone(),
            size: rec.size,
            chunk_size: rec.chunk_size,
            k: rec.k,
            n: rec.n,
            mode: rec.mode,
            created: rec.created,
            mtime: rec.mtime,
            root,
            leaf: rec.leaf,
            seq,
            chunks: chunks
                .iter()
                .map(|c| ManifestChunk {
                    offset: c.offset,
                    len: c.len,
                    hash: c.hash,
                })
                .collect(),
        }
    }

    /// The plaintext stored (split) at the sites: JSON then its SHA-256.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(serde_json::to_vec(self).expect("manifest serializes"));
        let sum: [u8; 32] = Sha256::digest(out.as_slice()).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Parse and check a combined manifest plaintext that was stored under file id `file`.
    pub fn decode(file: &FileId, bytes: &[u8]) -> Result<Self, ManifestError> {
        let name = || merkle::hex(file);
        if bytes.len() < 32 {
            return Err(ManifestError::TooShort {
                file: name(),
                len: bytes.len(),
            });
        }
        let (json, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(json).as_slice() != sum {
            return Err(ManifestError::Checksum { file: name() });
        }
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        let v: Version = serde_json::from_slice(json).map_err(|e| ManifestError::Parse {
            file: name(),
            reason: e.to_string(),
        })?;
        if !(1..=MANIFEST_FORMAT).contains(&v.format) {
            return Err(ManifestError::Format {
                file: name(),
                format: v.format,
            });
        }
        let m: Manifest = serde_json::from_slice(json).map_err(|e| ManifestError::Parse {
            file: name(),
            reason: e.to_string(),
        })?;
        m.check(file)?;
        Ok(m)
    }

    /// Internal consistency: the id it was stored under, valid names, chunks that tile the
    /// file in order, and the Merkle root over the chunk hashes.
    pub fn check(&self, file: &FileId) -> Result<(), ManifestError> {
        let bad = |reason: String| ManifestError::Inconsistent {
            file: merkle::hex(file),
            reason,
        };
        if &self.id != file {
            return Err(bad(format!(
                "records file id {}, stored under another",
                merkle::hex(&self.id)
            )));
        }
        if self.format != format_for(self.leaf) {
            return Err(bad(format!(
                "format {} with {:?} chunk hashes",
                self.format, self.leaf
            )));
        }
        super::validate_patient(&self.patient).map_err(|e| bad(e.to_string()))?;
        super::validate_name(&self.name).map_err(|e| bad(e.to_string()))?;
        check_chunks(
            self.chunks.iter().map(|c| (c.offset, c.len, c.hash)),
            self.chunk_size,
            self.size,
            &self.root,
        )
        .map_err(bad)
    }

    /// The committed catalog record this manifest describes.
    pub fn file_record(&self) -> FileRecord {
        FileRecord {
            id: self.id,
            patient: self.patient.clone(),
            name: self.name.clone(),
            size: self.size,
            chunk_size: self.chunk_size,
            k: self.k,
            n: self.n,
            state: FileState::Committed,
            root: Some(self.root),
            leaf: self.leaf,
            mode: self.mode,
            created: self.created,
            mtime: self.mtime,
            // Manifests do not carry owners: a rebuilt catalog's files are the mount's user's.
            owner: None,
        }
    }

    /// Chunk records, with the share locations found at the sites for each chunk index.
    pub fn chunk_records(&self, shares: impl Fn(u64) -> Vec<ShareLocation>) -> Vec<ChunkRecord> {
        self.chunks
            .iter()
            .enumerate()
            .map(|(i, c)| ChunkRecord {
                offset: c.offset,
                len: c.len,
                hash: c.hash,
                shares: shares(i as u64),
            })
            .collect()
    }
}

/// Which version each `patient/name` gets: the one whose manifest was written last (`seq`,
/// then file id to be deterministic). Returns (winners, superseded).
pub fn resolve(mut found: Vec<Manifest>) -> (Vec<Manifest>, Vec<Manifest>) {
    found.sort_by(|a, b| {
        (&a.patient, &a.name, b.seq, b.id).cmp(&(&b.patient, &b.name, a.seq, a.id))
    });
    let mut winners: Vec<Manifest> = Vec::new();
    let mut superseded = Vec::new();
    for m in found {
        match winners.last() {
            Some(w) if w.patient == m.patient && w.name == m.name => superseded.push(m),
            _ => winners.push(m),
        }
    }
    (winners, superseded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest(lens: &[u32], seq: u64) -> Manifest {
        let mut chunks = Vec::new();
        let mut off = 0;
        for (i, &l) in lens.iter().enumerate() {
            chunks.push(ManifestChunk {
                offset: off,
                len: l,
                hash: [i as u8; 32],
            });
            off += u64::from(l);
        }
        let leaves: Vec<Hash> = chunks.iter().map(|c| c.hash).collect();
        Manifest {
            format: MANIFEST_FORMAT,
            id: [7; 16],
            patient: "P1".into(),
            name: "a.cram".into(),
            size: off,
            chunk_size: 1024,
            k: 2,
            n: 3,
            mode: 0o644,
            created: 1,
            mtime: 2,
            root: merkle::root(&leaves),
            leaf: LeafHash::Pieces,
            seq,
            chunks,
        }
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(lens in proptest::collection::vec(1u32..=1024, 0..40), seq: u64) {
            let m = manifest(&lens, seq);
            let bytes = m.encode();
            prop_assert_eq!(Manifest::decode(&m.id, &bytes).unwrap(), m);
        }

        #[test]
        fn any_flipped_byte_is_refused(lens in proptest::collection::vec(1u32..=1024, 1..10), pos: usize, bit in 0u8..8) {
            let m = manifest(&lens, 5);
            let mut bytes = m.encode().to_vec();
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
            prop_assert!(Manifest::decode(&m.id, &bytes).is_err());
        }
    }

    /// The longest manifest of MAX_CHUNKS chunks still fits one share a site accepts.
    #[test]
    fn a_manifest_of_max_chunks_at_their_longest_fits_a_share() {
        let mut m = manifest(&[1], u64::MAX);
        // Control characters: JSON escapes each as 6 bytes.
        (m.patient, m.name) = ("\u{1}".repeat(64), "\u{1}".repeat(255));
        (m.size, m.created, m.mtime, m.mode) = (u64::MAX, u64::MAX, u64::MAX, u32::MAX);
        m.chunks = (0..MAX_CHUNKS)
            .map(|i| ManifestChunk {
                offset: u64::MAX - i,
                len: u32::MAX,
                hash: [0xab; 32],
            })
            .collect();
        let len = m.encode().len();
        for n in 2..=16 {
            let share = crate::sharing::Scheme::new(n, n).unwrap().share_len(len);
            assert!(
                share <= crate::wire::msg::MAX_DATA,
                "({n},{n}): a manifest of {len} bytes makes shares of {share}"
            );
        }
    }

    #[test]
    fn inconsistent_manifests_are_refused_by_reason() {
        let m = manifest(&[1024, 10], 1);
        assert!(matches!(
            Manifest::decode(&[8; 16], &m.encode()),
            Err(ManifestError::Inconsistent { .. })
        ));
        let mut gap = m.clone();
        gap.chunks[1].offset += 1;
        assert!(gap
            .check(&m.id)
            .unwrap_err()
            .to_string()
            .contains("chunk 1"));
        let mut root = m.clone();
        root.root = [0; 32];
        assert!(root
            .check(&m.id)
            .unwrap_err()
            .to_string()
            .contains("Merkle"));
        let mut size = m.clone();
        size.size += 1;
        assert!(size.check(&m.id).is_err());
        for format in [0, 3] {
            let mut fmt = m.clone();
            fmt.format = format;
            let e = Manifest::decode(&m.id, &fmt.encode()).unwrap_err();
            assert!(
                matches!(e, ManifestError::Format { format: f, .. } if f == format),
                "{e}"
            );
            assert!(e.to_string().contains("reads 1 to 2"), "{e}");
        }
        // A format that does not go with the leaf hash named.
        let mut fmt = m.clone();
        fmt.format = 1;
        let e = Manifest::decode(&m.id, &fmt.encode()).unwrap_err();
        assert!(e.to_string().contains("format 1 with Pieces"), "{e}");
        assert!(matches!(
            Manifest::decode(&m.id, b"short"),
            Err(ManifestError::TooShort { .. })
        ));
    }

    /// A version of whole-chunk leaves keeps format 1, byte for byte what builds before format
    /// 2 wrote and read (no `leaf` field); a version of piece leaves gets format 2.
    #[test]
    fn the_leaf_hash_picks_the_format_and_comes_back_in_the_record() {
        let mut rec = manifest(&[1024, 10], 1).file_record();
        assert_eq!(rec.leaf, LeafHash::Pieces);
        let chunks = manifest(&[1024, 10], 1).chunk_records(|_| Vec::new());
        let root = manifest(&[1024, 10], 1).root;
        let m = Manifest::new(&rec, root, &chunks, 1);
        assert_eq!((m.format, m.leaf), (2, LeafHash::Pieces));
        let bytes = m.encode();
        let json = std::str::from_utf8(&bytes[..bytes.len() - 32]).unwrap();
        assert!(json.contains(r#""leaf":"pieces""#), "{json}");
        assert_eq!(Manifest::decode(&m.id, &m.encode()).unwrap(), m);

        rec.leaf = LeafHash::Whole;
        let m = Manifest::new(&rec, root, &chunks, 1);
        assert_eq!((m.format, m.leaf), (1, LeafHash::Whole));
        let bytes = m.encode();
        let json = std::str::from_utf8(&bytes[..bytes.len() - 32]).unwrap();
        assert!(
            json.starts_with(r#"{"format":1,"#) && !json.contains("leaf"),
            "{json}"
        );
        let back = Manifest::decode(&m.id, &bytes).unwrap();
        assert_eq!(back.file_record().leaf, LeafHash::Whole);
    }

    #[test]
    fn the_latest_written_manifest_wins_a_name() {
        let mut a = manifest(&[10], 100);
        a.id = [1; 16];
        a.mtime = 999; // a newer mtime does not win over a later rename or commit
        let mut b = manifest(&[20], 200);
        b.id = [2; 16];
        let mut c = manifest(&[30], 50);
        c.id = [3; 16];
        c.name = "other".into();
        let (w, s) = resolve(vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(w, vec![b, c]);
        assert_eq!(s, vec![a]);
    }

    #[test]
    fn debug_shows_no_chunk_hash() {
        let m = manifest(&[10], 1);
        let d = format!("{m:?}");
        assert!(!d.contains(&merkle::hex(&[0u8; 32])), "{d}");
        assert!(d.contains("a.cram"));
    }
}
