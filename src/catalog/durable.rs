//! A durable flush of a sled database.
//!
//! sled 0.34.7's `Db::flush` writes its log with `pwrite` and `sync_file_range` on Linux
//! (`pagecache/iobuf.rs`), which neither writes the file's metadata (the log growing) nor
//! flushes the device's write cache; only its background flusher calls `fsync`, every 500 ms.
//! Values over its blob threshold go to files of their own that it never syncs. So after a
//! power loss or a kernel crash a flushed commit may be gone. [`SledSync::flush`] follows
//! sled's flush with an `fdatasync` of its log and an `fsync` of every blob file.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The files of the sled database in one directory, to make its flushes durable.
#[derive(Debug)]
pub struct SledSync {
    log: File,
    dir: PathBuf,
}

impl SledSync {
    /// For the database at `dir`, already opened by sled (which made its files). Syncs the
    /// directory, so that the database's files are found after a crash.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        File::open(dir)?.sync_all()?;
        Ok(Self {
            log,
            dir: dir.to_path_buf(),
        })
    }

    /// `db.flush()`, then durably: once this returns Ok, every write to `db` made before it
    /// was called survives a power loss.
    pub fn flush(&self, db: &sled::Db) -> sled::Result<()> {
        db.flush()?;
        self.sync().map_err(sled::Error::Io)
    }

    fn sync(&self) -> io::Result<()> {
        let blobs = self.dir.join("blobs");
        match std::fs::read_dir(&blobs) {
            Ok(entries) => {
                let mut any = false;
                for entry in entries {
                    let path = entry?.path();
                    match File::open(&path) {
                        Ok(f) => f.sync_all()?,
                        // Collected by sled meanwhile.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                    any = true;
                }
                if any {
                    File::open(&blobs)?.sync_all()?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.log.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_reaches_the_log_and_the_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let sync = SledSync::open(dir.path()).expect("sled made its log");
        db.insert(b"small", &b"v"[..]).unwrap();
        // Over sled's blob threshold (a quarter of a 512 KiB segment).
        db.insert(b"large", vec![7u8; 1 << 20]).unwrap();
        sync.flush(&db).unwrap();
        assert!(
            std::fs::read_dir(dir.path().join("blobs")).unwrap().count() > 0,
            "the large value went to a blob file, which the flush synced"
        );
        drop(db);
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(db.get(b"large").unwrap().unwrap().len(), 1 << 20);
    }

    #[test]
    fn a_database_without_its_log_is_refused_naming_nothing_silently() {
        let dir = tempfile::tempdir().unwrap();
        let e = SledSync::open(dir.path()).expect_err("no sled database there");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
