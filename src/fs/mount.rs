//! Bringing a mount up and down: catalog, consent, engine, recovery, control socket, FUSE.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use super::engine::{Engine, EngineConfig};
use super::fuse::QgenomeFs;
use crate::catalog::Catalog;
use crate::config::HomeConfig;
use crate::consent::{ConsentRegistry, MAX_GRANT_MINUTES};
use crate::control::{self, arg_str, Handler};
use crate::sites::ShareSite;

/// The engine a home config describes, over `catalog` and `sites` (share i on `sites[i]`).
pub fn engine_for(
    cfg: &HomeConfig,
    catalog: Arc<Catalog>,
    sites: Vec<Arc<dyn ShareSite>>,
) -> anyhow::Result<Arc<Engine>> {
    let consent = ConsentRegistry::new(catalog.clone());
    Ok(Engine::new(
        catalog,
        consent,
        sites,
        EngineConfig {
            k: cfg.scheme.k,
            n: cfg.scheme.n,
            chunk_size: cfg.chunk_bytes()?,
            consent_wait: Duration::from_secs(cfg.consent_wait_secs),
            cache_bytes: cfg.cache_bytes()?,
            ..EngineConfig::default()
        },
    )?)
}

/// A running mount. Dropping it without [`Mounted::unmount`] also unmounts.
pub struct Mounted {
    pub engine: Arc<Engine>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: std::path::PathBuf,
    /// The mountpoint's canonical path and this mount's id in `/proc/self/mountinfo`.
    mount_id: Option<(std::path::PathBuf, u64)>,
    inodes: super::fuse::InodeTable,
    /// The card watcher, when `[card]` is configured; stops (ending its sessions) on drop.
    _watcher: Option<crate::consent::watcher::WatcherHandle>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted").finish_non_exhaustive()
    }
}

/// Mount `cfg` at `mountpoint` over `sites` (share i on `sites[i]`), serving the control
/// socket with the built-in handlers followed by `extra` (card commands, ...).
pub fn start(
    cfg: &HomeConfig,
    mountpoint: &Path,
    sites: Vec<Arc<dyn ShareSite>>,
    extra: Vec<Arc<Handler>>,
) -> anyhow::Result<Mounted> {
    check_mountpoint(mountpoint)?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
    let catalog = Arc::new(Catalog::open(&cfg.catalog_path())?);
    refuse_unfinished_rebuild(&catalog)?;
    let engine = engine_for(cfg, catalog.clone(), sites)?;
    let discarded = engine.recover()?;
    if discarded > 0 {
        tracing::warn!(
            "discarded {discarded} file version(s) a crash left incomplete, or replaced but not yet deleted"
        );
    }
    // With cards, a consent comes from the patient's card: an admin grant (no card) only
    // where the configuration says so.
    let admin_grants = cfg.card.as_ref().is_none_or(|c| c.admin_grant);
    let mut handlers = vec![builtin_handler(engine.clone(), admin_grants)];
    let watcher = match &cfg.card {
        Some(card) => {
            use crate::consent::{enroll, watcher};
            let cards = watcher::CardConsent::new(catalog.clone(), engine.consent.clone());
            let mode = match card.mode.as_str() {
                "expiry" => watcher::ConsentMode::Expiry(Duration::from_secs(card.minutes() * 60)),
                _ => watcher::ConsentMode::UntilRemoved,
            };
            let handle = watcher::start(
                cards.clone(),
                watcher::WatcherConfig {
                    mode,
                    reader: card.reader.clone(),
                    ..watcher::WatcherConfig::default()
                },
            )
            .context("starting the card watcher")?;
            handlers.push(enroll::card_handler(
                cards,
                Arc::new(enroll::PcscReaders::default()),
            ));
            Some(handle)
        }
        None => None,
    };
    handlers.extend(extra);
    control::serve(&cfg.control_socket(), handlers)
        .with_context(|| format!("control socket {}", cfg.control_socket().display()))?;

    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName("qgenome".into()),
        fuser::MountOption::Subtype("qgenome".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoExec,
        // The kernel checks every access against the owners and modes the mount reports
        // (the creator's, kept in the catalog): with `allow_other`, users are kept to their
        // own files and to the folders they may write in.
        fuser::MountOption::DefaultPermissions,
    ];
    options.acl = if cfg.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    options.n_threads = Some(4);
    let fs = QgenomeFs::new(engine.clone(), 16);
    let inodes = fs.inode_table();
    let canonical = mountpoint
        .canonicalize()
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    let session = fuser::spawn_mount(fs, mountpoint, &options)
        .with_context(|| format!("mounting at {}", mountpoint.display()))?;
    let mount_id = top_mount(&canonical)
        .filter(|(_, fstype)| fstype == "fuse" || fstype.starts_with("fuse."))
        .map(|(id, _)| (canonical, id));
    if mount_id.is_none() {
        tracing::warn!(
            "{}: the new mount is not in /proc/self/mountinfo; a mount taken away under this one will go unnoticed",
            mountpoint.display()
        );
    }
    super::fuse::drop_cached_pages_at_consent_end(
        inodes.clone(),
        &engine.consent,
        session.notifier(),
    );
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    Ok(Mounted {
        engine,
        session: Some(session),
        mount_id,
        mountpoint: mountpoint.to_path_buf(),
        inodes,
        _watcher: watcher,
    })
}

impl Mounted {
    /// How many inode numbers the mount keeps: the root, and every node the kernel holds a
    /// lookup of or was listed since the last sweep (see `fuse::Inodes`).
    pub fn inodes_held(&self) -> usize {
        self.inodes.held()
    }

    /// True once the FUSE session has ended without [`Mounted::unmount`]: someone unmounted
    /// the mountpoint (`umount`, `fusermount3 -u`), or the kernel connection failed. The
    /// mountpoint is then a plain directory, and whatever is written there is not stored.
    ///
    /// Also true once the mountpoint no longer shows this mount on top: a lazy unmount
    /// (`umount -l`) of a mount something still holds open detaches it from the mountpoint
    /// while the kernel keeps the FUSE connection, and so the session, alive; another mount
    /// over it hides it likewise. Read from `/proc/self/mountinfo`, never through the mount.
    pub fn session_ended(&self) -> bool {
        if self.session.as_ref().is_none_or(|s| s.guard.is_finished()) {
            return true;
        }
        match &self.mount_id {
            Some((path, id)) => top_mount(path).is_none_or(|(top, _)| top != *id),
            None => false,
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts, then lets the deletions under way finish (up to [`DISCARD_WAIT`]), flushes
    /// the catalog and completes the destruction of used link key: all of it also when the
    /// unmount fails (a busy mount: `EBUSY`), before that error is returned, since the process
    /// exits after either way.
    ///
    /// [`DISCARD_WAIT`]: super::engine::DISCARD_WAIT
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.engine.consent.close();
        let unmounted = match self.session.take() {
            Some(s) => {
                wait_until_idle(&self.mountpoint);
                s.umount_and_join()
                    .with_context(|| format!("unmounting {}", self.mountpoint.display()))
            }
            None => Ok(()),
        };
        let finished = self.finish();
        unmounted.and(finished)
    }

    /// What [`Mounted::unmount`] does after the unmount itself.
    fn finish(&self) -> anyhow::Result<()> {
        if !self.engine.wait_discards(super::engine::DISCARD_WAIT) {
            tracing::warn!(
                "shares of unlinked or replaced files still being deleted after {:?}; \
                 the next mount deletes the rest",
                super::engine::DISCARD_WAIT
            );
            self.engine.audit_unrefreshed();
        }
        self.engine.catalog.flush()?;
        let failed = self.engine.flush_links();
        if !failed.is_empty() {
            anyhow::bail!(
                "unmounted, but the destruction of used link key did not complete: {}",
                failed.join("; ")
            );
        }
        Ok(())
    }
}

/// The id and filesystem type of the topmost mount at `path` (canonical), from
/// `/proc/self/mountinfo` (later lines are mounted over earlier ones).
fn top_mount(path: &Path) -> Option<(u64, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        let at = unescape_mountinfo(fields.get(4)?);
        (Path::new(&at) == path).then(|| {
            let id = fields[0].parse().ok()?;
            Some((id, fields.get(dash + 1)?.to_string()))
        })?
    })
}

/// A mountinfo path field: space, tab, newline and backslash are written as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Refuses a mountpoint that is not an empty directory. Whatever is in it would be hidden
/// under the mount, and files in a bare `/qgenome` are most likely genomes a pipeline wrote
/// there in the clear while no mount was up: they belong to an operator's decision, not
/// under a mount that hides them. A mount left behind by a crashed `qgenome mount` reads as
/// "not connected" and is named as such.
pub fn check_mountpoint(mountpoint: &Path) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(mountpoint) {
        Ok(entries) => entries,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => anyhow::bail!(
            "mountpoint {}: a mount of a stopped qgenome is still attached there ({e}); detach it with `fusermount3 -u {}`",
            mountpoint.display(),
            mountpoint.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("mountpoint {}", mountpoint.display()));
        }
    };
    let mut names = Vec::new();
    for entry in entries.take(6) {
        let entry =
            entry.with_context(|| format!("listing mountpoint {}", mountpoint.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    if !names.is_empty() {
        let more = if names.len() > 5 { ", ..." } else { "" };
        names.truncate(5);
        anyhow::bail!(
            "mountpoint {} is not empty ({}{more}): files there would be hidden under the mount, and may be data written in the clear while it was not mounted; move them away first",
            mountpoint.display(),
            names.join(", ")
        );
    }
    Ok(())
}

/// A catalog that a `qgenome catalog rebuild` began to fill and did not finish holds only part
/// of the files: mounted, it would serve that part as if it were all.
pub fn refuse_unfinished_rebuild(catalog: &Catalog) -> anyhow::Result<()> {
    if catalog.rebuild_unfinished()? {
        anyhow::bail!(
            "catalog {}: a `qgenome catalog rebuild` into it did not finish (some files may be missing); move it aside and run the rebuild again",
            catalog.path().display()
        );
    }
    Ok(())
}

/// Wait up to 2 s for `mountpoint` to be idle before it is unmounted: a process that has just
/// closed its last file there, or a child forked meanwhile by another thread (holding a copy
/// of that descriptor until it execs), keeps it busy for moments, and an unmount then would
/// fail with EBUSY. The probe is `umount2(MNT_EXPIRE)`, which unmounts nothing on its first
/// call: EBUSY while in use, EAGAIN (and the mount marked expired) once idle. Without the
/// privilege (EPERM) or past the wait, fuser's own unmount does or reports the rest.
fn wait_until_idle(mountpoint: &Path) {
    use nix::errno::Errno;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while let Err(Errno::EBUSY) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_EXPIRE)
    {
        if std::time::Instant::now() >= deadline {
            tracing::warn!("{} is still busy after 2 s", mountpoint.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.engine.consent.close();
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// consent-grant / consent-revoke / consent-list / status / audit.
fn builtin_handler(engine: Arc<Engine>, admin_grants: bool) -> Arc<Handler> {
    Arc::new(move |req: &Value| {
        let cmd = req["cmd"].as_str()?;
        let reply = match cmd {
            "consent-grant" => (|| {
                let patient = arg_str(req, "patient")?;
                // A grant refused is audited as one given is.
                let refused = |why: String| {
                    engine.catalog.audit(
                        "consent-refused",
                        Some(patient),
                        None,
                        &format!("admin grant ({}) refused: {why}", control::peer_of(req)),
                    );
                    control::error(why)
                };
                if !admin_grants {
                    return Err(refused(format!(
                        "consent-grant {patient}: refused: this mount takes consent from the patient's card ([card] in its configuration); an admin grant needs `admin_grant = true` under [card]"
                    )));
                }
                let minutes = control::opt_u64(req, "minutes")
                    .map_err(|e| refused(e["error"].as_str().unwrap_or_default().to_string()))?
                    .unwrap_or(15);
                if !(1..=MAX_GRANT_MINUTES).contains(&minutes) {
                    return Err(refused(format!(
                        "consent-grant: minutes must be between 1 and {MAX_GRANT_MINUTES} (7 days), not {}",
                        req["minutes"]
                    )));
                }
                match engine.catalog.patient(patient) {
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(refused(format!("patient {patient} does not exist"))),
                    Err(e) => return Err(refused(e.to_string())),
                }
                engine.consent.grant(
                    patient,
                    Some(Duration::from_secs(minutes * 60)),
                    &format!("admin ({})", control::peer_of(req)),
                );
                Ok(json!({"ok": true, "patient": patient, "minutes": minutes}))
            })(),
            "consent-revoke" => (|| {
                let patient = arg_str(req, "patient")?;
                // Ended first, whatever the catalog says: a consent outlives its patient's
                // folder (rmdir, then mkdir again), and a revoke must never be held up.
                let ended = engine.consent.end(
                    patient,
                    &format!("revoked by admin ({})", control::peer_of(req)),
                );
                if ended {
                    return Ok(json!({"ok": true, "ended": true}));
                }
                // A revoke that ended nothing is audited too (the end audits one that did).
                let missing = matches!(engine.catalog.patient(patient), Ok(None));
                engine.catalog.audit(
                    "consent-revoke",
                    Some(patient),
                    None,
                    &format!(
                        "by admin ({}): {}",
                        control::peer_of(req),
                        if missing {
                            "no such patient"
                        } else {
                            "no consent was active"
                        }
                    ),
                );
                if missing {
                    // Nothing ended, and no such patient: a typo, named.
                    return Err(control::error(format!("patient {patient} does not exist")));
                }
                Ok(json!({"ok": true, "ended": false}))
            })(),
            "consent-list" => Ok(json!({"ok": true, "grants": engine.consent.list()})),
            "status" => {
                let sites: Vec<Value> = engine
                    .sites()
                    .iter()
                    .map(|s| {
                        json!({
                            "name": s.name(),
                            "key_remaining": s.key_remaining(),
                            "reply_key_remaining": s.reply_key_remaining(),
                            "usage": s.usage(),
                        })
                    })
                    .collect();
                Ok(json!({
                    "ok": true,
                    "stats": engine.stats().snapshot(),
                    "open_for_reading": engine.open_readers(),
                    "sites": sites,
                }))
            }
            "audit" => control::opt_u64(req, "last").and_then(|last| {
                engine
                    .catalog
                    .audit_log()
                    .map(|log| {
                        let last = last.unwrap_or(50).min(log.len() as u64) as usize;
                        let tail = &log[log.len() - last..];
                        json!({"ok": true, "entries": tail})
                    })
                    .map_err(control::error)
            }),
            _ => return None,
        };
        Some(reply.unwrap_or_else(|e| e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b/c\\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo("/plain\\"), "/plain\\");
    }

    #[test]
    fn the_root_filesystem_is_a_mount_on_top_of_slash() {
        let (_, fstype) = top_mount(Path::new("/")).expect("/ is in mountinfo");
        assert!(!fstype.is_empty());
        assert!(top_mount(Path::new("/no/such/mountpoint")).is_none());
    }
}
