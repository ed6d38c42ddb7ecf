//! Consent sessions.
//!
//! A session belongs to one patient and ends at its expiry, when revoked, or (for card
//! sessions in "until removed" mode) when the card leaves the reader. Readers block in
//! [`Consent::wait`] until a session for their patient is active or their limit passes. Every
//! grant, expiry, revoke and refusal is written to the audit log; ending a session runs the
//! registered hooks, which wipe that patient's cached plaintext.
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::catalog::Catalog;

/// Where audit entries go (the catalog's append-only log in production).
pub trait Audit: Send + Sync {
    fn record(&self, event: &str, patient: Option<&str>, file: Option<&str>, detail: &str);
}

impl Audit for Catalog {
    fn record(&self, event: &str, patient: Option<&str>, file: Option<&str>, detail: &str) {
        self.audit(event, patient, file, detail);
    }
}

/// Longest consent a grant (admin or card in expiry mode) may give: 7 days, in minutes.
pub const MAX_GRANT_MINUTES: u64 = 7 * 24 * 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsentError {
    #[error("no consent for patient {patient} within {waited:?}")]
    TimedOut { patient: String, waited: Duration },
    #[error("the mount is shutting down: no consent for patient {patient}")]
    ShuttingDown { patient: String },
    #[error("the reader of patient {patient}'s file gave up (a fatal signal is pending)")]
    Abandoned { patient: String },
    #[error(
        "consent for patient {patient} ended while the read was being served; no data returned"
    )]
    Ended { patient: String },
}

/// Whether thread `tid` has a pending signal that will kill it (pending, neither blocked,
/// caught nor ignored, and not one whose default is to ignore or to stop). fuser 0.18 drops
/// FUSE_INTERRUPT, so a reader killed while it waits for consent is noticed this way
/// instead. A blocked signal (a program taking its signals with `sigwait` or `signalfd`) is
/// never delivered while blocked, and a stop signal stops the reader rather than ending it
/// (this kernel stops a reader at once, its signal not left pending; one that left it
/// pending until the read returns must not end the wait either): neither ends the reader.
pub fn fatal_signal_pending(tid: u32) -> bool {
    // The kernel sends pid 0 for a caller outside the mount's pid namespace (a pipeline in a
    // container): it cannot be looked up, which is not the same as gone.
    if tid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return true; // gone
    };
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    let bit = |sig: i32| 1u64 << (sig - 1);
    let default_ignored =
        bit(libc::SIGCHLD) | bit(libc::SIGCONT) | bit(libc::SIGURG) | bit(libc::SIGWINCH);
    let stops = bit(libc::SIGSTOP) | bit(libc::SIGTSTP) | bit(libc::SIGTTIN) | bit(libc::SIGTTOU);
    let handled = mask("SigCgt:") | mask("SigIgn:") | mask("SigBlk:") | stops;
    pending & bit(libc::SIGKILL) != 0 || pending & !handled & !default_ignored != 0
}

/// The gate every read of plaintext passes.
pub trait Consent: Send + Sync {
    /// Return once a consent session for `patient` is active, or fail after `limit`.
    fn wait(&self, patient: &str, limit: Duration) -> Result<(), ConsentError>;
    fn is_active(&self, patient: &str) -> bool;
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GrantInfo {
    pub patient: String,
    /// Who granted it: `admin`, or `card <GUID>`.
    pub source: String,
    /// Seconds left, or `None` for "until the card is removed".
    pub remaining_secs: Option<u64>,
}

struct Grant {
    source: String,
    expires: Option<Instant>,
    /// Which session this is: a grant that extends an active one keeps its number, one made
    /// after an end gets a new one, so that an end waits for its own session's replies only.
    id: u64,
}

type Hook = Arc<dyn Fn(&str) + Send + Sync>;

/// See [`ConsentRegistry::hold_end`].
pub struct EndHold {
    registry: Arc<ConsentRegistry>,
    patient: String,
}

impl Drop for EndHold {
    fn drop(&mut self) {
        self.registry.end_done(&self.patient);
    }
}

pub struct ConsentRegistry {
    /// This registry, for the threads an expiry ends sessions on.
    me: std::sync::Weak<ConsentRegistry>,
    grants: Mutex<HashMap<String, Grant>>,
    /// Set at shutdown: every waiting and later read is refused at once.
    closed: std::sync::atomic::AtomicBool,
    changed: Condvar,
    hooks: Mutex<Vec<Hook>>,
    audit: Arc<dyn Audit>,
    /// Replies of plaintext under way, per patient and session ([`ConsentRegistry::serving`]);
    /// taken inside `grants`' lock, never the other way round.
    serving: Mutex<HashMap<(String, u64), usize>>,
    served: Condvar,
    /// Ends under way (waiting for replies, then wiping), per patient; taken inside
    /// `grants`' lock, so that an end finding no grant sees the end that took it.
    ending: Mutex<HashMap<String, usize>>,
    /// Signalled when an end under way has wiped.
    wiped: Condvar,
    /// The next session's number.
    next_id: std::sync::atomic::AtomicU64,
}

/// How long the end of a session waits for the replies under way of its patient before it
/// wipes the caches all the same (a reply is a copy into the kernel: microseconds).
pub const SERVE_WAIT: Duration = Duration::from_secs(5);

/// How long an end that finds the session already ending waits for that end's wipe: its
/// wait for replies ([`SERVE_WAIT`]) and the wipe hooks (page-cache drops wait up to 2 s).
pub const END_WAIT: Duration = Duration::from_secs(15);

/// A reply of `patient`'s plaintext under way: while one is held, the end of the patient's
/// session waits (see [`ConsentRegistry::serving`]).
pub struct Serving {
    reg: Arc<ConsentRegistry>,
    /// Patient and session.
    key: (String, u64),
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut serving = self.reg.serving.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = serving.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                serving.remove(&self.key);
            }
        }
        self.reg.served.notify_all();
    }
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("patient", &self.key.0)
            .finish()
    }
}

impl std::fmt::Debug for ConsentRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsentRegistry").finish_non_exhaustive()
    }
}

impl ConsentRegistry {
    pub fn new(audit: Arc<dyn Audit>) -> Arc<Self> {
        let reg = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            grants: Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            changed: Condvar::new(),
            hooks: Mutex::new(Vec::new()),
            audit,
            serving: Mutex::new(HashMap::new()),
            served: Condvar::new(),
            ending: Mutex::new(HashMap::new()),
            wiped: Condvar::new(),
            next_id: std::sync::atomic::AtomicU64::new(0),
        });
        // Expire sessions on time even when nobody is reading, so cached plaintext is wiped.
        let weak = Arc::downgrade(&reg);
        std::thread::Builder::new()
            .name("consent-expiry".into())
            .spawn(move || {
                while let Some(reg) = weak.upgrade() {
                    reg.sweep();
                    drop(reg);
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
            .expect("spawn consent expiry thread");
        reg
    }

    /// Run `hook(patient)` whenever a patient's session ends.
    pub fn on_end(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(hook));
    }

    /// Open (or extend) a session. `ttl = None` lasts until [`ConsentRegistry::end`].
    pub fn grant(&self, patient: &str, ttl: Option<Duration>, source: &str) {
        let now = Instant::now();
        let expires = ttl.map(|t| now + t);
        let expired = {
            let mut grants = self.grants.lock().expect("grants");
            // A session past its expiry that the sweep has not reached yet ends now (audited,
            // caches wiped), and this grant opens a new one.
            let expired = match grants.get(patient) {
                Some(g) if g.expires.is_some_and(|e| e <= now) => {
                    let id = g.id;
                    grants.remove(patient);
                    self.begin_end(patient);
                    Some(id)
                }
                _ => None,
            };
            // Extending a session keeps its number, so its end waits for the replies begun
            // before the extension too.
            let id = grants.get(patient).map_or_else(
                || {
                    self.next_id
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                },
                |g| g.id,
            );
            grants.insert(
                patient.to_string(),
                Grant {
                    source: source.to_string(),
                    expires,
                    id,
                },
            );
            expired
        };
        if let Some(id) = expired {
            self.audit
                .record("consent-expired", Some(patient), None, "");
            self.finish_end(patient, id);
        }
        let detail = match ttl {
            Some(t) => format!("{source}, {} s", t.as_secs()),
            None => format!("{source}, until removed"),
        };
        self.audit
            .record("consent-grant", Some(patient), None, &detail);
        self.changed.notify_all();
    }

    /// A reply of `patient`'s plaintext may begin: `None` unless the session is active
    /// (and the registry open). The session's end, once the session is gone, waits for the
    /// replies begun before it (up to [`SERVE_WAIT`]), so that no byte is delivered after a
    /// revoke or a card removal has returned, and the caches are wiped after the last one.
    pub fn serving(self: &Arc<Self>, patient: &str) -> Option<Serving> {
        let grants = self.grants.lock().expect("grants");
        if self.closed.load(std::sync::atomic::Ordering::SeqCst)
            || !Self::active_locked(&grants, patient, Instant::now())
        {
            return None;
        }
        let key = (patient.to_string(), grants[patient].id);
        *self
            .serving
            .lock()
            .expect("serving")
            .entry(key.clone())
            .or_default() += 1;
        Some(Serving {
            reg: self.clone(),
            key,
        })
    }

    /// Wait for the replies of `patient`'s session `id` under way, which began before the
    /// session ended (not those of a session granted since).
    fn wait_served(&self, patient: &str, id: u64) {
        let key = (patient.to_string(), id);
        let serving = self.serving.lock().expect("serving");
        let (serving, waited) = self
            .served
            .wait_timeout_while(serving, SERVE_WAIT, |s| s.contains_key(&key))
            .expect("serving");
        if waited.timed_out() {
            tracing::warn!(
                "patient {patient}: {} read(s) still replying {SERVE_WAIT:?} after the consent ended; wiping the caches all the same",
                serving.get(&key).copied().unwrap_or(0)
            );
        }
    }

    /// End a session (revoke, card removed). Returns whether one was active. Returns once
    /// the replies begun under it are done and the caches wiped; when another end of the
    /// patient's session (an expiry, the card pulled) is under way, once that one has wiped.
    pub fn end(&self, patient: &str, reason: &str) -> bool {
        let ended = {
            let mut grants = self.grants.lock().expect("grants");
            let ended = grants.remove(patient);
            if ended.is_some() {
                self.begin_end(patient);
            }
            ended
        };
        match &ended {
            Some(g) => {
                self.audit
                    .record("consent-end", Some(patient), None, reason);
                self.finish_end(patient, g.id);
            }
            None => self.wait_ends(patient),
        }
        ended.is_some()
    }

    /// Mark an end of `patient`'s session under way (called inside `grants`' lock).
    fn begin_end(&self, patient: &str) {
        self.mark_ending(patient);
        // Readers waiting for this patient's consent are refused while the end runs.
        self.changed.notify_all();
    }

    /// A read of `patient` waiting for consent while an end of that patient's session is under
    /// way is refused (called inside `grants`' lock, the session gone): a mapped page's read
    /// waiting there holds the page's lock, which the end's dropping of cached pages waits
    /// for; so the pages of the patient's files could stay readable, with no FUSE read to
    /// refuse them, for as long as that read would have waited.
    fn refuse_while_ending(&self, patient: &str) -> Result<(), ConsentError> {
        if !self.ending.lock().expect("ending").contains_key(patient) {
            return Ok(());
        }
        self.audit.record(
            "consent-refused",
            Some(patient),
            None,
            "a read waited while the consent was ending",
        );
        Err(ConsentError::Ended {
            patient: patient.to_string(),
        })
    }

    /// Wait for the replies under way of the session `id` that ended, wipe, and mark the end
    /// done.
    fn finish_end(&self, patient: &str, id: u64) {
        /// Marks the end done however it finishes: a hook that panics must not leave every
        /// later end of the patient waiting [`END_WAIT`].
        struct Done<'a>(&'a ConsentRegistry, &'a str);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.end_done(self.1);
            }
        }
        let _done = Done(self, patient);
        self.wait_served(patient, id);
        self.run_hooks(patient);
    }

    /// One more mark of an end of `patient` under way ([`ConsentRegistry::end_done`] takes
    /// it off).
    fn mark_ending(&self, patient: &str) {
        *self
            .ending
            .lock()
            .expect("ending")
            .entry(patient.to_string())
            .or_default() += 1;
    }

    /// One mark of an end of `patient` under way taken off ([`ConsentRegistry::begin_end`],
    /// [`ConsentRegistry::hold_end`]).
    fn end_done(&self, patient: &str) {
        let mut ending = self.ending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = ending.get_mut(patient) {
            *n -= 1;
            if *n == 0 {
                ending.remove(patient);
            }
        }
        self.wiped.notify_all();
    }

    /// For an end hook that hands its work to a thread of its own (dropping cached pages):
    /// the end of `patient` counts as under way, and readers waiting for that patient's
    /// consent are refused, until the returned hold is dropped.
    pub fn hold_end(self: &Arc<Self>, patient: &str) -> EndHold {
        self.mark_ending(patient);
        EndHold {
            registry: self.clone(),
            patient: patient.to_string(),
        }
    }

    /// Wait until no end of `patient`'s session is under way (up to [`END_WAIT`]).
    fn wait_ends(&self, patient: &str) {
        let ending = self.ending.lock().expect("ending");
        let (ending, waited) = self
            .wiped
            .wait_timeout_while(ending, END_WAIT, |e| e.contains_key(patient))
            .expect("ending");
        drop(ending);
        if waited.timed_out() {
            tracing::warn!(
                "patient {patient}: the end of the session under way has not wiped the caches after {END_WAIT:?}"
            );
        }
    }

    pub fn list(&self) -> Vec<GrantInfo> {
        self.sweep();
        let now = Instant::now();
        let grants = self.grants.lock().expect("grants");
        let mut v: Vec<GrantInfo> = grants
            .iter()
            .map(|(p, g)| GrantInfo {
                patient: p.clone(),
                source: g.source.clone(),
                remaining_secs: g
                    .expires
                    .map(|e| e.saturating_duration_since(now).as_secs()),
            })
            .collect();
        v.sort_by(|a, b| a.patient.cmp(&b.patient));
        v
    }

    /// Shutdown: end every session (wiping cached plaintext) and release every blocked reader
    /// with a refusal, so unmounting never waits out a reader's consent limit.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let patients: Vec<String> = self
            .grants
            .lock()
            .expect("grants")
            .keys()
            .cloned()
            .collect();
        for p in patients {
            self.end(&p, "mount shutting down");
        }
        self.changed.notify_all();
        // Ends already under way (an expiry's, on a thread of its own) finish before the
        // mount goes: their page drop and wipes are what a shutdown must not leave undone.
        let ending = self.ending.lock().unwrap_or_else(|e| e.into_inner());
        let (ending, waited) = self
            .wiped
            .wait_timeout_while(ending, END_WAIT, |e| !e.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        if waited.timed_out() {
            let left: Vec<&String> = ending.keys().collect();
            tracing::warn!(
                "mount shutting down: the ends of the sessions of {left:?} have not wiped the caches after {END_WAIT:?}"
            );
        }
    }

    /// End every session past its expiry.
    fn sweep(&self) {
        let now = Instant::now();
        let expired: Vec<(String, u64)> = {
            let mut grants = self.grants.lock().expect("grants");
            let gone: Vec<(String, u64)> = grants
                .iter()
                .filter(|(_, g)| g.expires.is_some_and(|e| e <= now))
                .map(|(p, g)| (p.clone(), g.id))
                .collect();
            for (p, _) in &gone {
                grants.remove(p);
                self.begin_end(p);
            }
            gone
        };
        for (p, _) in &expired {
            self.audit.record("consent-expired", Some(p), None, "");
        }
        // Each end on a thread of its own, not waited for: one waiting on a slow reply or
        // page drop must keep no other patient's caches and pages past its expiry, whether
        // that one expired in this sweep or a later one. (Its end is marked under way
        // above: readers are refused, and a revoke waits for it.)
        for (p, id) in expired {
            let spawned = self.me.upgrade().map(|me| {
                let patient = p.clone();
                std::thread::Builder::new()
                    .name("consent-end".into())
                    .spawn(move || me.finish_end(&patient, id))
            });
            match spawned {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(
                        "consent of {p} expired: no thread to end it apart ({e}); ending it here"
                    );
                    self.finish_end(&p, id);
                }
                None => self.finish_end(&p, id),
            }
        }
    }

    /// Run every wipe hook, outside the hooks' lock, each on its own: one that panics is
    /// logged, and neither stops the others nor poisons the lock for every later end.
    fn run_hooks(&self, patient: &str) {
        let hooks: Vec<Hook> = self.hooks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for hook in hooks {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(patient)));
            if ran.is_err() {
                tracing::error!("patient {patient}: a wipe hook panicked at the end of the consent; the other hooks ran");
            }
        }
    }

    fn active_locked(grants: &HashMap<String, Grant>, patient: &str, now: Instant) -> bool {
        grants
            .get(patient)
            .is_some_and(|g| g.expires.is_none_or(|e| e > now))
    }
}

impl ConsentRegistry {
    /// [`Consent::wait`], giving up early (with [`ConsentError::Abandoned`]) once `abandoned()`
    /// says the reader is gone; checked every 250 ms.
    pub fn wait_unless(
        &self,
        patient: &str,
        limit: Duration,
        abandoned: &dyn Fn() -> bool,
    ) -> Result<(), ConsentError> {
        let start = Instant::now();
        let deadline = start + limit;
        let mut grants = self.grants.lock().expect("grants");
        let shutting_down = || {
            self.audit.record(
                "consent-refused",
                Some(patient),
                None,
                "the mount is shutting down",
            );
            Err(ConsentError::ShuttingDown {
                patient: patient.to_string(),
            })
        };
        loop {
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                drop(grants);
                return shutting_down();
            }
            let now = Instant::now();
            if Self::active_locked(&grants, patient, now) {
                return Ok(());
            }
            self.refuse_while_ending(patient)?;
            if now >= deadline {
                drop(grants);
                self.audit.record(
                    "consent-refused",
                    Some(patient),
                    None,
                    &format!("no consent within {} s", limit.as_secs()),
                );
                return Err(ConsentError::TimedOut {
                    patient: patient.to_string(),
                    waited: limit,
                });
            }
            // Asked without the lock, which every `is_active` takes: up to 1024 readers wait at
            // once, each reading /proc every 250 ms.
            drop(grants);
            if abandoned() {
                self.audit.record(
                    "consent-abandoned",
                    Some(patient),
                    None,
                    &format!(
                        "the reader was killed after waiting {} s",
                        start.elapsed().as_secs()
                    ),
                );
                return Err(ConsentError::Abandoned {
                    patient: patient.to_string(),
                });
            }
            grants = self.grants.lock().expect("grants");
            // What changed while the lock was let go (its wake-up came before this wait).
            if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                drop(grants);
                return shutting_down();
            }
            if Self::active_locked(&grants, patient, Instant::now()) {
                return Ok(());
            }
            self.refuse_while_ending(patient)?;
            // Wake at the deadline, or at any grant; re-check expiry and the reader too.
            let step = (deadline - now).min(Duration::from_millis(250));
            grants = self.changed.wait_timeout(grants, step).expect("grants").0;
        }
    }
}

impl Consent for ConsentRegistry {
    fn wait(&self, patient: &str, limit: Duration) -> Result<(), ConsentError> {
        self.wait_unless(patient, limit, &|| false)
    }

    fn is_active(&self, patient: &str) -> bool {
        let grants = self.grants.lock().expect("grants");
        Self::active_locked(&grants, patient, Instant::now())
    }
}

/// Audit entries kept in memory, for tests.
#[derive(Default)]
pub struct MemAudit(pub Mutex<Vec<String>>);

impl Audit for MemAudit {
    fn record(&self, event: &str, patient: Option<&str>, _file: Option<&str>, detail: &str) {
        self.0
            .lock()
            .expect("audit")
            .push(format!("{event} {} {detail}", patient.unwrap_or("-")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_blocked_reader_wakes_at_the_grant() {
        let audit = Arc::new(MemAudit::default());
        let reg = ConsentRegistry::new(audit.clone());
        let r2 = reg.clone();
        let waiter = std::thread::spawn(move || r2.wait("P1", Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "read returned before consent");
        reg.grant("P1", Some(Duration::from_secs(60)), "admin");
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert!(reg.is_active("P1"));
        assert!(!reg.is_active("P2"));
    }

    /// A read that waits for consent while an end of the patient's session runs (its hooks,
    /// which drop cached pages, take their time) is refused at once, not held for its limit.
    #[test]
    fn a_read_waiting_while_the_consent_ends_is_refused_at_once() {
        let reg = ConsentRegistry::new(Arc::new(MemAudit::default()));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        reg.on_end(move |_| {
            let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
        });
        reg.grant("P1", Some(Duration::from_secs(60)), "admin");
        let r2 = reg.clone();
        let ender = std::thread::spawn(move || r2.end("P1", "card removed"));
        // The end is under way (its hook holds it): a reader comes.
        let start = Instant::now();
        while reg.is_active("P1") {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        let r3 = reg.clone();
        let waiter = std::thread::spawn(move || r3.wait("P1", Duration::from_secs(30)));
        let t = Instant::now();
        while !waiter.is_finished() && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(waiter.is_finished(), "the reader waited through the end");
        assert!(matches!(
            waiter.join().unwrap(),
            Err(ConsentError::Ended { .. })
        ));
        tx.send(()).unwrap();
        assert!(ender.join().unwrap());
        // Once the end is done, a reader waits for the next consent again.
        let r4 = reg.clone();
        let waiter = std::thread::spawn(move || r4.wait("P1", Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiter.is_finished());
        reg.grant("P1", Some(Duration::from_secs(60)), "admin");
        assert_eq!(waiter.join().unwrap(), Ok(()));
    }

    /// Work an end hook hands to a thread of its own (the page-cache drop) keeps the end
    /// under way until it is done: readers waiting meanwhile are refused.
    #[test]
    fn an_end_held_by_its_hooks_work_refuses_waiting_readers_until_done() {
        let reg = ConsentRegistry::new(Arc::new(MemAudit::default()));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let weak = Arc::downgrade(&reg);
        reg.on_end(move |patient| {
            let hold = weak.upgrade().map(|r| r.hold_end(patient));
            let rx = rx.clone();
            std::thread::spawn(move || {
                let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
                drop(hold);
            });
        });
        reg.grant("P1", Some(Duration::from_secs(60)), "admin");
        assert!(
            reg.end("P1", "card removed"),
            "the end returns, its work goes on"
        );
        let r2 = reg.clone();
        let waiter = std::thread::spawn(move || r2.wait("P1", Duration::from_secs(30)));
        let t = Instant::now();
        while !waiter.is_finished() && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(
            waiter.join().unwrap(),
            Err(ConsentError::Ended { .. })
        ));
        tx.send(()).unwrap();
        let t = Instant::now();
        while reg.ending.lock().unwrap().contains_key("P1") {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the hold was not let go"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let r3 = reg.clone();
        let waiter = std::thread::spawn(move || r3.wait("P1", Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiter.is_finished(), "a reader after the end waits again");
        reg.grant("P1", Some(Duration::from_secs(60)), "admin");
        assert_eq!(waiter.join().unwrap(), Ok(()));
    }

    #[test]
    fn close_releases_blocked_readers_at_once() {
        let reg = ConsentRegistry::new(Arc::new(MemAudit::default()));
        let r2 = reg.clone();
        let waiter = std::thread::spawn(move || r2.wait("P1", Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        reg.close();
        assert!(matches!(
            waiter.join().unwrap(),
            Err(ConsentError::ShuttingDown { .. })
        ));
        assert!(start.elapsed() < Duration::from_secs(5));
        reg.grant("P1", None, "admin");
        assert!(
            reg.wait("P1", Duration::from_secs(1)).is_err(),
            "a closed registry let a read through"
        );
    }

    /// The end of a session returns only once the replies begun under it are done: no byte
    /// goes out after a revoke (or a card removal) has returned, and none begins after it.
    /// A registry with a card session of P1, and a flag its end's wipe hook sets.
    fn granted_with_wipe_flag() -> (Arc<ConsentRegistry>, Arc<std::sync::atomic::AtomicBool>) {
        let reg = ConsentRegistry::new(Arc::new(MemAudit::default()));
        reg.grant("P1", None, "card");
        let wiped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = wiped.clone();
        reg.on_end(move |_| w.store(true, std::sync::atomic::Ordering::SeqCst));
        (reg, wiped)
    }

    #[test]
    fn an_end_waits_for_the_replies_under_way_and_none_begins_after() {
        let (reg, wiped) = granted_with_wipe_flag();
        let reply = reg.serving("P1").expect("active");
        let other = reg.serving("P1").expect("active");
        drop(other);
        let (tx, rx) = std::sync::mpsc::channel();
        let r2 = reg.clone();
        std::thread::spawn(move || tx.send(r2.end("P1", "card removed")).unwrap());
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the end returned while a reply was under way"
        );
        assert!(
            !wiped.load(std::sync::atomic::Ordering::SeqCst),
            "wiped under a reply"
        );
        assert!(reg.serving("P1").is_none(), "a reply began after the end");
        // A new session meanwhile (another card, an admin grant): its replies are not the
        // ended one's, and the end does not wait for them.
        reg.grant("P1", None, "admin");
        let next = reg.serving("P1").expect("the new session");
        drop(reply);
        assert!(
            rx.recv_timeout(Duration::from_secs(2)).unwrap(),
            "the end waited for the next session's reply"
        );
        assert!(wiped.load(std::sync::atomic::Ordering::SeqCst));
        drop(next);
    }

    #[test]
    fn a_wipe_hook_that_panics_stops_neither_the_others_nor_later_ends() {
        let (reg, wiped) = granted_with_wipe_flag();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        reg.on_end(move |_| panic!("a broken hook"));
        reg.on_end(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert!(reg.end("P1", "card removed"));
        assert!(wiped.load(Ordering::SeqCst));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the hook after it ran");
        reg.grant("P1", None, "card");
        assert!(reg.end("P1", "card removed"), "a later end works");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(!reg.end("P1", "again"), "and nothing is left waiting");
    }

    #[test]
    fn a_second_end_returns_only_once_the_first_has_wiped() {
        let (reg, wiped) = granted_with_wipe_flag();
        let reply = reg.serving("P1").expect("active");
        let (tx, rx) = std::sync::mpsc::channel();
        let r1 = reg.clone();
        let t1 = tx.clone();
        std::thread::spawn(move || t1.send(("card", r1.end("P1", "card removed"))).unwrap());
        // The card's end has taken the grant and waits for the reply.
        let deadline = Instant::now() + Duration::from_secs(10);
        while reg.is_active("P1") {
            assert!(Instant::now() < deadline, "the first end never began");
            std::thread::sleep(Duration::from_millis(5));
        }
        let r2 = reg.clone();
        std::thread::spawn(move || {
            tx.send(("admin", r2.end("P1", "revoked by admin")))
                .unwrap()
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "an end returned before the caches were wiped"
        );
        assert!(!wiped.load(std::sync::atomic::Ordering::SeqCst));
        drop(reply);
        let mut got = [
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        ];
        got.sort();
        assert_eq!(got, [("admin", false), ("card", true)], "one session ended");
        assert!(wiped.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// The reader's own check runs without the lock: a close, then a grant, that come
    /// meanwhile still refuse it.
    #[test]
    fn a_close_while_a_reader_is_checked_refuses_it_whatever_is_granted() {
        let audit = Arc::new(MemAudit::default());
        let reg = ConsentRegistry::new(audit.clone());
        let r = reg.wait_unless("P1", Duration::from_secs(10), &|| {
            reg.close();
            reg.grant("P1", None, "card");
            false
        });
        assert!(matches!(r, Err(ConsentError::ShuttingDown { .. })), "{r:?}");
        let log = audit.0.lock().unwrap();
        assert!(
            log.iter()
                .any(|e| e.starts_with("consent-refused P1") && e.contains("shutting down")),
            "{log:?}"
        );
    }

    #[test]
    fn a_reader_that_gives_up_is_released_early() {
        let audit = Arc::new(MemAudit::default());
        let reg = ConsentRegistry::new(audit.clone());
        let start = Instant::now();
        let gone = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                gone.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let r = reg.wait_unless("P1", Duration::from_secs(60), &|| {
                gone.load(std::sync::atomic::Ordering::SeqCst)
            });
            assert!(matches!(r, Err(ConsentError::Abandoned { .. })), "{r:?}");
        });
        assert!(audit
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.starts_with("consent-abandoned P1")));
        assert!(start.elapsed() < Duration::from_secs(5));
        // This thread has no fatal signal pending; a dead tid counts as gone.
        assert!(!fatal_signal_pending(nix::unistd::gettid().as_raw() as u32));
        assert!(fatal_signal_pending(u32::MAX - 1));
        // pid 0: a caller in another pid namespace, who may well wait.
        assert!(!fatal_signal_pending(0));
    }

    #[test]
    fn the_wait_limit_refuses_and_audits() {
        let audit = Arc::new(MemAudit::default());
        let reg = ConsentRegistry::new(audit.clone());
        let err = reg.wait("P9", Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("P9"));
        assert!(audit
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.starts_with("consent-refused P9")));
    }

    /// Two sessions expiring together, each one's wipe held up (a slow reply, a page drop
    /// waiting on a page lock): both wipes begin, neither waits for the other's.
    #[test]
    fn sessions_expiring_together_end_apart() {
        let reg = ConsentRegistry::new(Arc::new(MemAudit::default()));
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (wiped_tx, wiped) = std::sync::mpsc::channel::<String>();
        let wiped_tx = Mutex::new(wiped_tx);
        let r = released.clone();
        reg.on_end(move |patient| {
            wiped_tx.lock().unwrap().send(patient.to_string()).unwrap();
            let t = Instant::now();
            while !r.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        reg.grant("P1", Some(Duration::from_millis(100)), "admin");
        reg.grant("P2", Some(Duration::from_millis(100)), "admin");
        let mut ended: Vec<String> = (0..2)
            .map(|_| {
                wiped
                    .recv_timeout(Duration::from_secs(5))
                    .expect("both sessions' wipes begun, each while the other's is held")
            })
            .collect();
        released.store(true, Ordering::SeqCst);
        ended.sort();
        assert_eq!(ended, ["P1", "P2"]);
    }

    /// A close waits for an expiry's end still under way on its own thread: the mount goes
    /// only once that end's page drop and wipes are done.
    #[test]
    fn close_waits_for_an_expirys_end_under_way() {
        let reg = ConsentRegistry::new(Arc::new(MemAudit::default()));
        let (began, started) = std::sync::mpsc::channel::<()>();
        let began = Mutex::new(began);
        let wiped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = wiped.clone();
        reg.on_end(move |_| {
            began.lock().unwrap().send(()).unwrap();
            std::thread::sleep(Duration::from_millis(700));
            w.store(true, Ordering::SeqCst);
        });
        reg.grant("P1", Some(Duration::from_millis(50)), "admin");
        started
            .recv_timeout(Duration::from_secs(5))
            .expect("the expiry's end began");
        reg.close();
        assert!(
            wiped.load(Ordering::SeqCst),
            "close returned before the end under way had wiped"
        );
    }

    #[test]
    fn expiry_and_revoke_end_sessions_and_run_hooks() {
        let audit = Arc::new(MemAudit::default());
        let reg = ConsentRegistry::new(audit.clone());
        let wiped = Arc::new(AtomicUsize::new(0));
        let w = wiped.clone();
        reg.on_end(move |_| {
            w.fetch_add(1, Ordering::SeqCst);
        });
        reg.grant("P1", Some(Duration::from_millis(50)), "admin");
        reg.grant("P2", None, "card 00ff");
        assert_eq!(reg.list().len(), 2);
        std::thread::sleep(Duration::from_millis(700));
        assert!(!reg.is_active("P1"), "expired session still active");
        assert_eq!(wiped.load(Ordering::SeqCst), 1, "expiry ran no wipe hook");
        assert!(reg.end("P2", "card removed"));
        assert!(!reg.end("P2", "again"));
        assert_eq!(wiped.load(Ordering::SeqCst), 2);
        let log = audit.0.lock().unwrap().join("\n");
        assert!(
            log.contains("consent-expired P1") && log.contains("consent-end P2 card removed"),
            "{log}"
        );
    }
}
