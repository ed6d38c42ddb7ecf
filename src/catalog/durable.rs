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

/// Opens a sled database with `config`, waiting up to 3 s for a lock this process may
/// still hold: a database just dropped whose last background write still has its file for a
/// moment (seen when a catalog or a site index is reopened at once, under load). A lock held
/// by another process fails the same way after the wait.
pub fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
    let start = std::time::Instant::now();
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && start.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// The files of the sled database in one directory, to make its flushes durable.
pub struct SledSync {
    log: File,
    dir: PathBuf,
    state: Mutex<State>,
    /// Set with `state.failed`: read by [`SledSync::check`] without the lock, which a flush
    /// holds through its fdatasync (a put checking first must not wait for that).
    tripped: std::sync::atomic::AtomicBool,
    /// Run by a flush between sled's flush and our syncs (tests: another flush's failure
    /// landing there).
    #[cfg(test)]
    between: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for SledSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledSync")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
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
            tripped: Default::default(),
            #[cfg(test)]
            between: Mutex::default(),
        })
    }

    /// Makes every flush from now on fail, as one after a failed sync does (tests, here and
    /// in the site daemon's crate: a failed sync needs a failing disk otherwise).
    #[doc(hidden)]
    pub fn fail_from_now(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.trip(
            &mut st,
            io::ErrorKind::Other,
            "made to fail by a test".into(),
        );
    }

    /// `db.flush()`, then durably: once this returns Ok, every write to `db` made before it
    /// was called survives a power loss.
    pub fn flush(&self, db: &sled::Db) -> sled::Result<()> {
        let state = || self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refused(&state())?;
        // sled's own flush syncs its log's pages (`sync_file_range`): a write-back error
        // reported there is reported once, so it stops later flushes just as ours does.
        if let Err(e) = db.flush() {
            let kind = match &e {
                sled::Error::Io(io) => io.kind(),
                _ => io::ErrorKind::Other,
            };
            self.trip(&mut state(), kind, e.to_string());
            return Err(e);
        }
        #[cfg(test)]
        if let Some(f) = self.between.lock().unwrap().take() {
            f();
        }
        // Checked again, synced and any failure recorded in one hold of the lock: a flush
        // that checked before another's sync failed, then synced the same file after it,
        // would be told Ok by a kernel that reports a write-back error once (the other
        // sync had it), its commit not on disk (so it was in session 23, whose syncs ran
        // under the lock all the same but whose failure was recorded after letting go).
        let mut st = state();
        self.refused(&st)?;
        let synced = self.sync_blobs(&mut st).and_then(|()| self.log.sync_data());
        synced.map_err(|e| {
            self.trip(&mut st, e.kind(), e.to_string());
            sled::Error::Io(e)
        })
    }

    /// Ok, or the error every flush fails with since a sync failed: a caller can refuse work
    /// that a flush would only refuse at its end (a site's put, before it allocates). Takes
    /// no lock unless a sync has failed.
    pub fn check(&self) -> sled::Result<()> {
        if !self.tripped.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.refused(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Record the first failed sync.
    fn trip(&self, st: &mut State, kind: io::ErrorKind, text: String) {
        st.failed.get_or_insert((kind, text));
        self.tripped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The error every flush fails with once a sync has failed.
    fn refused(&self, st: &State) -> sled::Result<()> {
        match &st.failed {
            Some((kind, text)) => Err(sled::Error::Io(io::Error::new(
                *kind,
                format!("an earlier sync of {} failed ({text}); its commits since are refused until it is opened again", self.dir.display()),
            ))),
            None => Ok(()),
        }
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
        sync.check().unwrap();
        // As a failed fdatasync leaves it (no error can be injected into one here).
        sync.trip(
            &mut sync.state.lock().unwrap(),
            io::ErrorKind::Other,
            "EIO".into(),
        );
        db.insert(b"k", &b"v"[..]).unwrap();
        let e = sync.flush(&db).expect_err("fail-stop").to_string();
        assert!(
            e.contains("EIO") && e.contains(&dir.path().display().to_string()),
            "{e}"
        );
        assert!(sync.flush(&db).is_err(), "and the next one");
        assert!(sync.check().is_err(), "and a check before any work");
        drop(sync);
        SledSync::open(dir.path()).unwrap().flush(&db).unwrap();
    }

    /// A flush that checked for an earlier failure before another flush's sync failed, then
    /// synced after it, must fail too: the kernel reports a write-back error to one sync only,
    /// and its own would be told Ok with its commit lost.
    #[test]
    fn a_flush_under_way_when_another_sync_fails_fails_too() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let sync = std::sync::Arc::new(SledSync::open(dir.path()).unwrap());
        let other = sync.clone();
        *sync.between.lock().unwrap() = Some(Box::new(move || {
            // As the other flush's failed fdatasync leaves it.
            other.trip(
                &mut other.state.lock().unwrap(),
                io::ErrorKind::Other,
                "EIO".into(),
            );
        }));
        db.insert(b"k", &b"v"[..]).unwrap();
        let e = sync
            .flush(&db)
            .expect_err("told Ok after another's sync failed");
        assert!(e.to_string().contains("EIO"), "{e}");
    }

    #[test]
    fn a_directory_without_a_sled_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = SledSync::open(dir.path()).expect_err("no sled database there");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
