//! The home site's catalog in sled: patients, files, chunks and where each share lives, sites,
//! and an append-only audit log.
//!
//! Trees and keys (values are JSON, so an operator can read them with any sled tool):
//!
//! | tree       | key                              | value            |
//! |------------|----------------------------------|------------------|
//! | `patients` | patient id (UTF-8)               | [`PatientRecord`] |
//! | `names`    | patient id, 0x00, file name      | file id (16 bytes) of the committed version |
//! | `files`    | file id (16 bytes)               | [`FileRecord`]   |
//! | `chunks`   | file id, chunk index (u64 BE)    | [`ChunkRecord`]  |
//! | `audit`    | sequence (u64 BE)                | [`AuditEntry`]   |
//! | `cards`    | card CHUID GUID (16 bytes)       | [`cards::CardBinding`] |
//!
//! A file is written under a fresh file id in state `Writing`, invisible in `names`; commit
//! flips it to `Committed` and points its name at it in one transaction, then flushes. So a
//! crash at any point leaves either the old version or the new one visible, never a mix, and
//! a `Writing` record left by a crash is found and garbage-collected at the next mount.
pub mod cards;
pub mod durable;
pub mod manifest;
pub mod merkle;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};

pub use merkle::Hash;

pub type FileId = [u8; 16];

/// The outcome of a write that checks the record it read is still there (see
/// [`Catalog::update_record`]).
enum Swap<T> {
    Done(T),
    /// The record changed after it was read: nothing was written.
    Stale,
}

impl<T> Swap<T> {
    /// The outcome of a write that gave no record read to check, which is never stale.
    fn unchecked(self) -> T {
        match self {
            Swap::Done(t) => t,
            Swap::Stale => unreachable!("a write with no record read to check is never stale"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Db { path: PathBuf, source: sled::Error },
    #[error("catalog {path}: record {key} is unreadable: {reason}")]
    Corrupt {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("patient id {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - not starting with '.'")]
    InvalidPatient(String),
    #[error("file name {0:?} is invalid: 1-255 bytes, no '/' or NUL, not '.' or '..'")]
    InvalidName(String),
    #[error("patient {0} does not exist")]
    NoPatient(String),
    #[error("patient {0} already exists")]
    PatientExists(String),
    #[error("patient {0} still has files")]
    PatientNotEmpty(String),
    #[error("{patient}/{name} does not exist")]
    NoFile { patient: String, name: String },
    #[error("file version {0} is not being written")]
    NotWriting(String),
}

type Result<T> = std::result::Result<T, CatalogError>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PatientRecord {
    pub created: u64,
    /// Who made the folder (`mkdir`), or was given it (`chown`); `None`: the mount's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// The folder's permission bits; `None`: 0755.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// The Unix owner of a file or patient folder, as the kernel checks it (the mount runs with
/// `default_permissions`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    Writing,
    Committed,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRecord {
    #[serde(with = "hex16")]
    pub id: FileId,
    pub patient: String,
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    pub k: u8,
    pub n: u8,
    pub state: FileState,
    /// Merkle root over the chunk hashes, set at commit.
    #[serde(default, with = "opt_hex32")]
    pub root: Option<Hash>,
    /// How its chunk hashes are computed (absent in records from before there was a choice).
    #[serde(default, skip_serializing_if = "merkle::LeafHash::is_whole")]
    pub leaf: merkle::LeafHash,
    pub mode: u32,
    pub created: u64,
    pub mtime: u64,
    /// Who created the file (kept when it is replaced or renamed), or was given it by
    /// `chown`; `None`: the mount's user (versions from before owners were kept, or restored
    /// by a catalog rebuild: manifests do not carry owners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// Where share `share` of a chunk lives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShareLocation {
    pub share: u8,
    pub site: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkRecord {
    /// Offset of the chunk's first byte in the file. Chunks are `chunk_size` long except where
    /// an fsync cut one short, and the last.
    pub offset: u64,
    /// Plaintext bytes in the chunk.
    pub len: u32,
    #[serde(with = "hex32")]
    pub hash: Hash,
    pub shares: Vec<ShareLocation>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A catalog key as an error names it: as text when it is (a patient's folder and a file
/// name), else in hex (a version's id, a chunk's id and index), which lossy UTF-8 made
/// unreadable.
fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_string(),
        _ => format!("0x{}", merkle::hex(key)),
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn validate_patient(id: &str) -> Result<()> {
    let ok = (1..=64).contains(&id.len())
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ok.then_some(())
        .ok_or_else(|| CatalogError::InvalidPatient(id.to_string()))
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=255).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0']);
    ok.then_some(())
        .ok_or_else(|| CatalogError::InvalidName(name.to_string()))
}

fn name_key(patient: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(patient.len() + 1 + name.len());
    k.extend_from_slice(patient.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

fn chunk_key(id: &FileId, index: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(id);
    k[16..].copy_from_slice(&index.to_be_bytes());
    k
}

pub struct Catalog {
    path: PathBuf,
    db: sled::Db,
    /// Makes `db`'s flushes durable (sled's own are not).
    sync: durable::SledSync,
    patients: sled::Tree,
    names: sled::Tree,
    files: sled::Tree,
    chunks: sled::Tree,
    audit: sled::Tree,
    /// Versions that lost their name (replaced, unlinked), until their shares are deleted.
    retired: sled::Tree,
    /// Single values: the highest manifest seq written or restored ([`MANIFEST_SEQ`]).
    meta: sled::Tree,
    /// Versions whose manifest at the sites is older than their record (a rewrite after a
    /// rename or attribute change failed or was cut short), until one is rewritten.
    stale_manifests: sled::Tree,
    /// Held (shared) while a name is given to a version, and (exclusive) while a patient is
    /// checked empty and removed: no name lands in a patient between the two.
    patient_names: std::sync::RwLock<()>,
}

/// Key in `meta` of the highest manifest seq (u64, big-endian) written or restored.
const MANIFEST_SEQ: &[u8] = b"manifest-seq";
/// Key in `meta` present while a catalog rebuild fills this catalog (see
/// [`Catalog::set_rebuilding`]).
const REBUILDING: &[u8] = b"rebuild-unfinished";
/// Key in `meta` present once `stale_manifests` holds what the audit log says (catalogs from
/// before the tree recorded their stale manifests in the audit log alone).
const STALE_FROM_AUDIT: &[u8] = b"stale-manifests-from-audit";

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

/// Creates the catalog's directory, or tightens an existing one, to mode 0700: it holds patient
/// ids, file names, the SHA-256 of every chunk and the audit log (uids, pids), and sled makes
/// its files by the caller's umask (0644 under the usual 022).
fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            "catalog {}: mode {mode:03o} let other users read it; set to 700",
            path.display()
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Self> {
        let err = |source| CatalogError::Db {
            path: path.to_path_buf(),
            source,
        };
        private_dir(path).map_err(|e| err(sled::Error::Io(e)))?;
        let db = durable::open_sled(
            &sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput),
        )
        .map_err(err)?;
        let sync = durable::SledSync::open(path).map_err(|e| err(sled::Error::Io(e)))?;
        let tree = |name: &str| db.open_tree(name).map_err(err);
        Ok(Self {
            path: path.to_path_buf(),
            patients: tree("patients")?,
            names: tree("names")?,
            files: tree("files")?,
            chunks: tree("chunks")?,
            audit: tree("audit")?,
            retired: tree("retired")?,
            meta: tree("meta")?,
            stale_manifests: tree("stale_manifests")?,
            db,
            sync,
            patient_names: std::sync::RwLock::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, source: sled::Error) -> CatalogError {
        CatalogError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, key: &[u8], value: &[u8]) -> Result<T> {
        serde_json::from_slice(value).map_err(|e| CatalogError::Corrupt {
            path: self.path.clone(),
            key: key_text(key),
            reason: e.to_string(),
        })
    }

    /// Every value of a tree (or a range of one), decoded.
    fn decode_all<T: for<'de> Deserialize<'de>>(&self, items: sled::Iter) -> Result<Vec<T>> {
        items
            .map(|item| {
                let (k, v) = item.map_err(|e| self.db_err(e))?;
                self.decode(&k, &v)
            })
            .collect()
    }

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).expect("catalog records always serialize")
    }

    /// Make every earlier write durable (fdatasync; see [`durable`]). Called at every
    /// commit point.
    pub fn flush(&self) -> Result<()> {
        self.sync.flush(&self.db).map_err(|e| self.db_err(e))
    }

    /// Makes every flush fail from now on, as after a failed sync (tests).
    #[cfg(test)]
    pub(crate) fn fail_flushes(&self) {
        self.sync.fail_from_now();
    }

    /// The record of `id` if it is the committed version its name points at (read from the
    /// catalog's current state, durable or not).
    pub fn named_version(&self, id: &FileId) -> Result<Option<FileRecord>> {
        let Some(v) = self.files.get(id).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        let rec: FileRecord = self.decode(id, &v)?;
        let named = rec.state == FileState::Committed
            && self
                .names
                .get(name_key(&rec.patient, &rec.name))
                .map_err(|e| self.db_err(e))?
                .as_deref()
                == Some(id.as_slice());
        Ok(named.then_some(rec))
    }

    /// The highest manifest seq written or restored (0 if none): later manifests must sort
    /// after it whatever the clock says.
    pub fn manifest_seq(&self) -> Result<u64> {
        let v = self.meta.get(MANIFEST_SEQ).map_err(|e| self.db_err(e))?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Mark (durably) that a catalog rebuild is filling this catalog, or that it finished. A
    /// rebuild cut short (a crash, an error) leaves the mark, and a mount refuses the catalog
    /// (it would serve part of the patients' files as if it were all).
    pub fn set_rebuilding(&self, on: bool) -> Result<()> {
        let r = if on {
            self.meta.insert(REBUILDING, &b"1"[..]).map(|_| ())
        } else {
            self.meta.remove(REBUILDING).map(|_| ())
        };
        r.map_err(|e| self.db_err(e))?;
        self.flush()
    }

    /// Whether a catalog rebuild into this catalog began and did not finish.
    pub fn rebuild_unfinished(&self) -> Result<bool> {
        self.meta
            .contains_key(REBUILDING)
            .map_err(|e| self.db_err(e))
    }

    /// Raise the stored manifest seq to `seq` (never lowers it). Durable with the next flush.
    pub fn raise_manifest_seq(&self, seq: u64) -> Result<()> {
        self.meta
            .fetch_and_update(MANIFEST_SEQ, |old| {
                let old = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map_or(0, u64::from_be_bytes);
                Some(old.max(seq).to_be_bytes().to_vec())
            })
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    // ---- patients -------------------------------------------------------------------------

    pub fn add_patient(&self, id: &str) -> Result<()> {
        self.add_patient_owned(id, None, None)
    }

    /// [`Catalog::add_patient`] with the folder's owner and permission bits (`mkdir`).
    pub fn add_patient_owned(
        &self,
        id: &str,
        owner: Option<Owner>,
        mode: Option<u32>,
    ) -> Result<()> {
        validate_patient(id)?;
        let rec = Self::encode(&PatientRecord {
            created: now_secs(),
            owner,
            mode: mode.map(|m| m & 0o7777),
        });
        let prev = self
            .patients
            .compare_and_swap(id, None as Option<&[u8]>, Some(rec))
            .map_err(|e| self.db_err(e))?;
        if prev.is_err() {
            return Err(CatalogError::PatientExists(id.to_string()));
        }
        self.flush()
    }

    pub fn patient(&self, id: &str) -> Result<Option<PatientRecord>> {
        match self.patients.get(id).map_err(|e| self.db_err(e))? {
            Some(v) => self.decode(id.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    pub fn patients(&self) -> Result<Vec<String>> {
        self.patients
            .iter()
            .keys()
            .map(|k| {
                k.map(|k| String::from_utf8_lossy(&k).into_owned())
                    .map_err(|e| self.db_err(e))
            })
            .collect()
    }

    pub fn remove_patient(&self, id: &str) -> Result<()> {
        if self.patient(id)?.is_none() {
            return Err(CatalogError::NoPatient(id.to_string()));
        }
        let _names = self
            .patient_names
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if !self.files_of(id)?.is_empty() {
            return Err(CatalogError::PatientNotEmpty(id.to_string()));
        }
        self.patients.remove(id).map_err(|e| self.db_err(e))?;
        self.flush()
    }

    // ---- files ----------------------------------------------------------------------------

    /// Committed files of a patient, by name.
    pub fn files_of(&self, patient: &str) -> Result<Vec<FileRecord>> {
        let mut prefix = patient.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.names.scan_prefix(&prefix) {
            let (key, id) = item.map_err(|e| self.db_err(e))?;
            let name = String::from_utf8_lossy(&key[prefix.len()..]);
            if let Some(rec) = self.named(patient, &name, &to_id(&id))? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The committed version of `patient/name`.
    pub fn file(&self, patient: &str, name: &str) -> Result<Option<FileRecord>> {
        // Looked up again if the name moved between its read and its record's (a rename).
        for _ in 0..4 {
            let Some(id) = self
                .names
                .get(name_key(patient, name))
                .map_err(|e| self.db_err(e))?
            else {
                return Ok(None);
            };
            if let Some(rec) = self.named(patient, name, &to_id(&id))? {
                return Ok(Some(rec));
            }
        }
        Ok(None)
    }

    /// The version `patient/name` points at, which must record that name: a record under
    /// another name (names swapped in the catalog's files) would serve one file's bytes, each
    /// chunk matching its hash, as another's. A rename between the two reads (the name and
    /// the record are read apart; the rename changes both at once) is no such thing: the name
    /// no longer points at `id`, and is taken as gone.
    fn named(&self, patient: &str, name: &str, id: &FileId) -> Result<Option<FileRecord>> {
        let Some(rec) = self.file_by_id(id)? else {
            return Ok(None);
        };
        if (rec.patient.as_str(), rec.name.as_str()) != (patient, name) {
            let now = self
                .names
                .get(name_key(patient, name))
                .map_err(|e| self.db_err(e))?;
            if now.is_none_or(|now| to_id(&now) != *id) {
                return Ok(None);
            }
            // Renamed away and back between the reads: the record says so by now.
            match self.file_by_id(id)? {
                Some(again) if (again.patient.as_str(), again.name.as_str()) == (patient, name) => {
                    return Ok(Some(again))
                }
                None => return Ok(None),
                Some(_) => {}
            }
            return Err(CatalogError::Corrupt {
                path: self.path.clone(),
                key: format!("{patient}/{name}"),
                reason: format!(
                    "the name points at version {} recorded as {}/{} (catalog altered?)",
                    merkle::hex(id),
                    rec.patient,
                    rec.name
                ),
            });
        }
        Ok(Some(rec))
    }

    pub fn file_by_id(&self, id: &FileId) -> Result<Option<FileRecord>> {
        match self.files.get(id).map_err(|e| self.db_err(e))? {
            Some(v) => self.decode(id, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Start a new version of `patient/name` (invisible until [`Catalog::commit`]).
    pub fn begin(
        &self,
        patient: &str,
        name: &str,
        chunk_size: u32,
        k: u8,
        n: u8,
        mode: u32,
    ) -> Result<FileRecord> {
        self.begin_owned(patient, name, chunk_size, k, n, mode, None)
    }

    /// [`Catalog::begin`] with the new file's owner.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_owned(
        &self,
        patient: &str,
        name: &str,
        chunk_size: u32,
        k: u8,
        n: u8,
        mode: u32,
        owner: Option<Owner>,
    ) -> Result<FileRecord> {
        validate_name(name)?;
        if self.patient(patient)?.is_none() {
            return Err(CatalogError::NoPatient(patient.to_string()));
        }
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).expect("OS random source");
        let now = now_secs();
        let rec = FileRecord {
            id,
            patient: patient.to_string(),
            name: name.to_string(),
            size: 0,
            chunk_size,
            k,
            n,
            state: FileState::Writing,
            root: None,
            leaf: merkle::LeafHash::CURRENT,
            mode,
            created: now,
            mtime: now,
            owner,
        };
        self.files
            .insert(id, Self::encode(&rec))
            .map_err(|e| self.db_err(e))?;
        // Durable before any of its shares can be: a crash then leaves a version recovery
        // knows of and discards, not shares no record points to.
        self.flush()?;
        Ok(rec)
    }

    pub fn put_chunk(&self, id: &FileId, index: u64, chunk: &ChunkRecord) -> Result<()> {
        self.chunks
            .insert(chunk_key(id, index), Self::encode(chunk))
            .map(|_| ())
            .map_err(|e| self.db_err(e))
    }

    pub fn chunk(&self, id: &FileId, index: u64) -> Result<Option<ChunkRecord>> {
        let key = chunk_key(id, index);
        match self.chunks.get(key).map_err(|e| self.db_err(e))? {
            Some(v) => self.decode(&key, &v).map(Some),
            None => Ok(None),
        }
    }

    pub fn chunks(&self, id: &FileId) -> Result<Vec<ChunkRecord>> {
        self.decode_all(self.chunks.scan_prefix(id))
    }

    /// Commit a written version: set its size and Merkle root, point its name at it, flush.
    /// Returns the version it replaced, whose shares the caller deletes. A version may be
    /// committed again as it grows (fsync, then more appends).
    pub fn commit(&self, id: &FileId, size: u64, root: Hash) -> Result<Option<FileRecord>> {
        self.commit_at(id, size, root, now_secs())
    }

    /// [`Catalog::commit`] with a given modification time (the one its manifest records).
    pub fn commit_at(
        &self,
        id: &FileId,
        size: u64,
        root: Hash,
        mtime: u64,
    ) -> Result<Option<FileRecord>> {
        let missing = || CatalogError::NotWriting(merkle::hex(id));
        let replaced = self.update_record(id, missing, |read, mut rec| {
            rec.state = FileState::Committed;
            rec.size = size;
            rec.root = Some(root);
            rec.mtime = mtime;
            let key = name_key(&rec.patient, &rec.name);
            self.swap_name(
                &key,
                Some(id),
                Some((id, Self::encode(&rec), Some(read))),
                None,
            )
        })?;
        self.flush()?;
        Ok(replaced)
    }

    /// Read-modify-write of `files[id]` that loses no concurrent change: `write` gets the
    /// record's stored bytes and the record, and returns `Swap::Stale` if the record is no
    /// longer those bytes when it writes (a chmod, a rename, another commit came between),
    /// and then runs again on the new record. A record gone meanwhile (retired, forgotten)
    /// is the error `missing()`.
    fn update_record<T>(
        &self,
        id: &FileId,
        missing: impl Fn() -> CatalogError,
        mut write: impl FnMut(sled::IVec, FileRecord) -> Result<Swap<T>>,
    ) -> Result<T> {
        loop {
            let Some(read) = self.files.get(id).map_err(|e| self.db_err(e))? else {
                return Err(missing());
            };
            let rec = self.decode(id, &read)?;
            if let Swap::Done(t) = write(read, rec)? {
                return Ok(t);
            }
        }
    }

    /// `files[id] = value` if it still holds `read` (see [`Catalog::update_record`]).
    fn replace_record(&self, id: &FileId, read: &[u8], value: Vec<u8>) -> Result<Swap<()>> {
        Ok(
            match self
                .files
                .compare_and_swap(id, Some(read), Some(value))
                .map_err(|e| self.db_err(e))?
            {
                Ok(()) => Swap::Done(()),
                Err(_) => Swap::Stale,
            },
        )
    }

    /// Atomically set (or remove) `names[key]` and write a file record (if the record is
    /// still the bytes given as read, when given: else nothing changes, and the answer is
    /// `Swap::Stale`); returns the record of the version the name pointed at before, removed
    /// from `files` (its chunks stay until [`Catalog::forget`]).
    fn swap_name(
        &self,
        key: &[u8],
        id: Option<&FileId>,
        record: Option<(&FileId, Vec<u8>, Option<sled::IVec>)>,
        also_remove: Option<&[u8]>,
    ) -> Result<Swap<Option<FileRecord>>> {
        use sled::Transactional;
        // Naming a version needs its patient, then and until the name is in: a patient
        // removed meanwhile (rmdir of a folder whose only file was still being written)
        // would leave a committed file no listing shows.
        let patient = key.split(|&b| b == 0).next().unwrap_or_default();
        let _names = id.map(|_| self.patient_names.read().unwrap_or_else(|e| e.into_inner()));
        if id.is_some()
            && !self
                .patients
                .contains_key(patient)
                .map_err(|e| self.db_err(e))?
        {
            return Err(CatalogError::NoPatient(
                String::from_utf8_lossy(patient).into_owned(),
            ));
        }
        let res: std::result::Result<Option<sled::IVec>, TransactionError<()>> =
            (&self.names, &self.files, &self.retired).transaction(|(names, files, retired)| {
                if let Some((id, _, Some(read))) = &record {
                    if files.get(id.as_slice())?.as_ref() != Some(read) {
                        return Err(ConflictableTransactionError::Abort(()));
                    }
                }
                let prev = match id {
                    Some(id) => names.insert(key, id.as_slice())?,
                    None => names.remove(key)?,
                };
                let mut old = None;
                if let Some(prev) = prev {
                    if id.is_none_or(|id| prev.as_ref() != id) {
                        old = files.remove(prev.as_ref())?;
                        if let Some(v) = &old {
                            retired.insert(prev.as_ref(), v)?;
                        }
                    }
                }
                if let Some((id, value, _)) = &record {
                    files.insert(id.as_slice(), value.as_slice())?;
                }
                if let Some(other) = also_remove {
                    names.remove(other)?;
                }
                Ok::<_, ConflictableTransactionError<()>>(old)
            });
        let old = match res {
            Ok(old) => old,
            Err(TransactionError::Abort(())) => return Ok(Swap::Stale),
            Err(TransactionError::Storage(e)) => return Err(self.db_err(e)),
        };
        Ok(Swap::Done(old.map(|v| self.decode(key, &v)).transpose()?))
    }

    /// Remove `patient/name`; returns the removed version, whose shares the caller deletes.
    pub fn unlink(&self, patient: &str, name: &str) -> Result<FileRecord> {
        let key = name_key(patient, name);
        let old = self.swap_name(&key, None, None, None)?.unchecked();
        self.flush()?;
        old.ok_or_else(|| CatalogError::NoFile {
            patient: patient.to_string(),
            name: name.to_string(),
        })
    }

    /// Rename within or across patients; returns a version replaced at the target, if any.
    pub fn rename(
        &self,
        patient: &str,
        name: &str,
        new_patient: &str,
        new_name: &str,
    ) -> Result<Option<FileRecord>> {
        validate_name(new_name)?;
        if self.patient(new_patient)?.is_none() {
            return Err(CatalogError::NoPatient(new_patient.to_string()));
        }
        let no_file = || CatalogError::NoFile {
            patient: patient.to_string(),
            name: name.to_string(),
        };
        let old_key = name_key(patient, name);
        let Some(id) = self.names.get(&old_key).map_err(|e| self.db_err(e))? else {
            return Err(no_file());
        };
        let id = to_id(&id);
        if patient == new_patient && name == new_name {
            return Ok(None);
        }
        // Its manifest at the sites keeps the old name until rewritten, so it is marked stale
        // (`stale_manifests`), twice: before the record changes, so that no flush (sled's
        // own, in the background, included) makes the new name durable without a mark; and
        // after, with a new value, so that a rewrite already under way, which may have read
        // the old record, cannot clear it.
        self.note_manifest_stale(&id)?;
        let replaced = self.update_record(&id, no_file, |read, mut rec| {
            // Renamed by someone else since the name was looked up: the name is not its.
            if (rec.patient.as_str(), rec.name.as_str()) != (patient, name) {
                return Err(no_file());
            }
            rec.patient = new_patient.to_string();
            rec.name = new_name.to_string();
            self.swap_name(
                &name_key(new_patient, new_name),
                Some(&id),
                Some((&id, Self::encode(&rec), Some(read))),
                Some(&old_key),
            )
        })?;
        self.note_manifest_stale(&id)?;
        self.flush()?;
        Ok(replaced)
    }

    /// Change a version's mode bits and/or modification time.
    /// Change the owner of version `id` (`chown`; the kernel has checked the caller may).
    pub fn set_owner(&self, id: &FileId, owner: Owner) -> Result<()> {
        let missing = || CatalogError::NotWriting(merkle::hex(id));
        self.update_record(id, missing, |read, mut rec| {
            rec.owner = Some(owner);
            self.replace_record(id, &read, Self::encode(&rec))
        })?;
        self.flush()
    }

    /// Change a patient folder's owner or permission bits (`chown`, `chmod`).
    pub fn set_patient_attrs(
        &self,
        id: &str,
        owner: Option<Owner>,
        mode: Option<u32>,
    ) -> Result<()> {
        loop {
            let Some(read) = self.patients.get(id).map_err(|e| self.db_err(e))? else {
                return Err(CatalogError::NoPatient(id.to_string()));
            };
            let mut rec: PatientRecord = self.decode(id.as_bytes(), &read)?;
            if owner.is_some() {
                rec.owner = owner;
            }
            if let Some(m) = mode {
                rec.mode = Some(m & 0o7777);
            }
            let swapped = self
                .patients
                .compare_and_swap(id, Some(read), Some(Self::encode(&rec)))
                .map_err(|e| self.db_err(e))?;
            if swapped.is_ok() {
                return self.flush();
            }
        }
    }

    pub fn set_attrs(&self, id: &FileId, mode: Option<u32>, mtime: Option<u64>) -> Result<()> {
        let missing = || CatalogError::NotWriting(merkle::hex(id));
        // As for a rename: a committed version's manifest is older than its record until
        // rewritten, marked before and after the change. (A version still being written gets
        // its manifest from the record at its commit.)
        let committed = |c: &Self| -> Result<bool> {
            Ok(c.file_by_id(id)?
                .is_some_and(|r| r.state == FileState::Committed))
        };
        if committed(self)? {
            self.note_manifest_stale(id)?;
        }
        self.update_record(id, missing, |read, mut rec| {
            if let Some(m) = mode {
                rec.mode = m & 0o7777;
            }
            if let Some(t) = mtime {
                rec.mtime = t;
            }
            self.replace_record(id, &read, Self::encode(&rec))
        })?;
        if committed(self)? {
            self.note_manifest_stale(id)?;
        }
        self.flush()
    }

    /// Give a version still being written (never committed: no name points to it) the name
    /// its commit will take. A committed version is renamed by [`Catalog::rename`].
    pub fn rename_unnamed(&self, id: &FileId, new_name: &str) -> Result<()> {
        validate_name(new_name)?;
        let missing = || CatalogError::NotWriting(merkle::hex(id));
        self.update_record(id, missing, |read, mut rec| {
            if rec.state != FileState::Writing {
                return Ok(Swap::Done(()));
            }
            rec.name = new_name.to_string();
            self.replace_record(id, &read, Self::encode(&rec))
        })?;
        self.flush()
    }

    /// Whether the catalog holds no patient and no file version (a rebuild may fill it).
    pub fn is_empty(&self) -> bool {
        self.patients.is_empty() && self.files.is_empty() && self.names.is_empty()
    }

    /// Put back a committed version found at the sites (catalog rebuild): its chunk records,
    /// then its record and name in one transaction, then flush. The patient must exist.
    /// Returns the version the name pointed at before, if any.
    pub fn restore(&self, rec: &FileRecord, chunks: &[ChunkRecord]) -> Result<Option<FileRecord>> {
        validate_name(&rec.name)?;
        if self.patient(&rec.patient)?.is_none() {
            return Err(CatalogError::NoPatient(rec.patient.clone()));
        }
        for (i, c) in chunks.iter().enumerate() {
            self.put_chunk(&rec.id, i as u64, c)?;
        }
        let mut rec = rec.clone();
        rec.state = FileState::Committed;
        let key = name_key(&rec.patient, &rec.name);
        let value = Self::encode(&rec);
        let replaced = self
            .swap_name(&key, Some(&rec.id), Some((&rec.id, value, None)), None)?
            .unchecked();
        self.flush()?;
        Ok(replaced)
    }

    /// Versions left in state `Writing` (by a crash, or an abandoned write).
    pub fn unfinished(&self) -> Result<Vec<FileRecord>> {
        let mut out = Vec::new();
        for item in self.files.iter() {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let rec: FileRecord = self.decode(&k, &v)?;
            if rec.state == FileState::Writing {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Versions replaced or unlinked whose shares are not deleted yet: kept for a reader that
    /// has them open, or left by a crash before their deletion ([`Catalog::forget`] ends them).
    pub fn retired(&self) -> Result<Vec<FileRecord>> {
        self.decode_all(self.retired.iter())
    }

    /// Drop a version's record and chunk records (after its shares were deleted). A committed
    /// version its name still points at is kept whole.
    pub fn forget(&self, id: &FileId) -> Result<()> {
        if self.named_version(id)?.is_some() {
            self.retired.remove(id).map_err(|e| self.db_err(e))?;
            return self.flush();
        }
        let keys: Vec<sled::IVec> = self
            .chunks
            .scan_prefix(id)
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.db_err(e))?;
        for k in keys {
            self.chunks.remove(k).map_err(|e| self.db_err(e))?;
        }
        self.files.remove(id).map_err(|e| self.db_err(e))?;
        self.retired.remove(id).map_err(|e| self.db_err(e))?;
        self.flush()
    }

    // ---- audit ----------------------------------------------------------------------------

    /// Append an audit entry (never removed). Flushed with the next commit, or by the caller.
    pub fn audit(&self, event: &str, patient: Option<&str>, file: Option<&str>, detail: &str) {
        let entry = AuditEntry {
            time_ms: now_ms(),
            event: event.to_string(),
            patient: patient.map(str::to_string),
            file: file.map(str::to_string),
            detail: detail.to_string(),
        };
        let appended = self
            .db
            .generate_id()
            .and_then(|seq| self.audit.insert(seq.to_be_bytes(), Self::encode(&entry)));
        if let Err(e) = appended {
            tracing::error!(catalog = %self.path.display(), "audit append failed: {e}");
        }
        tracing::info!(target: "qgenome::audit", event, patient, file, detail);
    }

    pub fn audit_log(&self) -> Result<Vec<AuditEntry>> {
        self.decode_all(self.audit.iter())
    }

    // ---- manifests older than their records -----------------------------------------------

    /// Record (durably) that the manifest of `id` at the sites is older than its record.
    pub fn mark_manifest_stale(&self, id: &FileId) -> Result<()> {
        self.note_manifest_stale(id)?;
        self.flush()
    }

    /// [`Catalog::mark_manifest_stale`], durable with the next flush. Each mark is a new
    /// value, so that a rewrite begun before it does not clear it ([`StaleMark`]).
    fn note_manifest_stale(&self, id: &FileId) -> Result<()> {
        let mark = self.db.generate_id().map_err(|e| self.db_err(e))?;
        self.stale_manifests
            .insert(id, &mark.to_be_bytes()[..])
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// The stale mark of `id` as it is now, taken before a rewrite reads the record.
    pub fn stale_mark(&self, id: &FileId) -> Result<StaleMark> {
        let mark = self.stale_manifests.get(id).map_err(|e| self.db_err(e))?;
        Ok(StaleMark(mark))
    }

    /// The manifest of `id` was rewritten from its record read after `seen` was taken (or the
    /// version is gone): the mark is cleared unless it was marked again meanwhile (a rename
    /// or an attribute change whose own rewrite is still to come). Durable with the next
    /// flush: a crash before it only costs one more rewrite.
    pub fn manifest_rewritten(&self, id: &FileId, seen: StaleMark) -> Result<()> {
        let _ = self
            .stale_manifests
            .compare_and_swap(id, seen.0, None::<&[u8]>)
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Versions whose manifest is older than their record. The first call on a catalog from
    /// before this record was kept takes them from the audit log's `manifest-stale` entries.
    pub fn stale_manifests(&self) -> Result<Vec<FileId>> {
        if !self
            .meta
            .contains_key(STALE_FROM_AUDIT)
            .map_err(|e| self.db_err(e))?
        {
            // One entry at a time, and one that does not decode is passed over: the audit
            // log holds an entry per read and may be long, and it must not stop a mount.
            for item in self.audit.iter() {
                let (k, v) = item.map_err(|e| self.db_err(e))?;
                let Ok(entry) = self.decode::<AuditEntry>(&k, &v) else {
                    continue;
                };
                let id = entry
                    .detail
                    .strip_prefix("file ")
                    .and_then(|d| d.get(..32))
                    .and_then(|h| unhex::<16>(h).ok());
                if let (true, Some(id)) = (entry.event == "manifest-stale", id) {
                    self.note_manifest_stale(&id)?;
                }
            }
            self.meta
                .insert(STALE_FROM_AUDIT, &b"1"[..])
                .map_err(|e| self.db_err(e))?;
            self.flush()?;
        }
        self.stale_manifests
            .iter()
            .keys()
            .map(|k| k.map(|k| to_id(&k)).map_err(|e| self.db_err(e)))
            .collect()
    }
}

/// A version's stale-manifest mark as read at one moment ([`Catalog::stale_mark`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleMark(Option<sled::IVec>);

fn to_id(bytes: &[u8]) -> FileId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[..16]);
    id
}

mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::merkle::hex(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = String::deserialize(d)?;
        super::unhex(&s).map_err(serde::de::Error::custom)
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::merkle::hex(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        super::unhex(&s).map_err(serde::de::Error::custom)
    }
}

mod opt_hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&super::merkle::hex(v)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::unhex(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Parse lower- or upper-case hex into exactly N bytes.
pub fn unhex<const N: usize>(s: &str) -> std::result::Result<[u8; N], String> {
    if s.len() != 2 * N {
        return Err(format!("expected {} hex digits, got {}", 2 * N, s.len()));
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| format!("not hex: {s:?}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stale manifests are kept until rewritten, across a reopen; a catalog from before they
    /// were kept takes them from its audit log once (and only entries that name a file).
    #[test]
    fn stale_manifests_are_kept_and_an_older_catalog_takes_them_from_its_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        let (a, b) = ([0xa1; 16], [0xb2; 16]);
        {
            // As an older build left it: audit entries only, no record of them.
            let c = Catalog::open(&path).unwrap();
            let stale = |id: &FileId| format!("file {}: not rewritten: site down", merkle::hex(id));
            c.audit("manifest-stale", None, None, &stale(&a));
            c.audit("rename", None, None, &stale(&b));
            c.audit("manifest-stale", None, None, "file zz: garbled");
            c.flush().unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.stale_manifests().unwrap(), [a]);
        // A rewrite clears the mark it began under, not one made after it began.
        let seen = c.stale_mark(&a).unwrap();
        c.mark_manifest_stale(&b).unwrap();
        let early = c.stale_mark(&b).unwrap();
        c.mark_manifest_stale(&b).unwrap();
        c.manifest_rewritten(&b, early).unwrap();
        c.manifest_rewritten(&a, seen).unwrap();
        c.flush().unwrap();
        drop(c);
        // Taken from the audit log once: `a`, rewritten, does not come back.
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.stale_manifests().unwrap(), [b]);
        let seen = c.stale_mark(&b).unwrap();
        c.manifest_rewritten(&b, seen).unwrap();
        assert!(c.stale_manifests().unwrap().is_empty());
    }

    #[test]
    fn a_record_that_does_not_decode_is_named_readably() {
        assert_eq!(key_text(b"P0001/x.cram"), "P0001/x.cram");
        assert_eq!(key_text(&[0x9f, 0x00, 0x41]), "0x9f0041");
        assert_eq!(key_text(b"a\0b"), "0x610062");
    }

    fn cat() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog")).unwrap();
        (dir, c)
    }

    fn chunk(i: u8) -> ChunkRecord {
        ChunkRecord {
            offset: 0,
            len: 10,
            hash: [i; 32],
            shares: vec![ShareLocation {
                share: 0,
                site: "home".into(),
            }],
        }
    }

    /// A patient removed while a version in it was being written (its folder listed no
    /// committed name) takes that version's name away: its commit fails, naming the patient,
    /// instead of naming a file in a patient no listing shows.
    #[test]
    fn a_version_is_not_committed_into_a_removed_patient() {
        let (_d, c) = cat();
        c.add_patient("P0001").unwrap();
        let v = c.begin("P0001", "a.cram", 1 << 20, 2, 3, 0o644).unwrap();
        c.remove_patient("P0001").unwrap();
        let err = c.commit(&v.id, 0, [0; 32]).unwrap_err();
        assert!(
            matches!(err, CatalogError::NoPatient(ref p) if p == "P0001"),
            "{err}"
        );
        assert!(c.patients().unwrap().is_empty());
        assert!(c.file("P0001", "a.cram").unwrap().is_none());
    }

    /// Two names swapped in the catalog's files (each name now at the other's version): both
    /// versions are intact and each chunk matches its hash, and the card's digest, built from
    /// the records, does not change. Looking either name up is an error naming it.
    #[test]
    fn a_name_pointing_at_a_version_recorded_under_another_is_refused() {
        let (_d, c) = cat();
        c.add_patient("P0001").unwrap();
        for (name, fill) in [("tumor.cram", 1u8), ("normal.cram", 2)] {
            let v = c.begin("P0001", name, 1 << 20, 2, 3, 0o644).unwrap();
            c.commit(&v.id, 0, [fill; 32]).unwrap();
        }
        let (t, n) = (
            name_key("P0001", "tumor.cram"),
            name_key("P0001", "normal.cram"),
        );
        let (ti, ni) = (
            c.names.get(&t).unwrap().unwrap(),
            c.names.get(&n).unwrap().unwrap(),
        );
        c.names.insert(&t, ni).unwrap();
        c.names.insert(&n, ti).unwrap();
        let err = c.file("P0001", "tumor.cram").unwrap_err().to_string();
        assert!(
            err.contains("P0001/tumor.cram") && err.contains("recorded as P0001/normal.cram"),
            "{err}"
        );
        let err = c.files_of("P0001").unwrap_err().to_string();
        assert!(err.contains("catalog altered"), "{err}");
    }

    /// A rename between a lookup's two reads (the name's, then its record's) is not taken for
    /// an altered catalog: looking a name up or listing the folder while it is renamed to and
    /// fro gives the file or nothing, never an error.
    #[test]
    fn lookups_racing_renames_never_read_as_an_altered_catalog() {
        let (_d, c) = cat();
        c.add_patient("P0001").unwrap();
        let v = c.begin("P0001", "a", 1 << 20, 2, 3, 0o644).unwrap();
        c.commit(&v.id, 0, [1; 32]).unwrap();
        let c = std::sync::Arc::new(c);
        let renames = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let renamer = {
            let (c, renames) = (c.clone(), renames.clone());
            std::thread::spawn(move || {
                // Each rename flushes the catalog: tens a second.
                for _ in 0..60 {
                    c.rename("P0001", "a", "P0001", "b").unwrap();
                    c.rename("P0001", "b", "P0001", "a").unwrap();
                    renames.fetch_add(2, std::sync::atomic::Ordering::SeqCst);
                }
            })
        };
        let (mut found, mut listed) = (0, 0);
        while !renamer.is_finished() {
            for name in ["a", "b"] {
                if let Some(rec) = c.file("P0001", name).unwrap() {
                    assert_eq!(rec.name, name);
                    found += 1;
                }
            }
            listed += c.files_of("P0001").unwrap().len();
        }
        renamer.join().unwrap();
        assert_eq!(renames.load(std::sync::atomic::Ordering::SeqCst), 120);
        assert!(found > 0 && listed > 0);
    }

    /// Patient ids, names, chunk hashes and the audit log are for the mount's user alone,
    /// whatever the umask: a new catalog directory is 0700, an existing open one is tightened.
    #[test]
    fn the_catalog_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = dir.path().join("a/catalog");
        drop(Catalog::open(&fresh).unwrap());
        assert_eq!(mode(&fresh), 0o700);
        let open = dir.path().join("b");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        drop(Catalog::open(&open).unwrap());
        assert_eq!(mode(&open), 0o700);
    }

    #[test]
    fn a_version_is_invisible_until_commit_and_replaces_atomically() {
        let (_d, c) = cat();
        c.add_patient("P0001").unwrap();
        let v1 = c.begin("P0001", "a.cram", 1 << 20, 2, 3, 0o644).unwrap();
        c.put_chunk(&v1.id, 0, &chunk(1)).unwrap();
        assert!(c.file("P0001", "a.cram").unwrap().is_none());
        assert_eq!(c.unfinished().unwrap().len(), 1);
        assert!(c.commit(&v1.id, 10, [9; 32]).unwrap().is_none());
        let got = c.file("P0001", "a.cram").unwrap().unwrap();
        assert_eq!(
            (got.size, got.state, got.root),
            (10, FileState::Committed, Some([9; 32]))
        );
        let v2 = c.begin("P0001", "a.cram", 1 << 20, 2, 3, 0o644).unwrap();
        assert_eq!(c.file("P0001", "a.cram").unwrap().unwrap().id, v1.id);
        let replaced = c.commit(&v2.id, 0, [0; 32]).unwrap().unwrap();
        assert_eq!(replaced.id, v1.id);
        assert_eq!(c.file("P0001", "a.cram").unwrap().unwrap().id, v2.id);
        assert_eq!(c.chunks(&v1.id).unwrap(), vec![chunk(1)]);
        c.forget(&v1.id).unwrap();
        assert!(c.chunks(&v1.id).unwrap().is_empty());
        assert!(c.file_by_id(&v1.id).unwrap().is_none());
        assert!(c.unfinished().unwrap().is_empty());
    }

    #[test]
    fn rename_and_unlink_move_names_and_report_replaced_versions() {
        let (_d, c) = cat();
        c.add_patient("P1").unwrap();
        c.add_patient("P2").unwrap();
        let a = c.begin("P1", "a", 1024, 2, 3, 0o600).unwrap();
        c.commit(&a.id, 1, [1; 32]).unwrap();
        let b = c.begin("P2", "b", 1024, 2, 3, 0o600).unwrap();
        c.commit(&b.id, 2, [2; 32]).unwrap();
        let replaced = c.rename("P1", "a", "P2", "b").unwrap().unwrap();
        assert_eq!(replaced.id, b.id);
        assert!(c.file("P1", "a").unwrap().is_none());
        let moved = c.file("P2", "b").unwrap().unwrap();
        assert_eq!((moved.id, moved.patient.as_str()), (a.id, "P2"));
        assert!(matches!(
            c.remove_patient("P2"),
            Err(CatalogError::PatientNotEmpty(_))
        ));
        assert_eq!(c.unlink("P2", "b").unwrap().id, a.id);
        assert!(matches!(
            c.unlink("P2", "b"),
            Err(CatalogError::NoFile { .. })
        ));
        c.remove_patient("P2").unwrap();
        assert_eq!(c.patients().unwrap(), vec!["P1".to_string()]);
    }

    /// A commit and a chmod of one version at once: neither writes back a record the other
    /// changed after it was read (a re-commit's size, a mode), and a re-commit of a version
    /// another commit replaced fails instead of taking the name back.
    #[test]
    fn concurrent_changes_to_a_version_lose_nothing() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (_d, c) = cat();
        c.add_patient("P1").unwrap();
        let v = c.begin("P1", "x", 1024, 2, 3, 0o600).unwrap();
        c.commit(&v.id, 0, [0; 32]).unwrap();
        let committed = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for size in 1..=300u64 {
                    c.commit_at(&v.id, size, [1; 32], 7).unwrap();
                    committed.store(size, Ordering::SeqCst);
                }
            });
            s.spawn(|| {
                for i in 0..300u32 {
                    c.set_attrs(&v.id, Some(0o600 | (i & 1)), None).unwrap();
                    // Read after the chmod: a commit that returned before it ended must
                    // still show (a chmod that read before that commit wrote it back).
                    let floor = committed.load(Ordering::SeqCst);
                    let rec = c.file_by_id(&v.id).unwrap().unwrap();
                    assert!(rec.size >= floor, "a chmod wrote back size {}", rec.size);
                    assert_eq!(rec.mode & 1, i & 1, "a commit wrote back the mode");
                }
            });
        });
        let rec = c.file("P1", "x").unwrap().unwrap();
        assert_eq!((rec.size, rec.mode), (300, 0o601));
        // A newer version replaces it; the old one's re-commit finds it retired.
        let w = c.begin("P1", "x", 1024, 2, 3, 0o600).unwrap();
        assert_eq!(c.commit(&w.id, 5, [2; 32]).unwrap().unwrap().id, v.id);
        assert!(matches!(
            c.commit(&v.id, 301, [1; 32]),
            Err(CatalogError::NotWriting(_))
        ));
        assert_eq!(c.file("P1", "x").unwrap().unwrap().id, w.id);
    }

    #[test]
    fn bad_names_are_refused_by_name() {
        let (_d, c) = cat();
        for bad in ["", ".hidden", "a/b", "x y", &"p".repeat(65)] {
            let err = c.add_patient(bad).unwrap_err();
            assert!(err.to_string().contains("patient id"), "{err}");
        }
        c.add_patient("P1").unwrap();
        assert!(matches!(
            c.add_patient("P1"),
            Err(CatalogError::PatientExists(_))
        ));
        for bad in ["", ".", "..", "a/b"] {
            assert!(matches!(
                c.begin("P1", bad, 1, 2, 3, 0),
                Err(CatalogError::InvalidName(_))
            ));
        }
        assert!(matches!(
            c.begin("P9", "a", 1, 2, 3, 0),
            Err(CatalogError::NoPatient(_))
        ));
    }

    #[test]
    fn audit_is_append_only_and_ordered() {
        let (_d, c) = cat();
        c.audit("grant", Some("P1"), None, "admin, 5 min");
        c.audit("read", Some("P1"), Some("a.cram"), "");
        let log = c.audit_log().unwrap();
        assert_eq!(
            log.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
            ["grant", "read"]
        );
        assert_eq!(log[1].file.as_deref(), Some("a.cram"));
    }

    #[test]
    fn restore_puts_back_a_committed_version_under_its_own_id() {
        let (_d, c) = cat();
        assert!(c.is_empty());
        let mut rec = FileRecord {
            id: [4; 16],
            patient: "P1".into(),
            name: "r.cram".into(),
            size: 10,
            chunk_size: 1024,
            k: 2,
            n: 3,
            state: FileState::Writing,
            root: Some([1; 32]),
            leaf: merkle::LeafHash::Pieces,
            mode: 0o600,
            created: 5,
            mtime: 6,
            owner: None,
        };
        assert!(matches!(
            c.restore(&rec, &[chunk(1)]),
            Err(CatalogError::NoPatient(_))
        ));
        c.add_patient("P1").unwrap();
        assert!(!c.is_empty());
        assert!(c.restore(&rec, &[chunk(1)]).unwrap().is_none());
        rec.state = FileState::Committed;
        assert_eq!(c.file("P1", "r.cram").unwrap(), Some(rec));
        assert_eq!(c.chunks(&[4; 16]).unwrap(), vec![chunk(1)]);
        assert!(c.unfinished().unwrap().is_empty());
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        let id = {
            let c = Catalog::open(&path).unwrap();
            c.add_patient("P1").unwrap();
            let v = c.begin("P1", "f", 1024, 2, 3, 0o600).unwrap();
            c.put_chunk(&v.id, 0, &chunk(3)).unwrap();
            c.commit(&v.id, 10, [5; 32]).unwrap();
            v.id
        };
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.file("P1", "f").unwrap().unwrap().id, id);
        assert_eq!(c.chunk(&id, 0).unwrap(), Some(chunk(3)));
    }
}
