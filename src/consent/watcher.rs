//! The card watcher: follows PC/SC readers and cards, authenticates every card presented against
//! its enrolled binding, and opens (and on removal ends) the patient's consent session.
//!
//! - [`present`]: one presentation over any [`CardTransport`] (no PC/SC, so it runs against the
//!   in-memory virtual card too): SELECT PIV, GUID, binding, sealed digest, PIN if the policy
//!   wants it, then GENERAL AUTHENTICATE on a fresh 32-byte challenge as the *last* APDU,
//!   verified against the enrolled key.
//! - [`start`]: the watcher thread over pcscd (get_status_change on every reader plus the
//!   `\\?PnP?\Notification` pseudo-reader), surviving pcscd restarts.
//! - [`CardConsent`]: what the watcher and the control handler share (catalog, registry, PIN
//!   pad, and a lock so their APDUs never interleave on one card).
//!
//! Every presentation, acceptance, refusal (with its reason) and removal is audited.
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::apdu::Slot;
use super::card::{Backoff, PcscClient};
use super::piv::{self, CardError, CardTransport, PivCard, PivError};
use super::session::{Audit, ConsentRegistry};
use crate::catalog::cards::{hex, CardBindingError, CardPolicy, Guid};
use crate::catalog::Catalog;

/// How long a PIN entered with `qgenome card pin` waits for its card.
pub const PIN_VALID: Duration = Duration::from_secs(120);

/// PINs entered over the control socket, one per patient, each used at most once and only
/// within [`PIN_VALID`]. Debug shows patients only; PIN bytes are zeroized when taken or dropped.
/// A PIN and the instant it stops being valid.
type HeldPin = (Zeroizing<Vec<u8>>, Instant);

#[derive(Default)]
pub struct PinPad {
    pins: Mutex<HashMap<String, HeldPin>>,
}

impl std::fmt::Debug for PinPad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pins = self.pins.lock().expect("pins");
        let mut patients: Vec<&String> = pins.keys().collect();
        patients.sort();
        write!(
            f,
            "PinPad(waiting for cards of {patients:?}, PINs redacted)"
        )
    }
}

impl PinPad {
    /// Holds `pin` for the next presentation of `patient`'s card (replacing an earlier one).
    pub fn offer(&self, patient: &str, pin: Zeroizing<Vec<u8>>) {
        self.pins
            .lock()
            .expect("pins")
            .insert(patient.to_string(), (pin, Instant::now() + PIN_VALID));
    }

    /// Takes the PIN waiting for `patient`, if one is there and still valid.
    pub fn take(&self, patient: &str) -> Option<Zeroizing<Vec<u8>>> {
        let (pin, until) = self.pins.lock().expect("pins").remove(patient)?;
        (Instant::now() < until).then_some(pin)
    }
}

/// Shared by the watcher and the control handler.
pub struct CardConsent {
    pub catalog: Arc<Catalog>,
    pub registry: Arc<ConsentRegistry>,
    pub audit: Arc<dyn Audit>,
    pub pins: PinPad,
    desk: Mutex<()>,
    /// Held by a card's grant (with the last check that its card is not revoked) and by a
    /// revocation (with its check for the card's sessions): one comes wholly before the other.
    /// Never held during card I/O, so a card that stalls cannot hold up a revocation.
    granting: Mutex<()>,
}

impl std::fmt::Debug for CardConsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardConsent")
            .field("catalog", &self.catalog.path())
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl CardConsent {
    /// Audits into the catalog.
    pub fn new(catalog: Arc<Catalog>, registry: Arc<ConsentRegistry>) -> Arc<CardConsent> {
        Arc::new(CardConsent {
            audit: catalog.clone(),
            catalog,
            registry,
            pins: PinPad::default(),
            desk: Mutex::new(()),
            granting: Mutex::new(()),
        })
    }

    /// See `granting`: taken by a card's grant and by a revocation.
    pub fn granting(&self) -> MutexGuard<'_, ()> {
        self.granting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Exclusive use of the cards: presentation, enrollment and sealing take turns.
    pub fn desk(&self) -> MutexGuard<'_, ()> {
        self.desk.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A card accepted: whose consent it carries, and when its signature arrived.
#[derive(Clone, Debug)]
pub struct Presented {
    pub guid: Guid,
    pub patient: String,
    /// When the GENERAL AUTHENTICATE answer was received (start of the consent latency).
    pub answered_at: Instant,
}

/// Why a presented card was refused. Every variant names the reader or the card.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("card in reader {reader:?} unusable: {source}")]
    Card {
        reader: String,
        source: Box<PivError>,
    },
    #[error("card {guid} is not enrolled")]
    Unknown { guid: String },
    #[error("the card inserted in reader {reader:?} left it before its presentation began")]
    Gone { reader: String },
    #[error("card {guid} of patient {patient} left reader {reader:?} during its presentation")]
    Left {
        reader: String,
        guid: String,
        patient: String,
    },
    #[error("card {guid} of patient {patient} is revoked")]
    Revoked { guid: String, patient: String },
    #[error("card {guid} of patient {patient}: enrolled public key is unusable")]
    BadEnrolledKey { guid: String, patient: String },
    #[error("card {guid} of patient {patient}: no PIN entered for its PIN policy (enter it first with `qgenome card pin --patient {patient}`)")]
    NoPin { guid: String, patient: String },
    #[error("card {guid} of patient {patient}: PIN refused: {source}")]
    Pin {
        guid: String,
        patient: String,
        source: Box<PivError>,
    },
    #[error("card {guid} of patient {patient}: signature over the fresh challenge does not verify against the enrolled key (clone, wrong key, corrupted or replayed answer)")]
    Signature { guid: String, patient: String },
    #[error("card {guid} of patient {patient}: the catalog says it was sealed but the card holds no digest")]
    DigestMissing { guid: String, patient: String },
    #[error("card {guid} of patient {patient}: the card holds a digest ({card}) but the catalog's binding has none (catalog replaced or binding altered? if the card was enrolled again on purpose, seal it again with `qgenome card seal`)")]
    DigestUnsealed {
        guid: String,
        patient: String,
        card: String,
    },
    #[error("card {guid} of patient {patient}: digest on the card {card} differs from the one sealed in the catalog {sealed} (card or catalog swapped)")]
    DigestCardVsCatalog {
        guid: String,
        patient: String,
        card: String,
        sealed: String,
    },
    #[error("card {guid} of patient {patient}: sealed digest {sealed} differs from the current manifest {current} (catalog altered, or files changed since `card seal`)")]
    DigestManifest {
        guid: String,
        patient: String,
        sealed: String,
        current: String,
    },
    #[error("card {guid}: catalog: {source}")]
    Catalog {
        guid: String,
        source: Box<CardBindingError>,
    },
}

impl Refusal {
    /// Short reason code for the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Card { .. } => "card-error",
            Refusal::Unknown { .. } => "unknown-card",
            Refusal::Left { .. } | Refusal::Gone { .. } => "left-during-presentation",
            Refusal::Revoked { .. } => "revoked",
            Refusal::BadEnrolledKey { .. } => "bad-enrolled-key",
            Refusal::NoPin { .. } => "no-pin",
            Refusal::Pin { .. } => "pin-refused",
            Refusal::Signature { .. } => "bad-signature",
            Refusal::DigestMissing { .. } => "digest-missing",
            Refusal::DigestUnsealed { .. } => "digest-mismatch",
            Refusal::DigestCardVsCatalog { .. } => "digest-mismatch",
            Refusal::DigestManifest { .. } => "manifest-mismatch",
            Refusal::Catalog { .. } => "catalog-error",
        }
    }

    /// The patient the card claimed to belong to, once the binding was found.
    pub fn patient(&self) -> Option<&str> {
        match self {
            Refusal::Revoked { patient, .. }
            | Refusal::Left { patient, .. }
            | Refusal::BadEnrolledKey { patient, .. }
            | Refusal::NoPin { patient, .. }
            | Refusal::Pin { patient, .. }
            | Refusal::Signature { patient, .. }
            | Refusal::DigestMissing { patient, .. }
            | Refusal::DigestUnsealed { patient, .. }
            | Refusal::DigestCardVsCatalog { patient, .. }
            | Refusal::DigestManifest { patient, .. } => Some(patient),
            _ => None,
        }
    }
}

/// One presentation of the card behind `transport`. I/O other than the card: catalog reads and
/// the OS random source. GENERAL AUTHENTICATE is the last APDU, so the time from the card's
/// answer to the grant holds no card round trip.
pub fn present<T: CardTransport>(
    transport: T,
    catalog: &Catalog,
    pins: &PinPad,
) -> Result<Presented, Refusal> {
    let reader = transport.reader().to_owned();
    let card_err = |source| Refusal::Card {
        reader: reader.clone(),
        source: Box::new(source),
    };
    let mut card = PivCard::open(transport).map_err(card_err)?;
    let guid = card.guid().map_err(card_err)?;
    let g = hex(&guid);
    let binding = catalog
        .card(&guid)
        .map_err(|source| Refusal::Catalog {
            guid: g.clone(),
            source: Box::new(source),
        })?
        .ok_or_else(|| Refusal::Unknown { guid: g.clone() })?;
    let patient = binding.patient.clone();
    if binding.revoked {
        return Err(Refusal::Revoked { guid: g, patient });
    }
    let Some(key) = binding.key() else {
        return Err(Refusal::BadEnrolledKey { guid: g, patient });
    };
    // Digest I/O before the challenge; compared after the signature checks out. The card's
    // is read whatever the binding says: the binding is in the catalog the digest checks, and
    // a catalog built to pass would say "not sealed".
    let on_card = card.read_digest().map_err(card_err)?;
    let current = match binding.sealed_digest {
        Some(_) => Some(
            catalog
                .manifest_digest(&patient)
                .map_err(|source| Refusal::Catalog {
                    guid: g.clone(),
                    source: Box::new(source),
                })?,
        ),
        None => None,
    };
    let slot = match binding.policy {
        CardPolicy::CardAuth9E => Slot::CardAuthentication9E,
        CardPolicy::Pin9A => {
            let Some(pin) = pins.take(&patient) else {
                return Err(Refusal::NoPin { guid: g, patient });
            };
            card.verify_pin(&pin).map_err(|source| Refusal::Pin {
                guid: g.clone(),
                patient: patient.clone(),
                source: Box::new(source),
            })?;
            Slot::Authentication9A
        }
    };
    let mut challenge = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(&mut challenge[..]).map_err(|e| {
        card_err(PivError::Random {
            detail: e.to_string(),
        })
    })?;
    let signature = card.sign(slot, &challenge).map_err(card_err)?;
    let answered_at = Instant::now();
    if !piv::verify_challenge(&key, &challenge, &signature) {
        return Err(Refusal::Signature { guid: g, patient });
    }
    if let (None, Some(on_card)) = (binding.sealed_digest, on_card) {
        return Err(Refusal::DigestUnsealed {
            guid: g,
            patient,
            card: hex(&on_card),
        });
    }
    if let (Some(sealed), Some(current)) = (binding.sealed_digest, current) {
        let Some(on_card) = on_card else {
            return Err(Refusal::DigestMissing { guid: g, patient });
        };
        if !piv::ct_eq(&on_card, &sealed) {
            return Err(Refusal::DigestCardVsCatalog {
                guid: g,
                patient,
                card: hex(&on_card),
                sealed: hex(&sealed),
            });
        }
        if !piv::ct_eq(&sealed, &current) {
            return Err(Refusal::DigestManifest {
                guid: g,
                patient,
                sealed: hex(&sealed),
                current: hex(&current),
            });
        }
    }
    Ok(Presented {
        guid,
        patient,
        answered_at,
    })
}

/// Presents the card in `reader` (connecting over a PC/SC context of its own), taking turns
/// at the desk with enrollment and sealing.
fn present_in(
    cards: &CardConsent,
    backoff: Backoff,
    reader: String,
    insertion: u64,
    current: &Current,
) -> Presentation {
    let _desk = cards.desk();
    // Waiting for the desk (a slow card elsewhere, an enrollment), its card may have left and
    // another come: that one has a presentation of its own, and talking to it here would take
    // its patient's PIN and leave that presentation without one.
    let here = current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&reader)
        == Some(&insertion);
    if !here {
        return Presentation {
            outcome: Err(Refusal::Gone {
                reader: reader.clone(),
            }),
            reader,
            insertion,
            connection: None,
        };
    }
    // The connection outlives the grant: disconnecting is a pcscd round trip that must not
    // sit between the card's answer and the waking reader.
    let mut connection = None;
    let outcome = match PcscClient::new(backoff).connect(&reader) {
        Ok(transport) => present(connection.insert(transport), &cards.catalog, &cards.pins),
        Err(source) => Err(Refusal::Card {
            reader: reader.clone(),
            source: Box::new(PivError::Transport {
                reader: reader.clone(),
                step: "connect",
                source,
            }),
        }),
    };
    Presentation {
        reader,
        insertion,
        outcome,
        connection,
    }
}

/// How long a card's consent lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsentMode {
    /// A session of this length from the presentation; removal does not end it.
    Expiry(Duration),
    /// Until the card leaves the reader (or the watcher loses sight of the reader).
    UntilRemoved,
}

/// What the watcher saw; for monitoring, tests and the latency benchmark.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum WatchEvent {
    Granted {
        reader: String,
        presented: Presented,
    },
    Refused {
        reader: String,
        code: &'static str,
        reason: String,
    },
    Removed {
        reader: String,
        /// The patient whose until-removed session this removal ended.
        ended: Option<String>,
    },
    /// The PC/SC service went away; every until-removed session was ended.
    ServiceLost { error: String },
    /// `[card] reader` matches none of the readers present (said once, until that changes):
    /// no card will be seen, and reads wait for consent in vain.
    NoReaderMatches {
        filter: String,
        present: Vec<String>,
    },
}

pub type EventHook = Arc<dyn Fn(&WatchEvent) + Send + Sync>;

#[derive(Clone)]
pub struct WatcherConfig {
    pub mode: ConsentMode,
    /// Watch only readers whose name contains this.
    pub reader: Option<String>,
    /// Longest single get_status_change wait (also how fast a drop stops the thread).
    pub poll: Duration,
    /// Context re-establishment per attempt; the watcher itself retries forever.
    pub backoff: Backoff,
    pub on_event: Option<EventHook>,
}

impl std::fmt::Debug for WatcherConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatcherConfig")
            .field("mode", &self.mode)
            .field("reader", &self.reader)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl Default for WatcherConfig {
    fn default() -> Self {
        WatcherConfig {
            mode: ConsentMode::UntilRemoved,
            reader: None,
            poll: Duration::from_millis(250),
            backoff: Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(400),
                attempts: 4,
            },
            on_event: None,
        }
    }
}

/// The running watcher; dropping it stops the thread (within one `poll`, or one backoff round
/// while pcscd is away) and ends the until-removed sessions it granted.
pub struct WatcherHandle {
    stop: Arc<AtomicBool>,
    contexts: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WatcherHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WatcherHandle(contexts {})", self.contexts())
    }
}

impl WatcherHandle {
    /// PC/SC contexts established so far (each pcscd restart recovered from adds one).
    pub fn contexts(&self) -> u32 {
        self.contexts.load(Ordering::SeqCst)
    }
}

impl Drop for WatcherHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the watcher thread.
pub fn start(cards: Arc<CardConsent>, cfg: WatcherConfig) -> std::io::Result<WatcherHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let contexts = Arc::new(AtomicU32::new(0));
    let mut w = Watcher {
        client: PcscClient::new(cfg.backoff),
        cards,
        cfg,
        states: vec![pnp_state()],
        tracks: Vec::new(),
        use_pnp: true,
        unmatched_said: false,
        stop: stop.clone(),
        contexts: contexts.clone(),
        insertions: 0,
        outcomes: mpsc::channel(),
        current: Current::default(),
    };
    let thread = std::thread::Builder::new()
        .name("card-watcher".into())
        .spawn(move || {
            let cards = w.cards.clone();
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
            if ran.is_err() {
                // Nobody watches the cards any more: their removal would end nothing.
                let ended = fail_closed(&cards.registry);
                cards.audit.record(
                    "card-watcher-stopped",
                    None,
                    None,
                    &format!("a panic; card sessions ended: {ended:?}; no card is watched until the mount restarts"),
                );
            }
        })?;
    Ok(WatcherHandle {
        stop,
        contexts,
        thread: Some(thread),
    })
}

/// The watcher stopped (a panic): end every session a card opened, since no removal will be
/// seen from now on. Admin grants (their own expiry) are left. Returns the patients ended.
fn fail_closed(registry: &ConsentRegistry) -> Vec<String> {
    let mut ended = Vec::new();
    for g in registry.list() {
        if g.source.starts_with("card ")
            && registry.end(
                &g.patient,
                "the card watcher stopped (a panic); cards are no longer watched",
            )
        {
            ended.push(g.patient);
        }
    }
    tracing::error!(
        "the card watcher stopped on a panic: ended the card sessions of {ended:?}; no card is watched until the mount restarts"
    );
    ended
}

fn pnp_state() -> pcsc::ReaderState {
    pcsc::ReaderState::new(pcsc::PNP_NOTIFICATION(), pcsc::State::UNAWARE)
}

/// What the watcher remembers about one reader (its `ReaderState` sits in `Watcher::states`).
struct Track {
    name: String,
    present: bool,
    count: u32,
    /// (GUID, patient) of the until-removed session granted from this reader.
    granted: Option<(Guid, String)>,
}

/// A presentation's outcome, sent from its thread back to the watcher, which alone grants.
struct Presentation {
    reader: String,
    insertion: u64,
    outcome: Result<Presented, Refusal>,
    /// Dropped (the card reset) by the watcher after the grant, before the event.
    connection: Option<super::card::PcscCard>,
}

struct Watcher {
    client: PcscClient,
    cards: Arc<CardConsent>,
    cfg: WatcherConfig,
    /// `states[0]` is the PnP pseudo-reader; `states[i + 1]` belongs to `tracks[i]`.
    states: Vec<pcsc::ReaderState>,
    tracks: Vec<Track>,
    /// False once pcscd refused the PnP pseudo-reader (then the list is polled each round).
    use_pnp: bool,
    /// The filter matched no reader present at the last look, and that was said.
    unmatched_said: bool,
    stop: Arc<AtomicBool>,
    contexts: Arc<AtomicU32>,
    /// The last insertion number handed out.
    insertions: u64,
    /// Outcomes of presentations running on their own threads.
    outcomes: (mpsc::Sender<Presentation>, mpsc::Receiver<Presentation>),
    /// The insertion each reader holds now (numbers unique across readers and reader lists):
    /// presentation threads check it before they talk to the card (once they have the desk,
    /// it may be another), and an outcome counts only while its insertion is still there.
    current: Current,
}

/// Reader name to the insertion it holds (absent: empty, or not watched).
type Current = Arc<Mutex<HashMap<String, u64>>>;

fn set_current(current: &Current, reader: &str, insertion: Option<u64>) {
    let mut c = current.lock().unwrap_or_else(|p| p.into_inner());
    match insertion {
        Some(i) => c.insert(reader.to_owned(), i),
        None => c.remove(reader),
    };
}

impl Watcher {
    fn emit(&self, ev: WatchEvent) {
        if let Some(h) = &self.cfg.on_event {
            h(&ev);
        }
    }

    fn run(&mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.step() {
                self.lose_all(&e.to_string());
                std::thread::sleep(self.cfg.poll);
            }
            self.contexts
                .store(self.client.contexts_established(), Ordering::SeqCst);
        }
        for t in std::mem::take(&mut self.tracks) {
            if let Some((guid, patient)) = t.granted {
                self.end_session(&patient, &guid, "card watcher stopped");
            }
        }
    }

    /// Ends `patient`'s session if this card still holds it (a revoke may have ended it, or
    /// another card or an admin granted a newer one); whether it did.
    fn end_session(&self, patient: &str, guid: &Guid, why: &str) -> bool {
        let source = format!("card {}", hex(guid));
        let ours = self
            .cards
            .registry
            .list()
            .iter()
            .any(|g| g.patient == patient && g.source == source);
        ours && self
            .cards
            .registry
            .end(patient, &format!("{source}: {why}"))
    }

    /// pcscd is gone: nothing can see the cards any more, so no until-removed session stays.
    fn lose_all(&mut self, error: &str) {
        self.states = vec![pnp_state()];
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let tracks = std::mem::take(&mut self.tracks);
        if tracks.is_empty() {
            return;
        }
        for t in tracks {
            if let Some((guid, patient)) = t.granted {
                self.end_session(&patient, &guid, "PC/SC service lost");
            }
        }
        self.cards
            .audit
            .record("card-watcher", None, None, &format!("PC/SC lost: {error}"));
        self.emit(WatchEvent::ServiceLost {
            error: error.to_string(),
        });
    }

    /// Brings the reader list up to date; a reader that vanished with a card in it counts as
    /// a removal.
    fn sync_readers(&mut self) -> Result<(), CardError> {
        let present = self.client.readers()?;
        let mut names = present.clone();
        if let Some(f) = &self.cfg.reader {
            names.retain(|n| n.contains(f.as_str()));
            let unmatched = names.is_empty() && !present.is_empty();
            if unmatched && !self.unmatched_said {
                tracing::warn!(
                    "card.reader {f:?} matches none of the readers present ({}): no card will be seen until one does",
                    present.join(", ")
                );
                self.emit(WatchEvent::NoReaderMatches {
                    filter: f.clone(),
                    present: present.clone(),
                });
            }
            self.unmatched_said = unmatched;
        }
        if names.len() == self.tracks.len()
            && names.iter().zip(&self.tracks).all(|(n, t)| *n == t.name)
        {
            return Ok(());
        }
        let mut old: HashMap<String, (pcsc::ReaderState, Track)> = HashMap::new();
        let mut states = std::mem::take(&mut self.states).into_iter();
        let pnp = states.next().unwrap_or_else(pnp_state);
        for (s, t) in states.zip(std::mem::take(&mut self.tracks)) {
            old.insert(t.name.clone(), (s, t));
        }
        self.states = vec![pnp];
        for n in names {
            let (s, t) = match old.remove(&n) {
                Some(pair) => pair,
                None => {
                    let Ok(c) = CString::new(n.as_str()) else {
                        continue;
                    };
                    (
                        pcsc::ReaderState::new(c, pcsc::State::UNAWARE),
                        Track {
                            name: n,
                            present: false,
                            count: 0,
                            granted: None,
                        },
                    )
                }
            };
            self.states.push(s);
            self.tracks.push(t);
        }
        for (_, (_, t)) in old {
            set_current(&self.current, &t.name, None);
            if t.present {
                self.removed(t);
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), CardError> {
        let (context, had_cards) = (
            self.client.contexts_established(),
            self.tracks.iter().any(|t| t.present),
        );
        self.sync_readers()?;
        while let Ok(p) = self.outcomes.1.try_recv() {
            self.finish(p);
        }
        let poll = self.cfg.poll;
        let from = usize::from(!self.use_pnp);
        if self.states.len() == from {
            // No reader and no PnP notification: poll the list.
            std::thread::sleep(poll);
            return Ok(());
        }
        let states = &mut self.states[from..];
        let result = self
            .client
            .with_context(|ctx| ctx.get_status_change(poll, states))?;
        if had_cards && self.client.contexts_established() != context {
            // pcscd came back within the client's retries (a quick restart, or socket
            // activation): what it reports of the cards starts afresh (a card swapped
            // meanwhile may show no change at all), so every card is authenticated again.
            self.lose_all("PC/SC service restarted");
            return Ok(());
        }
        match result {
            Ok(()) => {}
            // A presentation finished (its thread cancelled the wait): the next round takes
            // its outcome.
            Err(pcsc::Error::Timeout) | Err(pcsc::Error::Cancelled) => return Ok(()),
            Err(pcsc::Error::UnknownReader) | Err(pcsc::Error::ReaderUnavailable) => {
                // A reader vanished between listing and waiting (the next round relists), or
                // an old pcscd without the PnP pseudo-reader.
                if self.use_pnp && self.tracks.is_empty() {
                    self.use_pnp = false;
                }
                std::thread::sleep(Duration::from_millis(50));
                return Ok(());
            }
            Err(e) => {
                return Err(CardError::Pcsc {
                    reader: self.cfg.reader.clone().unwrap_or_default(),
                    op: "get status change",
                    source: e,
                })
            }
        }
        self.states[0].sync_current_state();
        for i in 0..self.tracks.len() {
            let st = &mut self.states[i + 1];
            let ev = st.event_state();
            let count = st.event_count();
            st.sync_current_state();
            let now_present = ev.contains(pcsc::State::PRESENT)
                && !ev.intersects(
                    pcsc::State::MUTE | pcsc::State::UNKNOWN | pcsc::State::UNAVAILABLE,
                );
            let t = &mut self.tracks[i];
            let swapped = t.present && now_present && count != t.count;
            let was_present = t.present;
            t.count = count;
            t.present = now_present;
            if was_present && (!now_present || swapped) {
                let gone = Track {
                    name: t.name.clone(),
                    present: true,
                    count,
                    granted: t.granted.take(),
                };
                set_current(&self.current, &t.name, None);
                self.removed(gone);
            }
            if now_present && (!was_present || swapped) {
                self.inserted(i);
            }
        }
        Ok(())
    }

    fn removed(&mut self, t: Track) {
        let mut ended = None;
        let (patient, detail) = match &t.granted {
            Some((guid, patient)) => (
                Some(patient.as_str()),
                format!("card {}, reader {:?}", hex(guid), t.name),
            ),
            None => (None, format!("reader {:?}", t.name)),
        };
        self.cards
            .audit
            .record("card-removed", patient, None, &detail);
        if let Some((guid, patient)) = &t.granted {
            if self.end_session(patient, guid, &format!("removed from reader {:?}", t.name)) {
                ended = Some(patient.clone());
            }
        }
        self.emit(WatchEvent::Removed {
            reader: t.name,
            ended,
        });
    }

    /// A card went into reader `i`: it is presented on a thread of its own, so a card that
    /// answers slowly (or a reader that stalls) never holds up what this thread watches, above
    /// all the removal of another patient's card. The outcome comes back to [`Watcher::finish`].
    fn inserted(&mut self, i: usize) {
        self.insertions += 1;
        let insertion = self.insertions;
        let reader = self.tracks[i].name.clone();
        set_current(&self.current, &reader, Some(insertion));
        self.cards
            .audit
            .record("card-presented", None, None, &format!("reader {reader:?}"));
        let cards = self.cards.clone();
        let backoff = self.cfg.backoff;
        let outcomes = self.outcomes.0.clone();
        // Wakes this thread from its wait for reader events (a stale context after a pcscd
        // restart wakes nothing: the outcome then waits one `poll`).
        let waker = self.client.context();
        let stop = self.stop.clone();
        let current = self.current.clone();
        let spawned = std::thread::Builder::new()
            .name("card-present".into())
            .spawn(move || {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let p = present_in(&cards, backoff, reader, insertion, &current);
                if outcomes.send(p).is_ok() {
                    if let Some(ctx) = waker {
                        let _ = ctx.cancel();
                    }
                }
            });
        if let Err(e) = spawned {
            // No thread to be had: presented here, as the one way left.
            tracing::warn!("no thread for a card presentation ({e}): presented on the watcher's");
            let reader = self.tracks[i].name.clone();
            let p = present_in(&self.cards, backoff, reader, insertion, &self.current);
            self.finish(p);
        }
    }

    /// A presentation's outcome: granted only if its card is still in its reader (the same
    /// insertion), and not revoked meanwhile.
    fn finish(&mut self, p: Presentation) {
        let Presentation {
            reader,
            insertion,
            outcome,
            connection,
        } = p;
        let cards = self.cards.clone();
        // Still the reader's card: `current` is kept by the insertions and removals this
        // thread sees (the one record of which insertion each reader holds).
        let still = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&reader)
            == Some(&insertion);
        let here = still
            .then(|| self.tracks.iter().position(|t| t.name == reader))
            .flatten();
        let outcome = outcome.and_then(|p| match here {
            Some(_) => Ok(p),
            None => Err(Refusal::Left {
                reader: reader.clone(),
                guid: hex(&p.guid),
                patient: p.patient,
            }),
        });
        // A card revoked while it was presented (the revoke read no session yet): refused.
        let granting = cards.granting();
        let outcome = outcome.and_then(|p| match cards.catalog.card(&p.guid) {
            Ok(Some(b)) if !b.revoked => Ok(p),
            Ok(_) => Err(Refusal::Revoked {
                guid: hex(&p.guid),
                patient: p.patient.clone(),
            }),
            Err(source) => Err(Refusal::Catalog {
                guid: hex(&p.guid),
                source: Box::new(source),
            }),
        });
        let event = match outcome {
            Ok(p) => {
                let source = format!("card {}", hex(&p.guid));
                let ttl = match self.cfg.mode {
                    ConsentMode::Expiry(d) => Some(d),
                    ConsentMode::UntilRemoved => None,
                };
                cards.audit.record(
                    "card-accepted",
                    Some(&p.patient),
                    None,
                    &format!("{source}, reader {reader:?}"),
                );
                cards.registry.grant(&p.patient, ttl, &source);
                if let (None, Some(i)) = (ttl, here) {
                    self.tracks[i].granted = Some((p.guid, p.patient.clone()));
                }
                WatchEvent::Granted {
                    reader,
                    presented: p,
                }
            }
            Err(r) => {
                cards.audit.record(
                    "card-refused",
                    r.patient(),
                    None,
                    &format!("{}: {r}", r.code()),
                );
                tracing::warn!(reader = %reader, code = r.code(), "card refused: {r}");
                WatchEvent::Refused {
                    reader,
                    code: r.code(),
                    reason: r.to_string(),
                }
            }
        };
        drop(granting);
        // Disconnect (pcsc resets the card) before telling anyone, so an observer that pulls
        // the card on the event does not race the reset; the grant itself is already out.
        drop(connection);
        self.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::session::Consent;

    #[test]
    fn a_watcher_that_stops_ends_the_sessions_cards_opened() {
        let reg = ConsentRegistry::new(Arc::new(crate::consent::session::MemAudit::default()));
        reg.grant("P1", None, "card 00112233");
        reg.grant("P2", Some(Duration::from_secs(600)), "card 44556677");
        reg.grant("P3", Some(Duration::from_secs(600)), "admin (uid 0, pid 1)");
        let mut ended = fail_closed(&reg);
        ended.sort();
        assert_eq!(ended, ["P1", "P2"]);
        assert!(!reg.is_active("P1") && !reg.is_active("P2"));
        assert!(reg.is_active("P3"), "an admin grant keeps its own expiry");
    }
}
