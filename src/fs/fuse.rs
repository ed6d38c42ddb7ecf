//! The `/qgenome` tree over FUSE: `/<patient>/<file>`.
//!
//! Every open uses FOPEN_DIRECT_IO: no plaintext lingers in the kernel page cache where a read
//! without consent could find it, and writes arrive in large requests. Opens and reads are
//! answered later, off the request loops: on a worker pool while the patient's consent is
//! active, and on a thread of their own while they wait for it, so a blocked reader never holds
//! up listings, other patients' reads and writes, or the request loops.
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::engine::{Engine, EngineError, FileWriter};
use crate::catalog::{CatalogError, ChunkRecord, FileRecord, Owner};
use crate::consent::Consent;

const ROOT: u64 = 1;
const DIR_TTL: Duration = Duration::from_secs(1);
/// File sizes change while they are written: no attribute caching for files.
const FILE_TTL: Duration = Duration::ZERO;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Node {
    Root,
    Patient(String),
    File(String, String),
}

/// A node the kernel was told of, and how many of its lookups the kernel still holds.
struct Known {
    node: Node,
    /// Entry replies (lookup, create, mkdir) not yet given back by a FORGET. A node known
    /// only from a directory listing has none: the kernel holds no reference to it.
    lookups: u64,
    /// Open directory listings ([`Listing`]) that gave out this number: while one is open
    /// the number is not swept, so a name listed and then looked up (`ls -l`, `find`) gets
    /// the number its listing showed.
    pins: u32,
    /// Its name went (unlink, rmdir, or a rename over it) while the kernel still held it: it
    /// names nothing now (`getattr` gets ENOENT, the name gets a new number), and stays only
    /// until the kernel forgets it, so that the consent-end page dropping still reaches an
    /// open file's pages.
    detached: bool,
}

/// The mount's inode numbers. A number lives while the kernel holds a lookup of it: a FORGET
/// that gives back the last one drops it, so the table follows the kernel's inode cache, not
/// every name the mount ever saw. Numbers are never reused; a name looked up again after it
/// was forgotten, or created again after it was removed, gets a new one. Numbers given out
/// by `readdir` alone (no lookup) are swept whenever the table has doubled since the last
/// sweep, unless a listing still open gave them out.
struct Inodes {
    by_ino: HashMap<u64, Known>,
    by_node: HashMap<Node, u64>,
    next: u64,
    /// Size of the table above which the next new number first sweeps the unlooked ones.
    sweep_at: usize,
}

/// The smallest table that is ever swept.
const SWEEP_FLOOR: usize = 4096;

impl Inodes {
    fn new() -> Self {
        let mut inodes = Inodes {
            by_ino: HashMap::new(),
            by_node: HashMap::new(),
            next: ROOT,
            sweep_at: SWEEP_FLOOR,
        };
        let root = Known {
            node: Node::Root,
            lookups: 0,
            pins: 0,
            detached: false,
        };
        inodes.by_ino.insert(ROOT, root);
        inodes.by_node.insert(Node::Root, ROOT);
        inodes
    }

    /// The number of `node`, given one if it has none.
    fn ino(&mut self, node: Node) -> u64 {
        if let Some(&i) = self.by_node.get(&node) {
            return i;
        }
        if self.by_ino.len() >= self.sweep_at {
            let by_node = &mut self.by_node;
            self.by_ino.retain(|&i, k| {
                let keep = i == ROOT || k.lookups > 0 || k.pins > 0;
                if !keep && by_node.get(&k.node) == Some(&i) {
                    by_node.remove(&k.node);
                }
                keep
            });
            self.sweep_at = (2 * self.by_ino.len()).max(SWEEP_FLOOR);
        }
        self.next += 1;
        let i = self.next;
        self.by_ino.insert(
            i,
            Known {
                node: node.clone(),
                lookups: 0,
                pins: 0,
                detached: false,
            },
        );
        self.by_node.insert(node, i);
        i
    }

    /// The number of `node` for an entry reply, counted as one more lookup the kernel holds.
    fn looked_up(&mut self, node: &Node) -> u64 {
        let i = self.ino(node.clone());
        if let Some(k) = self.by_ino.get_mut(&i) {
            k.lookups += 1;
        }
        i
    }

    /// The number of `node` for an open directory listing, pinned until [`Inodes::unpin`].
    fn pinned(&mut self, node: Node) -> u64 {
        let i = self.ino(node);
        if let Some(k) = self.by_ino.get_mut(&i) {
            k.pins += 1;
        }
        i
    }

    /// A listing that pinned `ino` was closed or made again. The number stays (a name listed
    /// is often looked up next) until a sweep, a FORGET or the loss of its name drops it.
    fn unpin(&mut self, ino: u64) {
        if let Some(k) = self.by_ino.get_mut(&ino) {
            k.pins = k.pins.saturating_sub(1);
        }
    }

    /// The kernel gave back `n` lookups of `ino` (FORGET), or an entry reply was not sent.
    fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(k) = self.by_ino.get_mut(&ino) else {
            // Dropped already: forgotten, or detached with no lookup left.
            return;
        };
        k.lookups = k.lookups.saturating_sub(n);
        if k.lookups == 0 && (k.pins == 0 || k.detached) {
            let k = self.by_ino.remove(&ino).expect("present");
            if self.by_node.get(&k.node) == Some(&ino) {
                self.by_node.remove(&k.node);
            }
        }
    }

    fn node(&self, ino: u64) -> Option<Node> {
        self.by_ino
            .get(&ino)
            .filter(|k| !k.detached)
            .map(|k| k.node.clone())
    }

    /// `node`'s name went (unlink, rmdir): its number names nothing any more.
    fn removed(&mut self, node: &Node) {
        if let Some(i) = self.by_node.remove(node) {
            self.detach(i);
        }
    }

    /// Number `i` lost its name: dropped if the kernel holds no lookup of it, else kept
    /// detached until its FORGET.
    fn detach(&mut self, i: u64) {
        if i == ROOT {
            return;
        }
        match self.by_ino.get_mut(&i) {
            Some(k) if k.lookups > 0 => k.detached = true,
            Some(_) => {
                self.by_ino.remove(&i);
            }
            None => {}
        }
    }

    /// Inode numbers the kernel was given for files of `patient`, detached ones included.
    fn files_of(&self, patient: &str) -> Vec<u64> {
        self.by_ino
            .iter()
            .filter(|(_, k)| matches!(&k.node, Node::File(p, _) if p == patient))
            .map(|(&i, _)| i)
            .collect()
    }

    fn rename(&mut self, from: &Node, to: Node) {
        match self.by_node.remove(from) {
            Some(i) => {
                if let Some(old) = self.by_node.insert(to.clone(), i) {
                    self.detach(old);
                }
                if let Some(k) = self.by_ino.get_mut(&i) {
                    k.node = to;
                }
            }
            // A source without a number (forgotten): the target's number still lost its name.
            None => self.removed(&to),
        }
    }
}

enum Handle {
    Write {
        writer: SharedWriter,
    },
    Read {
        rec: FileRecord,
        chunks: Arc<Vec<ChunkRecord>>,
    },
}

type Job = Box<dyn FnOnce() + Send>;

/// An open directory's listing: (number, type, name), entry i at offset i + 1. It is made
/// at the directory's first READDIR and made again at each READDIR from offset 0 (a rewind),
/// so that a directory read in many READDIR calls (a page of names each) costs one catalog
/// scan, and its offsets stay put while names come and go. Its numbers stay pinned in the
/// inode table until it is made again or closed.
type Listing = Arc<Vec<(u64, FileType, String)>>;

/// Most opens and reads waiting for consent on threads of their own at once.
const MAX_WAITERS: usize = 1024;

/// Most commits (`fsync`, the `close` of a writer), renames and unlinks waiting for a writer,
/// and writes waiting for the sites, running on threads of their own at once.
const MAX_COMMITTERS: usize = 256;

#[derive(Default)]
struct WriterProcs {
    tgids: std::collections::HashSet<u32>,
    tid_to_tgid: HashMap<u32, u32>,
    /// How a process that wrote through the handle ended without closing it (killed by a
    /// signal): the handle's writes since its last commit are then not committed.
    abandoned: Option<String>,
    /// How a process that held the handle was killed before anyone wrote through it (an
    /// `O_TRUNC` open, then the OOM killer): unless a process writes through it later, its
    /// release commits nothing, rather than an empty file over the one it was to replace.
    killed_before_writing: Option<String>,
}

/// The owner of what the caller of `req` creates.
fn caller(req: &Request) -> Owner {
    Owner {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// The signal that is killing thread `tid`, if it is exiting from one. `None` for a live
/// thread, an exit by `exit()` (whatever its status: a program that fails and exits leaves
/// what it wrote, as on any filesystem, and a log or error report written just before is
/// what its user needs), or what /proc does not show (a thread in another PID namespace, or
/// `exit_code` hidden from a mount without the rights to trace it). The FLUSH that a dying
/// process's kernel exit sends comes from that process.
fn killing_signal(tid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields are counted after it, from
    // field 3 (state). flags is field 9 and exit_code field 52 (proc(5)).
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let flags: u64 = fields.get(6)?.parse().ok()?;
    let code: i32 = fields.get(49)?.parse().ok()?;
    const PF_EXITING: u64 = 0x4;
    // exit_code as wait(2) reports it: the signal in the low 7 bits, else the status.
    (flags & PF_EXITING != 0 && code & 0x7f != 0).then_some(code & 0x7f)
}

/// The thread-group id (process id) of thread `tid`, from /proc; the tid itself if unknown.
fn tgid_of(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

/// A writer shared by its handle and the by-name table; `None` once released.
type SharedWriter = Arc<Writing>;

/// An open writer, and what `getattr` needs of it without taking its lock (which a commit
/// holds for as long as a slow site takes: `ls -l` must not wait on that).
struct Writing {
    writer: Mutex<Option<FileWriter>>,
    /// Bytes written so far.
    size: AtomicU64,
    /// Another handle opened the name for writing since (see `open_writer`).
    displaced: std::sync::atomic::AtomicBool,
    /// The version written (fixed for the writer's life).
    id: crate::catalog::FileId,
    /// Mode and mtime as `getattr` shows them (a chmod or utimes while written changes them).
    mode: std::sync::atomic::AtomicU32,
    mtime: AtomicU64,
    created: u64,
    /// The version's owner (changed by a `chown` while it is written).
    owner: Mutex<Option<Owner>>,
    /// An mtime set while written, which the next commit keeps (`FileWriter::mtime_setter`).
    mtime_set: Arc<AtomicU64>,
}

impl Writing {
    fn new(w: FileWriter) -> Self {
        let r = w.record();
        let (mode, mtime, created, owner) = (r.mode, r.mtime, r.created, r.owner);
        Self {
            size: AtomicU64::new(w.size()),
            displaced: Default::default(),
            id: w.id(),
            mode: mode.into(),
            mtime: mtime.into(),
            created,
            owner: Mutex::new(owner),
            mtime_set: w.mtime_setter(),
            writer: Mutex::new(Some(w)),
        }
    }

    /// The writer, also after a panic under its lock (which would otherwise make every later
    /// release, open, unlink or rename of the name panic a request loop away).
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<FileWriter>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Open writers by (patient, name).
type Writers = Arc<Mutex<HashMap<(String, String), SharedWriter>>>;

/// Drop `key`'s entry if it is still `w`; put `w` under `to` if given, unless another holds
/// `to` (then false, and `w` is under neither: an entry is never put over another's).
fn move_entry<K: Eq + std::hash::Hash, T>(
    table: &mut HashMap<K, Arc<T>>,
    key: &K,
    w: &Arc<T>,
    to: Option<K>,
) -> bool {
    if table.get(key).is_some_and(|x| Arc::ptr_eq(x, w)) {
        table.remove(key);
        if let Some(to) = to {
            if table.get(&to).is_some_and(|x| !Arc::ptr_eq(x, w)) {
                return false;
            }
            table.insert(to, w.clone());
        }
    }
    true
}

/// Commit `w`, the writer of `writing`, under its lock (an fsync, a close, a synchronous
/// write): refused with `EBUSY` if another handle has since opened the name for writing and
/// this one never committed (its writes are not to be published).
fn commit_or_refuse(engine: &Engine, writing: &Writing, w: &mut FileWriter) -> Result<(), Errno> {
    if writing.displaced.load(Ordering::SeqCst) && !w.is_committed() {
        let r = w.record();
        tracing::error!(
            "{}/{}: not committed: the file was opened for writing again by another handle",
            r.patient,
            r.name
        );
        return Err(Errno::EBUSY);
    }
    w.commit(engine).map_err(|e| {
        let r = w.record();
        tracing::error!("{}/{}: commit failed: {e}", r.patient, r.name);
        errno(&e)
    })
}

/// The answer to a commit through a handle a killed writer abandoned (`how`): `EIO`, logged.
fn refused_as_abandoned(fh: FileHandle, how: &str) -> Errno {
    tracing::warn!(
        "write handle {}: not committed, {how} while writing it",
        fh.0
    );
    Errno::EIO
}

/// What unlink and rename change, shareable with a thread of their own: when a writer is open
/// on a name they take its lock, which a commit holds for as long as a slow site takes, and
/// that wait must not hold a request loop.
#[derive(Clone)]
struct Names {
    engine: Arc<Engine>,
    writing: Writers,
    inodes: Arc<Mutex<Inodes>>,
}

impl Names {
    fn writer(&self, key: &(String, String)) -> Option<SharedWriter> {
        self.writing.lock().expect("writing").get(key).cloned()
    }

    /// [`move_entry`] in the writers table.
    fn move_writer(
        &self,
        key: &(String, String),
        w: &SharedWriter,
        to: Option<(String, String)>,
    ) -> bool {
        move_entry(&mut self.writing.lock().expect("writing"), key, w, to)
    }

    /// A writer open on the name loses it too, committed or not: like a Unix file without a
    /// name it takes writes until closed, is never named again, and its shares go at its
    /// release. Its lock is held throughout, so no commit of it runs in between.
    fn unlink(&self, p: &str, n: &str, by: &str) -> Result<(), Errno> {
        let key = (p.to_string(), n.to_string());
        let writer = self.writer(&key);
        let guard = writer.as_ref().map(|w| w.lock());
        let unnamed = guard.as_ref().and_then(|g| g.as_ref()).map(|w| w.record());
        match self.engine.catalog.unlink(p, n) {
            Ok(old) => {
                if unnamed.is_none_or(|w| w.id != old.id) {
                    self.engine.retire(&old);
                }
            }
            Err(CatalogError::NoFile { .. }) if unnamed.is_some() => {}
            Err(e) => return Err(errno(&e.into())),
        }
        self.engine.catalog.audit("unlink", Some(p), Some(n), by);
        if let Some(w) = unnamed {
            self.engine.retire(w);
        }
        if let Some(w) = &writer {
            self.move_writer(&key, w, None);
        }
        let node = Node::File(key.0, key.1);
        self.inodes.lock().expect("inodes").removed(&node);
        Ok(())
    }

    /// Rename within a patient. A writer open on the source moves with it (its commits take
    /// the new name); one open on the target loses its name, as at unlink. Both writers'
    /// locks are held throughout, taken in name order. With `noreplace`, a target that is
    /// committed or being written is left alone and the answer is `EEXIST`.
    fn rename(&self, from: &Node, to: &Node, noreplace: bool) -> Result<(), Errno> {
        let (Node::File(p, n), Node::File(np, nn)) = (from, to) else {
            return Err(Errno::EPERM);
        };
        let (src_key, dst_key) = ((p.clone(), n.clone()), (np.clone(), nn.clone()));
        if src_key == dst_key {
            return Ok(());
        }
        let (src, dst) = (self.writer(&src_key), self.writer(&dst_key));
        fn lock(w: &Option<SharedWriter>) -> Option<std::sync::MutexGuard<'_, Option<FileWriter>>> {
            w.as_ref().map(|w| w.lock())
        }
        let (mut src_guard, dst_guard) = if src_key < dst_key {
            let s = lock(&src);
            (s, lock(&dst))
        } else {
            let d = lock(&dst);
            (lock(&src), d)
        };
        if noreplace {
            let writing = dst_guard.as_ref().is_some_and(|g| g.is_some());
            let committed = self.engine.catalog.file(np, nn).map_err(|e| {
                tracing::warn!("rename {p}/{n} -> {np}/{nn}: {e}");
                errno(&EngineError::Catalog(e))
            })?;
            if writing || committed.is_some() {
                return Err(Errno::EEXIST);
            }
        }
        let open = src_guard.as_mut().and_then(|g| g.as_mut());
        let src_open = open.is_some();
        let result = match self.engine.rename(p, n, np, nn) {
            // Nothing committed yet: only the writer has the name.
            Err(EngineError::Catalog(CatalogError::NoFile { .. })) if src_open => Ok(()),
            r => r,
        }
        .and_then(|()| match open {
            Some(w) => w.rename(&self.engine, nn),
            None => Ok(()),
        });
        if let Err(e) = result {
            tracing::warn!("rename {p}/{n} -> {np}/{nn}: {e}");
            return Err(errno(&e));
        }
        if let Some(displaced) = dst_guard.as_ref().and_then(|g| g.as_ref()) {
            self.engine.retire(displaced.record());
        }
        if let Some(d) = &dst {
            self.move_writer(&dst_key, d, None);
        }
        if let Some(s) = &src {
            // A writer released meanwhile is dropped from the table, not moved. One whose
            // target was opened for writing (O_TRUNC) while this rename waited for its locks
            // loses the name to that handle, as an earlier writer does at such an open: it
            // is displaced under its lock (held here), and its writes since its last commit
            // are not committed.
            if !self.move_writer(&src_key, s, src_open.then(|| dst_key.clone())) {
                s.displaced.store(true, Ordering::SeqCst);
                tracing::warn!(
                    "{np}/{nn}: opened for writing while {p}/{n} was renamed over it; the renamed handle's writes since its last commit will not be committed"
                );
            }
        }
        drop((src_guard, dst_guard));
        self.inodes.lock().expect("inodes").rename(from, to.clone());
        Ok(())
    }
}

/// The filesystem. `fuser` calls it from several request loops at once.
pub struct QgenomeFs {
    engine: Arc<Engine>,
    inodes: Arc<Mutex<Inodes>>,
    handles: Arc<Mutex<HashMap<u64, Handle>>>,
    /// Open directories, by handle, with their listing once made.
    dirs: Mutex<HashMap<u64, Option<Listing>>>,
    /// Open writers by (patient, name), so the file shows up while it is written.
    writing: Writers,
    next_fh: AtomicU64,
    /// Per write handle: the processes (thread-group ids) that wrote through it, and a cache
    /// of thread id -> thread-group id. Only their FLUSH commits (see `flush`).
    writer_procs: Mutex<HashMap<u64, WriterProcs>>,
    workers: Mutex<mpsc::Sender<Job>>,
    /// Opens and reads waiting for consent on threads of their own (at most [`MAX_WAITERS`]).
    waiters: Arc<AtomicUsize>,
    /// Commits waiting for the sites on threads of their own (at most [`MAX_COMMITTERS`]).
    committers: Arc<AtomicUsize>,
    /// The sites' room, for `statfs`.
    space: Arc<SpaceCache>,
    uid: u32,
    gid: u32,
}

/// The mount's inode numbers, kept by [`QgenomeFs::inode_table`] for use after the file
/// system has gone into its FUSE session.
#[derive(Clone)]
pub struct InodeTable(Arc<Mutex<Inodes>>);

impl InodeTable {
    /// How many numbers the table holds, the root's included.
    pub fn held(&self) -> usize {
        self.0.lock().expect("inodes").by_ino.len()
    }
}

/// When a patient's consent ends, drops every page the kernel cached of that patient's files.
///
/// Reads are direct I/O and never fill the page cache, but a `MAP_PRIVATE` mapping of a
/// direct-I/O file is served through it (fuse_file_mmap): pages faulted in (and read ahead)
/// under consent would stay readable after it ended, with no FUSE read to refuse them.
/// `FUSE_NOTIFY_INVAL_INODE` unmaps and drops them, so the next touch faults into a read that
/// waits for consent again. Copies a process already made (pages it wrote to) are its own.
///
/// The notifications go out on a thread of their own: invalidating waits for each page's
/// lock, which a fault still waiting for consent holds. The hook waits for them at most
/// [`INVALIDATE_WAIT`], then lets them finish alone.
pub fn drop_cached_pages_at_consent_end(
    inodes: InodeTable,
    consent: &Arc<crate::consent::ConsentRegistry>,
    notifier: fuser::Notifier,
) {
    let inodes = inodes.0;
    let registry = Arc::downgrade(consent);
    consent.on_end(move |patient| {
        let inos = inodes.lock().expect("inodes").files_of(patient);
        if inos.is_empty() {
            return;
        }
        // The end counts as under way until every page is dropped, not only for the wait
        // below: readers waiting for this consent meanwhile are refused, so none holds a
        // page lock the drop waits for.
        let hold = Arc::new(registry.upgrade().map(|r| r.hold_end(patient)));
        // Several threads take the files in turn: a page a read under way holds locked (a
        // mapped page's fault, fetching its chunk from a slow site) stalls the drop of its
        // own file's later pages, not that of every file after it.
        let workers = inos.len().min(INVALIDATE_THREADS);
        let queue = Arc::new(Mutex::new(inos));
        // Each worker holds a sender: the channel disconnects once all are done.
        let (done, finished) = mpsc::channel::<()>();
        let mut spawned = 0;
        for _ in 0..workers {
            let (notifier, queue, done, hold) =
                (notifier.clone(), queue.clone(), done.clone(), hold.clone());
            let who = patient.to_string();
            let worker = std::thread::Builder::new()
                .name("fs-invalidate".into())
                .spawn(move || {
                    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    while let Some(ino) = next() {
                        // ENOENT: the kernel already forgot the inode (nothing cached).
                        if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                            if e.raw_os_error() != Some(libc::ENOENT) {
                                tracing::warn!(
                                    "consent of {who} ended: dropping cached pages of inode {ino}: {e}"
                                );
                            }
                        }
                    }
                    drop((done, hold));
                });
            match worker {
                Ok(_) => spawned += 1,
                Err(e) => tracing::error!(
                    "consent of {patient} ended: cannot start a thread dropping cached pages: {e}"
                ),
            }
        }
        drop((done, hold));
        if spawned == 0 {
            tracing::error!("consent of {patient} ended: no thread could drop its files' cached pages");
        } else if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(INVALIDATE_WAIT) {
            tracing::error!(
                "consent of {patient} ended: its files' cached pages not all dropped after {INVALIDATE_WAIT:?} (a read under way holds one); still dropping them"
            );
        }
    });
}

/// Threads dropping one consent end's cached pages at most.
const INVALIDATE_THREADS: usize = 8;

/// How long a consent end waits for its page-cache invalidations (see
/// [`drop_cached_pages_at_consent_end`]).
const INVALIDATE_WAIT: Duration = Duration::from_secs(2);

/// Run `job` on a thread of its own named `thread`, counted in `count`; the job back if
/// `limit` such threads already run or no thread can be made (the caller then runs it
/// itself: a job dropped unrun would leave its handle, reader count or writer behind, with
/// the kernel told EIO). `what` names the job in the log.
fn run_apart(
    count: &Arc<AtomicUsize>,
    limit: usize,
    thread: &str,
    what: &str,
    job: Job,
) -> Result<(), Job> {
    if count.fetch_add(1, Ordering::SeqCst) >= limit {
        count.fetch_sub(1, Ordering::SeqCst);
        return Err(job);
    }
    let running = count.clone();
    let counted: Job = Box::new(move || {
        job();
        running.fetch_sub(1, Ordering::SeqCst);
    });
    spawn_or_return(std::thread::Builder::new().name(thread.into()), counted).map_err(
        |(counted, e)| {
            tracing::error!("{what}: no thread of its own ({e}); it runs on the caller's");
            // Counted out by running it, wherever that is.
            counted
        },
    )
}

/// Spawn `job` with `builder`, or give it back with the error if no thread can be made (a
/// failed spawn drops its closure, so the job waits in a slot it can be taken back from).
fn spawn_or_return(builder: std::thread::Builder, job: Job) -> Result<(), (Job, std::io::Error)> {
    let slot = Arc::new(Mutex::new(Some(job)));
    let theirs = slot.clone();
    let spawned = builder.spawn(move || {
        let job = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(job) = job {
            job();
        }
    });
    match spawned {
        Ok(_) => Ok(()),
        Err(e) => {
            let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            Err((
                job.expect("a job whose thread never started is still in its slot"),
                e,
            ))
        }
    }
}

/// Run `job` on a thread of its own, to wait for `patient`'s consent there; the job back if
/// [`MAX_WAITERS`] already wait or no thread can be made (the caller then runs it on the
/// pool).
fn wait_apart(waiters: &Arc<AtomicUsize>, patient: &str, job: Job) -> Result<(), Job> {
    if waiters.load(Ordering::SeqCst) >= MAX_WAITERS {
        tracing::warn!(
            "{MAX_WAITERS} requests already wait for consent; patient {patient}'s waits on the worker pool"
        );
    }
    let what = format!("patient {patient}'s wait for consent");
    run_apart(waiters, MAX_WAITERS, "fs-consent-wait", &what, job)
}

fn errno(e: &EngineError) -> Errno {
    Errno::from_i32(e.errno())
}

fn secs(t: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t)
}

impl QgenomeFs {
    /// A handle on this mount's inode numbers.
    pub fn inode_table(&self) -> InodeTable {
        InodeTable(self.inodes.clone())
    }

    /// `workers` threads answer opens and reads that may wait for consent.
    pub fn new(engine: Arc<Engine>, workers: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for w in 0..workers.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("fs-worker-{w}"))
                .spawn(move || loop {
                    let job = match rx.lock().expect("jobs").recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    job();
                })
                .expect("spawn fs worker");
        }
        Self {
            engine,
            inodes: Arc::new(Mutex::new(Inodes::new())),
            handles: Arc::new(Mutex::new(HashMap::new())),
            dirs: Mutex::new(HashMap::new()),
            writing: Arc::new(Mutex::new(HashMap::new())),
            next_fh: AtomicU64::new(1),
            writer_procs: Mutex::new(HashMap::new()),
            workers: Mutex::new(tx),
            waiters: Arc::new(AtomicUsize::new(0)),
            committers: Arc::new(AtomicUsize::new(0)),
            space: Arc::new(SpaceCache::default()),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let tx = self.workers.lock().expect("workers").clone();
        let _ = tx.send(Box::new(job));
    }

    /// Run `job`, an open or read of one of `patient`'s files (which waits for consent), off
    /// the request loops: on the worker pool while the consent is active, else on a thread of
    /// its own, so that requests waiting for a consent never take up the pool that serves the
    /// patients who gave theirs. Past [`MAX_WAITERS`] waiting at once, the pool takes them.
    /// A job queued for the pool checks again when it starts: consent that ended while it was
    /// queued sends it to a thread of its own then (else a card pulled with many reads queued
    /// would hold every pool thread for the wait limit).
    fn spawn_for(&self, patient: &str, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        if self.engine.consent.is_active(patient) {
            let (engine, waiters) = (self.engine.clone(), self.waiters.clone());
            let patient = patient.to_string();
            return self.spawn(move || {
                if engine.consent.is_active(&patient) {
                    return job();
                }
                if let Err(job) = wait_apart(&waiters, &patient, job) {
                    job();
                }
            });
        }
        if let Err(job) = wait_apart(&self.waiters, patient, job) {
            self.spawn(job);
        }
    }

    fn node(&self, ino: INodeNo) -> Option<Node> {
        self.inodes.lock().expect("inodes").node(ino.0)
    }

    fn ino(&self, node: Node) -> u64 {
        self.inodes.lock().expect("inodes").ino(node)
    }

    /// The owner the kernel is told: the recorded one, else the mount's user.
    fn owner_or_mount(&self, owner: Option<Owner>) -> Owner {
        owner.unwrap_or(Owner {
            uid: self.uid,
            gid: self.gid,
        })
    }

    fn dir_attr(&self, ino: u64, mtime: u64, mode: u32, owner: Option<Owner>) -> FileAttr {
        let owner = self.owner_or_mount(owner);
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: secs(mtime),
            mtime: secs(mtime),
            ctime: secs(mtime),
            crtime: secs(mtime),
            kind: FileType::Directory,
            perm: (mode & 0o7777) as u16,
            nlink: 2,
            uid: owner.uid,
            gid: owner.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn file_attr(
        &self,
        ino: u64,
        size: u64,
        mode: u32,
        times: (u64, u64),
        owner: Option<Owner>,
    ) -> FileAttr {
        let (mtime, created) = times;
        let owner = self.owner_or_mount(owner);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: secs(mtime),
            mtime: secs(mtime),
            ctime: secs(mtime),
            crtime: secs(created),
            kind: FileType::RegularFile,
            perm: (mode & 0o7777) as u16,
            nlink: 1,
            uid: owner.uid,
            gid: owner.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    /// Attributes of a node, or None if it does not exist (any more).
    fn attr(&self, node: &Node) -> Result<Option<(FileAttr, Duration)>, EngineError> {
        self.attr_at(self.ino(node.clone()), node)
    }

    /// Attributes of a node for an entry reply (lookup, mkdir, create): its number then
    /// counts one more lookup, which a FORGET gives back. Not counted if there is no entry.
    fn entry(&self, node: &Node) -> Result<Option<(FileAttr, Duration)>, EngineError> {
        let ino = self.inodes.lock().expect("inodes").looked_up(node);
        let attr = self.attr_at(ino, node);
        if !matches!(attr, Ok(Some(_))) {
            self.inodes.lock().expect("inodes").forget(ino, 1);
        }
        attr
    }

    /// Attributes of `node` under inode number `ino`.
    fn attr_at(&self, ino: u64, node: &Node) -> Result<Option<(FileAttr, Duration)>, EngineError> {
        let cat = &self.engine.catalog;
        Ok(match node {
            Node::Root => Some((self.dir_attr(ROOT, 0, 0o755, None), DIR_TTL)),
            Node::Patient(p) => cat.patient(p)?.map(|r| {
                let mode = r.mode.unwrap_or(0o755);
                (self.dir_attr(ino, r.created, mode, r.owner), DIR_TTL)
            }),
            Node::File(p, n) => {
                let writing = self.writer_of(p, n);
                if let Some(w) = writing {
                    let size = w.size.load(Ordering::SeqCst);
                    let owner = *w.owner.lock().expect("owner");
                    let times = (w.mtime.load(Ordering::SeqCst), w.created);
                    let mode = w.mode.load(Ordering::SeqCst);
                    return Ok(Some((
                        self.file_attr(ino, size, mode, times, owner),
                        FILE_TTL,
                    )));
                }
                cat.file(p, n)?.map(|r| {
                    let times = (r.mtime, r.created);
                    (
                        self.file_attr(ino, r.size, r.mode, times, r.owner),
                        FILE_TTL,
                    )
                })
            }
        })
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<Node, Errno> {
        // NAME_MAX, as local filesystems answer (FUSE passes names up to 1024 bytes).
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let name = name.to_str().ok_or(Errno::EINVAL)?.to_string();
        match self.node(parent) {
            Some(Node::Root) => Ok(Node::Patient(name)),
            Some(Node::Patient(p)) => Ok(Node::File(p, name)),
            Some(Node::File(..)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// The entries of directory `ino`, `.` and `..` first, then its names in order, each
    /// with its number pinned (see [`Listing`]).
    fn list(&self, ino: INodeNo) -> Result<Vec<(u64, FileType, String)>, Errno> {
        let cat = &self.engine.catalog;
        let (kind, names): (FileType, Vec<(Node, String)>) = match self.node(ino) {
            None => return Err(Errno::ENOENT),
            Some(Node::File(..)) => return Err(Errno::ENOTDIR),
            Some(Node::Root) => {
                let ps = cat.patients().map_err(|e| errno(&e.into()))?;
                let names = ps
                    .into_iter()
                    .map(|p| (Node::Patient(p.clone()), p))
                    .collect();
                (FileType::Directory, names)
            }
            Some(Node::Patient(p)) => {
                let mut names: Vec<String> = cat
                    .files_of(&p)
                    .map_err(|e| errno(&e.into()))?
                    .into_iter()
                    .map(|f| f.name)
                    .collect();
                let known: std::collections::HashSet<String> = names.iter().cloned().collect();
                for (wp, wn) in self.writing.lock().expect("writing").keys() {
                    if *wp == p && !known.contains(wn) {
                        names.push(wn.clone());
                    }
                }
                names.sort();
                let names = names
                    .into_iter()
                    .map(|n| (Node::File(p.clone(), n.clone()), n))
                    .collect();
                (FileType::RegularFile, names)
            }
        };
        let mut entries = Vec::with_capacity(names.len() + 2);
        entries.push((ino.0, FileType::Directory, ".".to_string()));
        entries.push((ROOT, FileType::Directory, "..".to_string()));
        let mut inodes = self.inodes.lock().expect("inodes");
        entries.extend(
            names
                .into_iter()
                .map(|(node, name)| (inodes.pinned(node), kind, name)),
        );
        Ok(entries)
    }

    /// Give back the pins of a listing made by [`QgenomeFs::list`].
    fn unpin(&self, entries: &[(u64, FileType, String)]) {
        let mut inodes = self.inodes.lock().expect("inodes");
        for (ino, ..) in &entries[2..] {
            inodes.unpin(*ino);
        }
    }

    fn new_fh(&self, handle: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().expect("handles").insert(fh, handle);
        fh
    }

    /// The writer open on `p/n`, if any.
    fn writer_of(&self, p: &str, n: &str) -> Option<SharedWriter> {
        let key = (p.to_string(), n.to_string());
        self.writing.lock().expect("writing").get(&key).cloned()
    }

    /// `chown` of a file: its committed version and a version being written under its name.
    fn set_file_owner(&self, p: &str, n: &str, owner: Owner) -> Result<(), EngineError> {
        let writer = self.writer_of(p, n);
        if let Some(w) = writer {
            *w.owner.lock().expect("owner") = Some(owner);
            self.engine.catalog.set_owner(&w.id, owner)?;
        }
        if let Some(rec) = self.engine.catalog.file(p, n)? {
            self.engine.catalog.set_owner(&rec.id, owner)?;
        }
        Ok(())
    }

    /// Open a writer for `patient/name` and register it.
    fn open_writer(
        &self,
        patient: &str,
        name: &str,
        mode: u32,
        owner: Option<Owner>,
    ) -> Result<u64, EngineError> {
        let w = self.engine.create_owned(patient, name, mode, owner)?;
        // Held like a read handle: once committed (fsync) the version may lose its name while
        // the writer still writes; its shares then go at release, not under the writer.
        self.engine.writer_opened(&w.id());
        let writer = Arc::new(Writing::new(w));
        // The name goes to the last opener. An earlier handle still open loses it: its writes
        // since its last commit are never published (its commit fails with EBUSY), so neither
        // its close nor an unlink or rename, which act on the name's writer, can be undone by
        // a writer they did not see. It is displaced under its lock, before this handle takes
        // the name: a commit of it already under way lands first (this handle's commit then
        // replaces it), none starts after, and an unlink or rename meanwhile still finds it
        // as the name's writer. (This open waits for that commit, as an unlink would.)
        let key = (patient.to_string(), name.to_string());
        loop {
            let earlier = self.writing.lock().expect("writing").get(&key).cloned();
            if let Some(e) = &earlier {
                let _held = e.lock();
                if !e.displaced.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "{patient}/{name}: opened for writing while another handle writes it; that handle's writes since its last commit will not be committed"
                    );
                }
            }
            let mut writing = self.writing.lock().expect("writing");
            let unchanged = match (writing.get(&key), &earlier) {
                (None, _) => true,
                (Some(now), Some(e)) => Arc::ptr_eq(now, e),
                (Some(_), None) => false,
            };
            // Else a third handle opened it meanwhile: displace that one too.
            if unchanged {
                writing.insert(key, writer.clone());
                break;
            }
        }
        Ok(self.new_fh(Handle::Write { writer }))
    }

    fn writer(&self, fh: FileHandle) -> Option<SharedWriter> {
        match self.handles.lock().expect("handles").get(&fh.0) {
            Some(Handle::Write { writer, .. }) => Some(writer.clone()),
            _ => None,
        }
    }

    fn names(&self) -> Names {
        Names {
            engine: self.engine.clone(),
            writing: self.writing.clone(),
            inodes: self.inodes.clone(),
        }
    }

    /// Run `job` (an unlink or rename) here, or on a thread of its own when a writer is open
    /// on one of `keys`: the job then waits for that writer's lock, which a commit to a slow
    /// site holds.
    fn off_the_loop_if(&self, keys: &[&(String, String)], job: impl FnOnce() + Send + 'static) {
        let busy = {
            let writing = self.writing.lock().expect("writing");
            keys.iter().any(|k| writing.contains_key(*k))
        };
        if !busy {
            return job();
        }
        let job: Job = Box::new(job);
        if let Err(job) = run_apart(
            &self.committers,
            MAX_COMMITTERS,
            "fs-names",
            "unlink or rename",
            job,
        ) {
            job();
        }
    }

    /// Commit the writer of `fh` (or, with `commit` false, wait for its chunks in flight),
    /// then answer. This waits for every site to acknowledge, so it runs on a thread of its
    /// own: a slow site must not hold the request loops that serve everything else.
    fn commit_apart(&self, fh: FileHandle, commit: bool, reply: ReplyEmpty) {
        let Some(writer) = self.writer(fh) else {
            return reply.ok();
        };
        // A handle a killed writer abandoned commits nothing more: an fsync, or the close of
        // another process sharing it, is told so rather than answered as if durable.
        let abandoned = self
            .writer_procs
            .lock()
            .expect("writer procs")
            .get(&fh.0)
            .and_then(|p| p.abandoned.clone());
        if let Some(how) = abandoned {
            return reply.error(refused_as_abandoned(fh, &how));
        }
        let engine = self.engine.clone();
        let job: Job = Box::new(move || {
            let mut guard = writer.lock();
            let result = match guard.as_mut() {
                None => Ok(()),
                Some(w) if commit => commit_or_refuse(&engine, &writer, w),
                Some(w) => w.wait_in_flight(&engine).map_err(|e| errno(&e)),
            };
            drop(guard);
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
        let what = format!("commit of handle {}", fh.0);
        if let Err(job) = run_apart(&self.committers, MAX_COMMITTERS, "fs-commit", &what, job) {
            job();
        }
    }
}

impl Filesystem for QgenomeFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Without this the kernel strips O_TRUNC from open and truncates with a separate
        // setattr first, so a replaced file would be briefly empty for readers.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC) {
            tracing::warn!("kernel lacks {missing:?}: O_TRUNC replacement is not atomic");
        }
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let node = match self.child(parent, name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match self.entry(&node) {
            Ok(Some((attr, ttl))) => reply.entry(&ttl, &attr, Generation(0)),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.lock().expect("inodes").forget(ino.0, nlookup);
    }

    // batch_forget: fuser's default hands each node to `forget`.

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The kernel names the handle when it asks for the size of an open file (`lseek` to
        // its end; not `fstat`, which comes without one): for a handle open for reading, the
        // version it reads, not one being written under the name meanwhile (an O_TRUNC
        // replacement), whose size so far `stat` of the name gives. A reader seeking to the
        // end (`samtools quickcheck`) would mix the two.
        let reading = fh.and_then(
            |fh| match self.handles.lock().expect("handles").get(&fh.0) {
                Some(Handle::Read { rec, .. }) => Some(rec.clone()),
                _ => None,
            },
        );
        if let Some(rec) = reading {
            // Mode, owner and times as they are now (a chmod meanwhile); the size it reads.
            let now = match self.engine.catalog.file_by_id(&rec.id) {
                Ok(Some(now)) => now,
                _ => rec.clone(),
            };
            let times = (now.mtime, now.created);
            let attr = self.file_attr(ino.0, rec.size, now.mode, times, now.owner);
            return reply.attr(&FILE_TTL, &attr);
        }
        match self.attr(&node) {
            Ok(Some((attr, ttl))) => reply.attr(&ttl, &attr),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let current = match self.attr(&node) {
            Ok(Some((a, _))) => a,
            Ok(None) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(errno(&e)),
        };
        // chown: the kernel (default_permissions) has checked the caller may.
        let owner = (uid.is_some() || gid.is_some()).then(|| Owner {
            uid: uid.unwrap_or(current.uid),
            gid: gid.unwrap_or(current.gid),
        });
        let Node::File(p, n) = &node else {
            let changed = match &node {
                Node::Patient(id) if owner.is_some() || mode.is_some() => {
                    self.engine.catalog.set_patient_attrs(id, owner, mode)
                }
                // The root is the mount's; its attributes are not kept.
                Node::Root if owner.is_some() || mode.is_some() => {
                    return reply.error(Errno::EPERM)
                }
                _ => Ok(()),
            };
            if let Err(e) = changed {
                return reply.error(errno(&e.into()));
            }
            return match self.attr(&node) {
                Ok(Some((a, ttl))) => reply.attr(&ttl, &a),
                _ => reply.error(Errno::ENOENT),
            };
        };
        if let Some(owner) = owner {
            if let Err(e) = self.set_file_owner(p, n, owner) {
                return reply.error(errno(&e));
            }
        }
        if let Some(size) = size {
            if size != current.size {
                let open_writer = fh.and_then(|fh| self.writer(fh)).is_some();
                if size != 0 || open_writer {
                    tracing::warn!("{p}/{n}: truncate to {size} refused: only truncation of a closed file to zero is supported");
                    return reply.error(Errno::EINVAL);
                }
                // Another handle writing the name: its fsynced version would be replaced
                // under it, and its later writes would go nowhere (a version that lost its
                // name is never named again) while its close returned 0. Refused instead:
                // nothing is lost, and the truncation can be done once it is closed.
                if self.writer_of(p, n).is_some() {
                    tracing::warn!("{p}/{n}: truncate refused: another handle is writing it");
                    return reply.error(Errno::EBUSY);
                }
                // Truncate a closed file to zero: commit an empty version over it.
                let owner = Owner {
                    uid: current.uid,
                    gid: current.gid,
                };
                let result = self
                    .engine
                    .create_owned(p, n, u32::from(current.perm), Some(owner))
                    .and_then(|mut w| w.commit(&self.engine));
                if let Err(e) = result {
                    return reply.error(errno(&e));
                }
            }
        }
        if mode.is_some() || mtime.is_some() {
            let m = mtime.map(|t| match t {
                TimeOrNow::Now => crate::catalog::now_secs(),
                TimeOrNow::SpecificTime(t) => {
                    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
                }
            });
            // A file being written (`cp -p` and `install -m` set both before close): the
            // version its close commits takes them. Its record has the mode (the commit
            // reads it); the mtime waits for the commit, unless a write comes after it.
            let writer = self.writer_of(p, n);
            if let Some(w) = &writer {
                if let Some(mode) = mode {
                    if let Err(e) = self.engine.catalog.set_attrs(&w.id, Some(mode), None) {
                        return reply.error(errno(&e.into()));
                    }
                    w.mode.store(mode & 0o7777, Ordering::SeqCst);
                }
                if let Some(t) = m {
                    w.mtime_set.store(t.max(1), Ordering::SeqCst);
                    w.mtime.store(t, Ordering::SeqCst);
                }
            }
            if let Ok(Some(rec)) = self.engine.catalog.file(p, n) {
                if let Err(e) = self.engine.set_attrs(&rec.id, mode, m) {
                    return reply.error(errno(&e));
                }
            }
        }
        match self.attr(&node) {
            Ok(Some((a, ttl))) => reply.attr(&ttl, &a),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        if parent.0 != ROOT {
            return reply.error(Errno::EPERM);
        }
        let Some(id) = name.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        let owner = caller(req);
        let mode = mode & !umask & 0o7777;
        if let Err(e) = self
            .engine
            .catalog
            .add_patient_owned(id, Some(owner), Some(mode))
        {
            tracing::warn!("mkdir {id}: {e}");
            return reply.error(errno(&e.into()));
        }
        self.engine.catalog.audit("patient-add", Some(id), None, "");
        match self.entry(&Node::Patient(id.to_string())) {
            Ok(Some((a, ttl))) => reply.entry(&ttl, &a, Generation(0)),
            _ => reply.error(Errno::EIO),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let Some(id) = name.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        // A file being written shows in the folder's listing: the folder is not empty. (One
        // created after this check and before the removal fails at its commit, with ENOENT
        // at close: the catalog names no version in a patient it no longer has.)
        if self
            .writing
            .lock()
            .expect("writing")
            .keys()
            .any(|(p, _)| p == id)
        {
            return reply.error(Errno::ENOTEMPTY);
        }
        match self.engine.catalog.remove_patient(id) {
            Ok(()) => {
                self.engine
                    .catalog
                    .audit("patient-remove", Some(id), None, "");
                let node = Node::Patient(id.to_string());
                self.inodes.lock().expect("inodes").removed(&node);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e.into())),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Ok(Node::File(p, n)) = self.child(parent, name) else {
            return reply.error(Errno::EPERM);
        };
        let owner = caller(req);
        match self.open_writer(&p, &n, mode & !umask & 0o7777, Some(owner)) {
            Ok(fh) => match self.entry(&Node::File(p, n)) {
                Ok(Some((a, ttl))) => reply.created(
                    &ttl,
                    &a,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_DIRECT_IO,
                ),
                _ => reply.error(Errno::EIO),
            },
            Err(e) => {
                tracing::warn!("create {p}/{n}: {e}");
                reply.error(errno(&e))
            }
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (p, n) = match self.node(ino) {
            Some(Node::File(p, n)) => (p, n),
            Some(_) => return reply.error(Errno::EISDIR),
            // A number whose name went (an open of /proc/PID/fd/N of an unlinked file).
            None => return reply.error(Errno::ENOENT),
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            // A catalog that cannot be read fails the open: taken as "no file", a `touch` of
            // a stored file would commit an empty version over it at its close.
            let old = match self.engine.catalog.file(&p, &n) {
                Ok(old) => old,
                Err(e) => {
                    tracing::warn!("{p}/{n}: opening for write: {e}");
                    return reply.error(errno(&e.into()));
                }
            };
            if flags.0 & libc::O_TRUNC == 0 {
                let size = old.as_ref().map_or(0, |r| r.size);
                if size > 0 {
                    tracing::warn!("{p}/{n}: opening for write without O_TRUNC refused: stored data cannot be rewritten in place");
                    return reply.error(Errno::EPERM);
                }
                // Only an O_TRUNC open takes the name from a writer (`open_writer`): a `touch`
                // of a file being written must not discard its writer's work.
                let key = (p.clone(), n.clone());
                if self.writing.lock().expect("writing").contains_key(&key) {
                    tracing::warn!("{p}/{n}: opening for write without O_TRUNC refused: another handle is writing it");
                    return reply.error(Errno::EBUSY);
                }
            }
            // A replacement keeps the file's mode and owner (the kernel checked the opener
            // may write it): the stored version's, else those of the version being written
            // under the name; only a name with neither is the opener's.
            let (mode, owner) = match (old, self.writer_of(&p, &n)) {
                (Some(r), _) => (r.mode, r.owner),
                (None, Some(w)) => (
                    w.mode.load(Ordering::SeqCst),
                    *w.owner.lock().expect("owner"),
                ),
                (None, None) => (0o644, Some(caller(req))),
            };
            return match self.open_writer(&p, &n, mode, owner) {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
                Err(e) => reply.error(errno(&e)),
            };
        }
        let engine = self.engine.clone();
        // The version is marked open before its record is trusted: a replacement committed
        // in between (whose old version went before it was marked) is seen, and read instead.
        let rec = loop {
            let rec = match engine.catalog.file(&p, &n) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // Listed (its writer is open) but nothing committed yet: say so, not ENOENT.
                    let key = (p.clone(), n.clone());
                    if self.writing.lock().expect("writing").contains_key(&key) {
                        tracing::warn!("{p}/{n}: open for reading refused: still being written, nothing committed yet (readable after its writer's fsync or close)");
                        return reply.error(Errno::EBUSY);
                    }
                    return reply.error(Errno::ENOENT);
                }
                Err(e) => return reply.error(errno(&e.into())),
            };
            engine.reader_opened(&rec.id);
            match engine.catalog.file(&p, &n) {
                Ok(Some(now)) if now.id == rec.id => break rec,
                _ => engine.reader_closed(&rec.id),
            }
        };
        // The handle is registered now; the reply waits for consent on a worker, which then
        // gives it the version's chunk list (a genome's is tens of MB, not to be read on a
        // request loop, nor held by every open still waiting for a card).
        let fh = self.new_fh(Handle::Read {
            rec: rec.clone(),
            chunks: Arc::default(),
        });
        let tid = req.pid();
        let handles = self.handles.clone();
        let patient = rec.patient.clone();
        self.spawn_for(&patient, move || {
            let abandoned = || crate::consent::session::fatal_signal_pending(tid);
            let limit = engine.config().consent_wait;
            let opened = engine
                .consent
                .wait_unless(&rec.patient, limit, &abandoned)
                .map_err(EngineError::from)
                .and_then(|()| engine.committed_chunks(&rec));
            match opened {
                Ok(list) => {
                    if let Some(Handle::Read { chunks, .. }) =
                        handles.lock().expect("handles").get_mut(&fh)
                    {
                        *chunks = Arc::new(list);
                    }
                    // One audit entry per file opened for reading under a consent.
                    engine.catalog.audit(
                        "read",
                        Some(&rec.patient),
                        Some(&rec.name),
                        &format!("pid {tid}"),
                    );
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
                }
                Err(e) => {
                    // A failed open gets no RELEASE: its handle goes now.
                    handles.lock().expect("handles").remove(&fh);
                    engine.reader_closed(&rec.id);
                    tracing::warn!("open {}/{}: {e}", rec.patient, rec.name);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (rec, chunks) = match self.handles.lock().expect("handles").get(&fh.0) {
            Some(Handle::Read { rec, chunks }) => (rec.clone(), chunks.clone()),
            Some(Handle::Write { .. }) => return reply.error(Errno::EBADF),
            None => return reply.error(Errno::EBADF),
        };
        let engine = self.engine.clone();
        let tid = req.pid();
        let patient = rec.patient.clone();
        self.spawn_for(&patient, move || {
            match engine.read_unless(&rec, &chunks, offset, size as usize, &|| {
                crate::consent::session::fatal_signal_pending(tid)
            }) {
                Ok(data) => data.with_bytes(|b| reply.data(b)),
                Err(e) => {
                    tracing::warn!("read {}/{} at {offset}: {e}", rec.patient, rec.name);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(writer) = self.writer(fh) else {
            return reply.error(Errno::EBADF);
        };
        // A write through a descriptor opened O_SYNC or O_DSYNC, or made with RWF_DSYNC (the
        // kernel passes both as these flags): durable when it returns, as after an fsync.
        // With direct I/O the kernel leaves that to the filesystem; it used to return with
        // the bytes only buffered here.
        let sync = flags.0 & libc::O_DSYNC != 0;
        let abandoned = {
            let mut procs = self.writer_procs.lock().expect("writer procs");
            let p = procs.entry(fh.0).or_default();
            let tid = req.pid();
            let tgid = *p.tid_to_tgid.entry(tid).or_insert_with(|| tgid_of(tid));
            p.tgids.insert(tgid);
            p.abandoned.clone()
        };
        // A handle a killed writer abandoned commits nothing more (see `commit_apart`): a
        // synchronous write through it, which would, is refused as its fsync would be.
        if let Some(how) = abandoned.filter(|_| sync) {
            return reply.error(refused_as_abandoned(fh, &how));
        }
        let mut guard = writer.lock();
        let Some(w) = guard.as_mut() else {
            return reply.error(Errno::EBADF);
        };
        // What the sites have room for is taken here; a write that must wait for them (a
        // slow or hung site holding this file's uploads) waits on a thread of its own, so
        // that four such writers do not take every request loop from `ls`, `stat` and the
        // reads of other files. The kernel sends this handle's next write after the reply.
        let len = data.len();
        let took = match w.write_some(&self.engine, offset, data) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("{e}");
                return reply.error(errno(&e));
            }
        };
        writer.size.store(w.size(), Ordering::SeqCst);
        if !sync && !w.must_wait(&self.engine) && took == len {
            return reply.written(len as u32);
        }
        drop(guard);
        // Plaintext: wiped when dropped, like every plaintext buffer of the engine.
        let rest = crate::fs::engine::Plain::new(data[took..].to_vec());
        let engine = self.engine.clone();
        let job: Job = Box::new(move || {
            let mut guard = writer.lock();
            let result = match guard.as_mut() {
                None => Err(Errno::EBADF),
                Some(w) => {
                    let at = w.size();
                    let r = w
                        .wait_room(&engine)
                        .and_then(|()| w.write(&engine, at, &rest));
                    writer.size.store(w.size(), Ordering::SeqCst);
                    match r {
                        Err(e) => {
                            tracing::warn!("{e}");
                            Err(errno(&e))
                        }
                        // A commit that fails fails the writer too: the bytes it took are
                        // not to be published by a later commit (the write said it failed),
                        // and a retry of the write would no longer append.
                        Ok(()) if sync => commit_or_refuse(&engine, &writer, w).inspect_err(|e| {
                            w.fail(format!(
                                "a synchronous write failed to commit ({})",
                                std::io::Error::from_raw_os_error(e.code())
                            ));
                        }),
                        Ok(()) => Ok(()),
                    }
                }
            };
            drop(guard);
            match result {
                Ok(()) => reply.written(len as u32),
                Err(e) => reply.error(e),
            }
        });
        let what = format!("write of handle {}", fh.0);
        if let Err(job) = run_apart(&self.committers, MAX_COMMITTERS, "fs-write", &what, job) {
            job();
        }
    }

    /// FLUSH comes with every close of a descriptor, including the copies a fork inherits and
    /// closes at exec. Committing on those would make a half-written file visible (and keep it
    /// after a crash), so only a process that wrote through the handle commits at its close;
    /// any other close just waits for the chunks in flight and reports their errors.
    ///
    /// A process that wrote and is killed without closing (a signal: kill -9, the OOM
    /// killer, a segfault) has its descriptors closed by its exit: that FLUSH marks the
    /// handle abandoned, and its RELEASE drops what was written since the last commit, so a
    /// pipeline step that crashed never replaces a good file with its partial output.
    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let commit = {
            let mut procs = self.writer_procs.lock().expect("writer procs");
            let tgid = tgid_of(req.pid());
            match procs.get_mut(&fh.0) {
                Some(p) if p.tgids.contains(&tgid) => match killing_signal(req.pid()) {
                    Some(signal) => {
                        let how = format!("process {} was killed by signal {signal}", req.pid());
                        tracing::warn!(
                            "write handle {}: {how} before closing it; its writes since the last commit will not be committed",
                            fh.0
                        );
                        p.abandoned = Some(how);
                        false
                    }
                    None => p.abandoned.is_none(),
                },
                p => {
                    // A process that never wrote: if nobody has written yet and it was
                    // killed, the handle's release must not publish the empty version.
                    let nobody_wrote = p.as_ref().is_none_or(|p| p.tgids.is_empty());
                    if nobody_wrote && self.writer(fh).is_some() {
                        if let Some(signal) = killing_signal(req.pid()) {
                            let how = format!(
                                "process {} was killed by signal {signal} before anything was written",
                                req.pid()
                            );
                            tracing::warn!("write handle {}: {how}", fh.0);
                            procs.entry(fh.0).or_default().killed_before_writing = Some(how);
                        }
                    }
                    false
                }
            }
        };
        self.commit_apart(fh, commit, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.commit_apart(fh, true, reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.handles.lock().expect("handles").remove(&fh.0);
        if let Some(Handle::Read { rec, .. }) = &handle {
            self.engine.reader_closed(&rec.id);
        }
        let abandoned = self
            .writer_procs
            .lock()
            .expect("writer procs")
            .remove(&fh.0)
            .and_then(|p| match p.abandoned {
                Some(how) => Some(how),
                None if p.tgids.is_empty() => p.killed_before_writing,
                None => None,
            });
        if let Some(Handle::Write { writer }) = handle {
            // The last commit runs under the writer's lock, so that an unlink or rename of
            // the file waits for it rather than racing it.
            let mut guard = writer.lock();
            if let Some(mut w) = guard.take() {
                let id = w.id();
                if let Some(how) = abandoned {
                    let r = w.record();
                    tracing::warn!(
                        "{}/{}: not committed, {how} before closing it; the file stays as its last commit left it (an fsync's, or the version it was to replace)",
                        r.patient,
                        r.name,
                    );
                    w.abort(&self.engine);
                } else if writer.displaced.load(Ordering::SeqCst) && !w.is_committed() {
                    let r = w.record();
                    tracing::warn!(
                        "{}/{}: not committed, the file was opened for writing again by another handle",
                        r.patient,
                        r.name
                    );
                    w.abort(&self.engine);
                } else if let Err(e) = w.commit(&self.engine) {
                    // Its record has the name it has now, after any rename while open. No
                    // close(2) is left to tell: the audit keeps it beside the log line (a
                    // `touch` or `: > f` with a site down, whose close committed nothing).
                    let (patient, name) = (w.record().patient.clone(), w.record().name.clone());
                    let fsynced = w.committed_size();
                    let what = match (w.abort(&self.engine), fsynced) {
                        (true, _) => "discarded".to_string(),
                        (false, Some(size)) => format!(
                            "the {size} bytes its last fsync committed stay; what was written after them is not committed"
                        ),
                        (false, None) => {
                            "kept: the catalog names it, but could not make that durable".into()
                        }
                    };
                    tracing::error!("{patient}/{name}: not committed, {what}: {e}");
                    self.engine.catalog.audit(
                        "write-failed",
                        Some(&patient),
                        Some(&name),
                        &format!("not committed at release, {what}: {e}"),
                    );
                }
                self.engine.writer_closed(&id);
            }
            drop(guard);
            // Under the name it has now (a rename while open moved it in the table).
            self.writing
                .lock()
                .expect("writing")
                .retain(|_, w| !Arc::ptr_eq(w, &writer));
        }
        reply.ok();
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(Node::File(p, n)) = self.child(parent, name) else {
            return reply.error(Errno::EPERM);
        };
        let key = (p.clone(), n.clone());
        let names = self.names();
        // Who removed a patient's file, in the audit (as the consent grants name theirs).
        let by = format!("uid {}, pid {}", req.uid(), req.pid());
        self.off_the_loop_if(&[&key], move || match names.unlink(&p, &n, &by) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        // An exchange (or a whiteout) is not done: taken as a plain rename, it would delete
        // the target's version.
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            tracing::info!("rename of {name:?}: flags {flags} not supported");
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (Ok(from), Ok(to)) = (self.child(parent, name), self.child(newparent, newname)) else {
            return reply.error(Errno::EINVAL);
        };
        let (Node::File(p, n), Node::File(np, nn)) = (&from, &to) else {
            return reply.error(Errno::EPERM);
        };
        let keys = [(p.clone(), n.clone()), (np.clone(), nn.clone())];
        let names = self.names();
        self.off_the_loop_if(&[&keys[0], &keys[1]], move || {
            match names.rename(&from, &to, noreplace) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Some(Node::File(..)) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
            Some(_) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs.lock().expect("dirs").insert(fh, None);
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let made = match self.dirs.lock().expect("dirs").get(&fh.0) {
            Some(Some(entries)) if offset > 0 => Some(entries.clone()),
            _ => None,
        };
        let entries = match made {
            Some(entries) => entries,
            None => {
                let entries = match self.list(ino) {
                    Ok(entries) => Arc::new(entries),
                    Err(e) => return reply.error(e),
                };
                let old = match self.dirs.lock().expect("dirs").get_mut(&fh.0) {
                    Some(made) => made.replace(entries.clone()),
                    // Not opened through `opendir`: nothing holds the listing.
                    None => Some(entries.clone()),
                };
                if let Some(old) = old {
                    self.unpin(&old);
                }
                entries
            }
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let listing = self.dirs.lock().expect("dirs").remove(&fh.0);
        if let Some(entries) = listing.flatten() {
            self.unpin(&entries);
        }
        reply.ok();
    }

    /// The sites' room ([`Engine::space`]), at most [`SPACE_TTL`] old. Asking the sites
    /// waits for their answers (up to [`super::engine::SPACE_WAIT`]), so it is done by one
    /// thread of its own, off the request loops; the `statfs` calls that come meanwhile wait
    /// in a queue for its answer, holding no thread.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        SpaceCache::statfs(&self.space, &self.engine, reply);
    }
}

/// How long the sites' room is reused for `statfs` before they are asked again.
const SPACE_TTL: Duration = Duration::from_secs(2);

/// Bytes per block in `statfs`'s counts (`f_frsize`, what `df` multiplies by).
const SPACE_BLOCK: u64 = 4096;

/// The last answer of [`Engine::space`] and when it was had, and the `statfs` calls waiting
/// for the next.
#[derive(Default)]
struct SpaceCache {
    state: Mutex<SpaceState>,
}

#[derive(Default)]
struct SpaceState {
    last: Option<(std::time::Instant, crate::placement::Space)>,
    waiting: Vec<ReplyStatfs>,
    /// A thread is asking the sites; it answers `waiting` when they have answered.
    asking: bool,
}

impl SpaceCache {
    /// Answer from the last answer if it is fresh, else queue the reply for the asking
    /// thread, starting one if none runs.
    fn statfs(cache: &Arc<SpaceCache>, engine: &Arc<Engine>, reply: ReplyStatfs) {
        let mut st = cache.state.lock().expect("space");
        if let Some((at, space)) = st.last {
            if at.elapsed() < SPACE_TTL {
                drop(st);
                return reply_space(reply, space);
            }
        }
        st.waiting.push(reply);
        if st.asking {
            return;
        }
        st.asking = true;
        drop(st);
        let (c, engine) = (cache.clone(), engine.clone());
        let spawned = std::thread::Builder::new()
            .name("fs-statfs".into())
            .spawn(move || c.ask(&engine));
        if let Err(e) = spawned {
            tracing::error!("statfs: no thread to ask the sites on: {e}");
            let mut st = cache.state.lock().expect("space");
            st.asking = false;
            for r in std::mem::take(&mut st.waiting) {
                r.error(Errno::EAGAIN);
            }
        }
    }

    /// Ask the sites, answer every waiting reply, and again while replies keep coming.
    fn ask(&self, engine: &Engine) {
        loop {
            let space = engine.space();
            let waiting = {
                let mut st = self.state.lock().expect("space");
                st.last = Some((std::time::Instant::now(), space));
                std::mem::take(&mut st.waiting)
            };
            for r in waiting {
                reply_space(r, space);
            }
            let mut st = self.state.lock().expect("space");
            if st.waiting.is_empty() {
                st.asking = false;
                return;
            }
        }
    }
}

fn reply_space(reply: ReplyStatfs, space: crate::placement::Space) {
    let blocks = space.total / SPACE_BLOCK;
    let free = space.free / SPACE_BLOCK;
    // Files are catalog records, not bounded by the volumes: report names as plentiful.
    reply.statfs(
        blocks,
        free,
        free,
        1 << 32,
        1 << 31,
        SPACE_BLOCK as u32,
        255,
        SPACE_BLOCK as u32,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: &str) -> Node {
        Node::File("p".into(), n.into())
    }

    /// A rename's writer never lands over a writer that took the target meanwhile (an
    /// O_TRUNC open while the rename waited for its locks): it is told, and holds no name.
    #[test]
    fn an_entry_moved_onto_a_name_another_holds_is_refused_and_leaves_it() {
        let (a, b, w2) = (Arc::new(1u8), Arc::new(2u8), Arc::new(3u8));
        let mut t = HashMap::from([("a", a.clone()), ("b", w2.clone())]);
        assert!(!move_entry(&mut t, &"a", &a, Some("b")));
        assert!(Arc::ptr_eq(&t["b"], &w2) && !t.contains_key("a"));
        // Onto a free name, or its own: moved. An entry no longer its key's: left alone.
        t.insert("a", a.clone());
        assert!(move_entry(&mut t, &"a", &a, Some("c")));
        assert!(Arc::ptr_eq(&t["c"], &a));
        assert!(move_entry(&mut t, &"c", &a, Some("c")));
        assert!(Arc::ptr_eq(&t["c"], &a));
        assert!(move_entry(&mut t, &"b", &b, Some("d")));
        assert!(Arc::ptr_eq(&t["b"], &w2) && !t.contains_key("d"));
    }

    #[test]
    fn a_job_whose_thread_cannot_be_made_comes_back_to_run_on_the_callers() {
        let count = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(AtomicUsize::new(0));
        let job = |ran: &Arc<AtomicUsize>| -> Job {
            let ran = ran.clone();
            Box::new(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            })
        };
        // No thread gets a stack of 2^62 bytes.
        let huge = std::thread::Builder::new().stack_size(1 << 62);
        let (back, e) = spawn_or_return(huge, job(&ran)).expect_err("no such stack");
        assert!(!e.to_string().is_empty());
        assert_eq!(ran.load(Ordering::SeqCst), 0, "not run yet");
        back();
        assert_eq!(ran.load(Ordering::SeqCst), 1, "the job came back whole");
        // The normal way: run apart, counted while it runs.
        let (tx, rx) = mpsc::channel::<()>();
        let (go, wait) = mpsc::channel::<()>();
        let r = ran.clone();
        let held: Job = Box::new(move || {
            let _ = wait.recv();
            r.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(());
        });
        assert!(run_apart(&count, 1, "t", "test", held).is_ok());
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let refused = run_apart(&count, 1, "t", "test", job(&ran)).expect_err("at the limit");
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "a refused job is not counted"
        );
        refused();
        go.send(()).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::SeqCst) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the count went back to 0"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(ran.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_node_lives_while_the_kernel_holds_a_lookup_of_it() {
        let mut t = Inodes::new();
        let a = t.looked_up(&file("a"));
        assert_eq!(t.looked_up(&file("a")), a, "same node, same number");
        t.forget(a, 1);
        assert_eq!(t.node(a), Some(file("a")), "one lookup still held");
        t.forget(a, 1);
        assert_eq!(t.node(a), None, "the last lookup given back drops it");
        assert_eq!(t.by_ino.len(), 1, "only the root is left");
        assert!(!t.by_node.contains_key(&file("a")));
        let again = t.looked_up(&file("a"));
        assert!(again > a, "a forgotten number is never reused");
        t.forget(again, 5);
        assert_eq!(t.by_ino.len(), 1, "an over-count forgets, never underflows");
        t.forget(ROOT, 1);
        assert_eq!(
            t.node(ROOT),
            Some(Node::Root),
            "the root is never forgotten"
        );
    }

    #[test]
    fn a_forget_after_a_rename_over_the_number_is_ignored() {
        let mut t = Inodes::new();
        let a = t.looked_up(&file("a"));
        let b = t.looked_up(&file("b"));
        t.rename(&file("a"), file("b"));
        assert_eq!(t.node(a), Some(file("b")));
        assert_eq!(t.node(b), None, "the replaced number names nothing");
        assert_eq!(
            t.files_of("p").len(),
            2,
            "but is kept for the consent-end page dropping until forgotten"
        );
        t.forget(b, 1);
        assert_eq!(t.files_of("p"), vec![a]);
        assert_eq!(
            t.node(a),
            Some(file("b")),
            "forgetting the old number leaves the new"
        );
        t.forget(a, 1);
        assert_eq!(t.by_ino.len(), 1);
        assert_eq!(t.by_node.len(), 1, "only the root's name is left");
    }

    #[test]
    fn a_removed_name_created_again_gets_a_new_number() {
        let mut t = Inodes::new();
        let dir = Node::Patient("p".into());
        let d = t.looked_up(&dir);
        let a = t.looked_up(&file("a"));
        let listed = t.ino(file("listed"));
        t.removed(&file("a"));
        t.removed(&file("listed"));
        t.removed(&dir);
        assert_eq!(
            t.node(a),
            None,
            "an unlinked file held by the kernel names nothing"
        );
        assert_eq!(t.node(d), None, "nor a removed patient directory");
        assert_eq!(t.files_of("p"), vec![a], "kept until forgotten");
        assert!(
            !t.by_ino.contains_key(&listed),
            "a number with no lookups goes at once"
        );
        let d2 = t.looked_up(&dir);
        let a2 = t.looked_up(&file("a"));
        assert!(d2 != d && a2 != a, "created again: new numbers");
        t.forget(a, 1);
        t.forget(d, 1);
        assert_eq!(t.node(a2), Some(file("a")));
        assert_eq!(t.node(d2), Some(dir));
        assert_eq!(t.by_ino.len(), 3, "root and the two new numbers");
    }

    #[test]
    fn numbers_only_listed_are_swept_once_the_table_doubles() {
        let mut t = Inodes::new();
        let held = t.looked_up(&file("held"));
        for i in 0..SWEEP_FLOOR - 2 {
            t.ino(file(&format!("listed{i}")));
        }
        assert_eq!(t.by_ino.len(), SWEEP_FLOOR, "no sweep below the floor");
        assert_eq!(
            t.ino(file("listed0")),
            held + 1,
            "a listed name keeps its number"
        );
        // The table reached the floor: the next new number sweeps the listed ones first.
        let fresh = t.ino(file("fresh"));
        assert_eq!(t.by_ino.len(), 3, "root, the held node and the fresh one");
        assert_eq!(t.by_node.len(), 3);
        assert_eq!(t.node(held), Some(file("held")));
        assert_eq!(t.node(fresh), Some(file("fresh")));
        assert_eq!(t.sweep_at, SWEEP_FLOOR);
        let relisted = t.ino(file("listed0"));
        assert!(relisted > fresh, "a swept name gets a new number");
    }

    #[test]
    fn numbers_an_open_listing_gave_out_outlive_sweeps_and_forgets_until_it_closes() {
        let mut t = Inodes::new();
        let listed: Vec<u64> = (0..SWEEP_FLOOR)
            .map(|i| t.pinned(file(&format!("listed{i}"))))
            .collect();
        assert!(
            t.sweep_at > SWEEP_FLOOR,
            "the table passed the floor while the listing was made: {}",
            t.sweep_at
        );
        for (i, &n) in listed.iter().enumerate() {
            assert_eq!(
                t.node(n),
                Some(file(&format!("listed{i}"))),
                "a sweep while the listing is made keeps its numbers"
            );
        }
        // `ls -l`: each listed name looked up, then forgotten, while the listing is open.
        assert_eq!(t.looked_up(&file("listed7")), listed[7]);
        t.forget(listed[7], 1);
        assert_eq!(t.node(listed[7]), Some(file("listed7")), "still pinned");
        // Closed: the numbers stay until a sweep, so a lookup right after gets the same.
        for &n in &listed {
            t.unpin(n);
        }
        assert_eq!(t.looked_up(&file("listed9")), listed[9]);
        while t.by_ino.len() < t.sweep_at {
            t.ino(file(&format!("other{}", t.next)));
        }
        t.ino(file("sweeps"));
        assert_eq!(t.node(listed[9]), Some(file("listed9")), "looked up: kept");
        assert_eq!(t.node(listed[8]), None, "only listed, closed: swept");
        // A pinned number whose name goes is dropped at its last forget, pin or not.
        let p = t.pinned(file("gone"));
        t.looked_up(&file("gone"));
        t.removed(&file("gone"));
        t.forget(p, 1);
        assert!(!t.by_ino.contains_key(&p));
        t.unpin(p);
    }
}
