//! A durable flush of a sled database.
//!
//! sled 0.34.7's `Db::flush` writes its log with `pwrite` and `sync_file_range` on Linux
//! (`pagecache/iobuf.rs`), which neither writes the file's metadata (the log growing) nor
//! flushes the device's write cache; only its background flusher calls `fsync`, every 500 ms.
//! Values over its blob threshold go to files of their own that it never syncs. So after a
//! power loss or a kernel crash a flushed commit may be gone. [`SledSync::flush`] follows
//! sled's flush with an `fdatasync` of its log and an `fsync` of every new blob file.
//!
//! Fail-stop: Linux reports a write-back error once per open file, and a later sync on it can
//! succeed with the failed pages marked clean and lost. So after one failed sync every later
//! flush fails too, with the first error, until the database is opened again.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The files of the sled database in one directory, to make its flushes durable.
#[derive(Debug)]
pub struct SledSync {
    log: File,
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The first failed sync's error (kind and text), after which every flush fails.
    failed: Option<(io::ErrorKind, String)>,
    /// Blob files already synced (sled never rewrites one in place).
    synced_blobs: HashSet<OsString>,
}

impl SledSync {
    /// For the database at `dir`, already opened by sled (which made its files). Syncs its
    /// files, the directory and the directory's parent, so that the database is found whole
    /// after a crash.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        if let Ok(conf) = File::open(dir.join("conf")) {
            conf.sync_all()?;
        }
        log.sync_all()?;
        File::open(dir)?.sync_all()?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(Self {
            log,
            dir: dir.to_path_buf(),
            state: Mutex::default(),
        })
    }

    /// Makes every flush from now on fail, as one after a failed sync does (tests).
    #[cfg(test)]
    pub(crate) fn fail_from_now(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.failed = Some((io::ErrorKind::Other, "made to fail by a test".into()));
    }

    /// `db.flush()`, then durably: once this returns Ok, every write to `db` made before it
    /// was called survives a power loss.
    pub fn flush(&self, db: &sled::Db) -> sled::Result<()> {
        let state = || self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((kind, text)) = &state().failed {
            return Err(sled::Error::Io(io::Error::new(
                *kind,
                format!("an earlier sync of {} failed ({text}); its commits since are refused until it is opened again", self.dir.display()),
            )));
        }
        let failed = |e: String, kind| {
            state().failed.get_or_insert((kind, e));
        };
        // sled's own flush syncs its log's pages (`sync_file_range`): a write-back error
        // reported there is reported once, so it stops later flushes just as ours does.
        if let Err(e) = db.flush() {
            let kind = match &e {
                sled::Error::Io(io) => io.kind(),
                _ => io::ErrorKind::Other,
            };
            failed(e.to_string(), kind);
            return Err(e);
        }
        // The log's fdatasync runs outside the lock: flushes of several threads overlap.
        let synced = self
            .sync_blobs(&mut state())
            .and_then(|()| self.log.sync_data());
        synced.map_err(|e| {
            failed(e.to_string(), e.kind());
            sled::Error::Io(e)
        })
    }

    fn sync_blobs(&self, st: &mut State) -> io::Result<()> {
        let blobs = self.dir.join("blobs");
        match std::fs::read_dir(&blobs) {
            Ok(entries) => {
                let mut new = false;
                let mut seen = HashSet::new();
                for entry in entries {
                    let name = entry?.file_name();
                    seen.insert(name.clone());
                    if st.synced_blobs.contains(&name) {
                        continue;
                    }
                    match File::open(blobs.join(&name)) {
                        Ok(f) => f.sync_all()?,
                        // Collected by sled meanwhile.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    }
                    st.synced_blobs.insert(name);
                    new = true;
                }
                // Blobs sled collected are forgotten.
                st.synced_blobs.retain(|n| seen.contains(n));
                if new {
                    File::open(&blobs)?.sync_all()?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(())
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
        let blobs: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!blobs.is_empty(), "the large value went to a blob file");
        let synced = &sync.state.lock().unwrap().synced_blobs;
        assert!(
            blobs.iter().all(|b| synced.contains(b)),
            "the flush synced every blob file: {blobs:?} against {synced:?}"
        );
        drop(db);
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        assert_eq!(db.get(b"large").unwrap().unwrap().len(), 1 << 20);
    }

    #[test]
    fn after_a_failed_sync_every_flush_fails_until_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let sync = SledSync::open(dir.path()).unwrap();
        sync.flush(&db).unwrap();
        // As a failed fdatasync leaves it (no error can be injected into one here).
        sync.state.lock().unwrap().failed = Some((io::ErrorKind::Other, "EIO".into()));
        db.insert(b"k", &b"v"[..]).unwrap();
        let e = sync.flush(&db).expect_err("fail-stop").to_string();
        assert!(
            e.contains("EIO") && e.contains(&dir.path().display().to_string()),
            "{e}"
        );
        assert!(sync.flush(&db).is_err(), "and the next one");
        drop(sync);
        SledSync::open(dir.path()).unwrap().flush(&db).unwrap();
    }

    #[test]
    fn a_directory_without_a_sled_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = SledSync::open(dir.path()).expect_err("no sled database there");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
