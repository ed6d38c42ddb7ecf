//! The crash-safe key ledger of one stream end: "key below X is reserved (sender) or
//! counts as consumed (receiver)". Persisted before any key below X is used.
//!
//! File `<link>.<direction>.ledger`, 8192 bytes: two 64-byte slots at offsets 0 and 4096
//! (separate blocks, so a torn write can damage at most the slot being written). A write
//! goes to the slot the previous write did not use, then `fdatasync`. On load the valid
//! slot with the highest sequence number wins, so a torn write leaves the previous value.
//!
//! ```text
//! slot: offset size field
//!            0    8 magic "QGLEDGER"
//!            8    2 format version, u16 LE (1)
//!           10    1 role: 0 = sender, 1 = receiver
//!           11    5 reserved, zero
//!           16   16 stream id (from the pool header)
//!           32    8 sequence number, u64 LE
//!           40    8 value X (key offset), u64 LE
//!           48    8 reserved, zero
//!           56    8 first 8 bytes of SHA-256(slot bytes 0..56)
//! ```
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::LinkError;

pub const MAGIC: [u8; 8] = *b"QGLEDGER";
pub const VERSION: u16 = 1;
pub const SLOT_LEN: usize = 64;
/// Offset of the second slot (and size of each slot's block).
pub const SLOT_STRIDE: u64 = 4096;
pub const FILE_LEN: u64 = 2 * SLOT_STRIDE;

/// Which end of a stream a ledger belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

/// One persisted ledger record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub role: Role,
    pub stream_id: [u8; 16],
    pub seq: u64,
    pub value: u64,
}

/// What a slot's bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRead {
    Valid(Slot),
    /// Magic matches but the version is newer than this build.
    Future(u16),
    /// Never written, torn or corrupt.
    Invalid,
}

impl Slot {
    pub fn encode(&self) -> [u8; SLOT_LEN] {
        let mut b = [0u8; SLOT_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10] = match self.role {
            Role::Sender => 0,
            Role::Receiver => 1,
        };
        b[16..32].copy_from_slice(&self.stream_id);
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.value.to_le_bytes());
        let sum = Sha256::digest(&b[..56]);
        b[56..64].copy_from_slice(&sum[..8]);
        b
    }

    pub fn decode(b: &[u8]) -> SlotRead {
        if b.len() < SLOT_LEN || b[0..8] != MAGIC {
            return SlotRead::Invalid;
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version > VERSION {
            return SlotRead::Future(version);
        }
        if version != VERSION || Sha256::digest(&b[..56])[..8] != b[56..64] {
            return SlotRead::Invalid;
        }
        let role = match b[10] {
            0 => Role::Sender,
            1 => Role::Receiver,
            _ => return SlotRead::Invalid,
        };
        SlotRead::Valid(Slot {
            role,
            stream_id: b[16..32].try_into().expect("16"),
            seq: u64::from_le_bytes(b[32..40].try_into().expect("8")),
            value: u64::from_le_bytes(b[40..48].try_into().expect("8")),
        })
    }
}

/// Pick the current record from the two slots: any newer-version slot is an error (an older
/// build must not act on a ledger a newer one wrote); otherwise the valid slot with the
/// highest sequence number; `Ok(None)` if neither is valid.
pub fn pick(a: SlotRead, b: SlotRead) -> Result<Option<Slot>, u16> {
    match (a, b) {
        (SlotRead::Future(v), _) | (_, SlotRead::Future(v)) => Err(v),
        (SlotRead::Valid(x), SlotRead::Valid(y)) => Ok(Some(if y.seq > x.seq { y } else { x })),
        (SlotRead::Valid(x), _) | (_, SlotRead::Valid(x)) => Ok(Some(x)),
        _ => Ok(None),
    }
}

/// Persistent storage of one ledger. `store` returns only once the value is durable.
pub trait LedgerStore: Send {
    fn location(&self) -> &Path;
    /// The persisted value.
    fn value(&self) -> u64;
    /// Persist `value` durably.
    fn store(&mut self, value: u64) -> Result<(), LinkError>;
}

/// The ledger file beside a pool, locked (`flock`) for as long as it is open so that two
/// processes can never draw from the same stream.
pub struct FileLedger {
    file: File,
    path: PathBuf,
    link: String,
    current: Slot,
}

impl std::fmt::Debug for FileLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLedger")
            .field("path", &self.path)
            .field("current", &self.current)
            .finish()
    }
}

impl FileLedger {
    /// Open and lock an existing ledger; `Ok(None)` if there is no file at `path`.
    /// Checks role, stream id, version and checksums; changes nothing on disk.
    pub fn open(
        path: &Path,
        link: &str,
        role: Role,
        stream_id: [u8; 16],
    ) -> Result<Option<Self>, LinkError> {
        let io = |op, source| LinkError::LedgerIo {
            link: link.to_string(),
            path: path.to_path_buf(),
            op,
            source,
        };
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("open ledger", e)),
        };
        lock(&file).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => LinkError::Busy {
                link: link.to_string(),
                path: path.to_path_buf(),
            },
            _ => io("lock ledger", e),
        })?;
        let mut buf = [0u8; SLOT_LEN];
        let mut slots = [SlotRead::Invalid; 2];
        for (i, s) in slots.iter_mut().enumerate() {
            *s = match file.read_exact_at(&mut buf, i as u64 * SLOT_STRIDE) {
                Ok(()) => Slot::decode(&buf),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => SlotRead::Invalid,
                Err(e) => return Err(io("read ledger", e)),
            };
        }
        let corrupt = |reason: String| LinkError::LedgerCorrupt {
            link: link.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let current = match pick(slots[0], slots[1]) {
            Err(found) => {
                return Err(LinkError::LedgerFromFuture {
                    link: link.to_string(),
                    path: path.to_path_buf(),
                    found,
                    supported: VERSION,
                })
            }
            Ok(None) => return Err(corrupt("no valid slot".into())),
            Ok(Some(s)) => s,
        };
        if current.role != role {
            return Err(corrupt(format!(
                "ledger of the {:?} end, opened as {:?}",
                current.role, role
            )));
        }
        if current.stream_id != stream_id {
            return Err(LinkError::LedgerForeign {
                link: link.to_string(),
                path: path.to_path_buf(),
            });
        }
        Ok(Some(Self {
            file,
            path: path.to_path_buf(),
            link: link.to_string(),
            current,
        }))
    }

    /// Create a new ledger with value 0 (fails if the file exists), durable, locked.
    pub fn create(
        path: &Path,
        link: &str,
        role: Role,
        stream_id: [u8; 16],
        value: u64,
    ) -> Result<Self, LinkError> {
        let io = |op, source| LinkError::LedgerIo {
            link: link.to_string(),
            path: path.to_path_buf(),
            op,
            source,
        };
        // Written and made durable under a temporary name, then linked into place: a crash
        // never leaves a ledger without a valid slot (which would refuse the link for good).
        let tmp = path.with_extension(format!("ledger.new-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp); // a crashed attempt of an earlier process
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("create ledger", e))?;
        let unlink_tmp = |e| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        // Locked before it has its name, so nobody opens it in between.
        lock(&file).map_err(|e| unlink_tmp(io("lock ledger", e)))?;
        let current = Slot {
            role,
            stream_id,
            seq: 1,
            value,
        };
        // Sequence s lives in slot s % 2: the first store (sequence 2) then goes to the other
        // slot than this one, so a torn first store still leaves this one valid.
        file.set_len(FILE_LEN)
            .and_then(|()| file.write_all_at(&current.encode(), (current.seq % 2) * SLOT_STRIDE))
            .and_then(|()| file.sync_all())
            .map_err(|e| unlink_tmp(io("write ledger", e)))?;
        // Fails if a ledger appeared meanwhile, as creating it in place with O_EXCL did.
        std::fs::hard_link(&tmp, path).map_err(|e| unlink_tmp(io("create ledger", e)))?;
        let _ = std::fs::remove_file(&tmp);
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("fsync ledger directory", e))?;
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            link: link.to_string(),
            current,
        })
    }
}

/// Read the current record of a ledger file without locking or changing it (for status).
pub fn peek(path: &Path, link: &str) -> Result<Option<Slot>, LinkError> {
    let io = |op, source| LinkError::LedgerIo {
        link: link.to_string(),
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open ledger", e)),
    };
    let mut buf = [0u8; SLOT_LEN];
    let mut slots = [SlotRead::Invalid; 2];
    for (i, s) in slots.iter_mut().enumerate() {
        *s = match file.read_exact_at(&mut buf, i as u64 * SLOT_STRIDE) {
            Ok(()) => Slot::decode(&buf),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => SlotRead::Invalid,
            Err(e) => return Err(io("read ledger", e)),
        };
    }
    match pick(slots[0], slots[1]) {
        Err(found) => Err(LinkError::LedgerFromFuture {
            link: link.to_string(),
            path: path.to_path_buf(),
            found,
            supported: VERSION,
        }),
        Ok(None) => Err(LinkError::LedgerCorrupt {
            link: link.to_string(),
            path: path.to_path_buf(),
            reason: "no valid slot".into(),
        }),
        Ok(Some(s)) => Ok(Some(s)),
    }
}

fn lock(f: &File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl LedgerStore for FileLedger {
    fn location(&self) -> &Path {
        &self.path
    }
    fn value(&self) -> u64 {
        self.current.value
    }
    fn store(&mut self, value: u64) -> Result<(), LinkError> {
        // A slot at u64::MAX (forged) must not wrap to 0, which would lose to the old slot.
        let seq = self
            .current
            .seq
            .checked_add(1)
            .ok_or_else(|| LinkError::LedgerCorrupt {
                link: self.link.clone(),
                path: self.path.clone(),
                reason: "slot sequence number exhausted".into(),
            })?;
        let next = Slot {
            seq,
            value,
            ..self.current
        };
        let at = (next.seq % 2) * SLOT_STRIDE;
        self.file
            .write_all_at(&next.encode(), at)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| LinkError::LedgerIo {
                link: self.link.clone(),
                path: self.path.clone(),
                op: "persist ledger",
                source,
            })?;
        self.current = next;
        Ok(())
    }
}

/// A ledger in memory. Clones share the persisted value, so dropping a stream and opening a
/// new one on a clone models a restart.
#[derive(Debug, Clone)]
pub struct MemLedger {
    value: Arc<Mutex<u64>>,
    location: PathBuf,
}

impl MemLedger {
    pub fn new(name: &str) -> Self {
        Self {
            value: Arc::new(Mutex::new(0)),
            location: PathBuf::from(format!("<memory:{name}.ledger>")),
        }
    }
}

impl LedgerStore for MemLedger {
    fn location(&self) -> &Path {
        &self.location
    }
    fn value(&self) -> u64 {
        *self.value.lock().expect("ledger mutex")
    }
    fn store(&mut self, value: u64) -> Result<(), LinkError> {
        *self.value.lock().expect("ledger mutex") = value;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot(seq: u64, value: u64) -> Slot {
        Slot {
            role: Role::Sender,
            stream_id: [7; 16],
            seq,
            value,
        }
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_is_ignored() {
        let a = Slot::decode(&slot(4, 100).encode());
        let b = Slot::decode(&slot(5, 200).encode());
        assert_eq!(pick(a, b), Ok(Some(slot(5, 200))));
        assert_eq!(pick(b, a), Ok(Some(slot(5, 200))));
        let mut torn = slot(6, 300).encode();
        torn[40] ^= 1;
        assert_eq!(pick(a, Slot::decode(&torn)), Ok(Some(slot(4, 100))));
        assert_eq!(pick(SlotRead::Invalid, SlotRead::Invalid), Ok(None));
        let mut future = slot(7, 1).encode();
        future[8] = 2;
        assert_eq!(pick(a, Slot::decode(&future)), Err(2));
    }

    /// A torn write of the first store after creation leaves the created value readable
    /// (it used to land on the created slot itself, leaving no valid slot).
    #[test]
    fn a_torn_first_store_leaves_the_created_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.ledger");
        let mut l = FileLedger::create(&path, "l", Role::Sender, [7; 16], 0).unwrap();
        l.store(4096).unwrap();
        drop(l);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        // Sequence 2 went to slot 0; tear it.
        f.write_all_at(&[0xff; 8], 40).unwrap();
        drop(f);
        let l = FileLedger::open(&path, "l", Role::Sender, [7; 16])
            .unwrap()
            .unwrap();
        assert_eq!(l.value(), 0);
    }

    /// The ledger appears under its name only whole and durable: creating leaves no other
    /// file behind, a leftover of a crashed attempt is no obstacle, and an existing ledger is
    /// never overwritten.
    #[test]
    fn a_ledger_is_created_whole_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.a2b.ledger");
        let leftover = path.with_extension(format!("ledger.new-{}", std::process::id()));
        std::fs::write(&leftover, [0u8; 10]).unwrap();
        let l = FileLedger::create(&path, "l", Role::Sender, [7; 16], 0).unwrap();
        assert_eq!(l.value(), 0);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["l.a2b.ledger"]);
        drop(l);
        assert!(FileLedger::create(&path, "l", Role::Sender, [7; 16], 0).is_err());
        let l = FileLedger::open(&path, "l", Role::Sender, [7; 16])
            .unwrap()
            .unwrap();
        assert_eq!(l.value(), 0);
    }

    /// A slot at the last sequence number (forged: a real ledger never gets there) must not
    /// wrap to 0, which would make the older slot win and roll the ledger back.
    #[test]
    fn the_last_sequence_number_is_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.ledger");
        drop(FileLedger::create(&path, "l", Role::Sender, [7; 16], 0).unwrap());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let at = SLOT_STRIDE; // u64::MAX is odd: slot 1
        f.write_all_at(&slot(u64::MAX, 8192).encode(), at).unwrap();
        drop(f);
        let mut l = FileLedger::open(&path, "l", Role::Sender, [7; 16])
            .unwrap()
            .unwrap();
        assert_eq!(l.value(), 8192);
        let e = l.store(16384).unwrap_err();
        assert!(matches!(e, LinkError::LedgerCorrupt { .. }), "{e}");
        drop(l);
        let l = FileLedger::open(&path, "l", Role::Sender, [7; 16])
            .unwrap()
            .unwrap();
        assert_eq!(l.value(), 8192);
    }

    proptest! {
        #[test]
        fn any_single_byte_change_invalidates(seq in any::<u64>(), value in any::<u64>(), i in 0usize..SLOT_LEN, x in 1u8..) {
            let mut b = slot(seq, value).encode();
            b[i] ^= x;
            let r = Slot::decode(&b);
            prop_assert!(matches!(r, SlotRead::Invalid | SlotRead::Future(_)), "{r:?}");
        }
    }
}
