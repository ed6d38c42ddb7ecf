//! The card watcher on the real PC/SC stack (pcscd + vpcd + `qgenome-vcard`): enrolled cards
//! open consent and their removal ends it; unenrolled, cloned, corrupted, replayed, revoked and
//! mis-sealed cards are refused and audited; PIN policy; pcscd restarted mid-session. Enroll,
//! seal and revoke go through the control handler. One test function (one pcscd per host)
//! holding the cross-process card test lock.

use anyhow::{bail, ensure, Context, Result};
use qgenome::catalog::cards::parse_guid;
use qgenome::catalog::Catalog;
use qgenome::consent::watcher::{self, CardConsent, ConsentMode, WatchEvent, WatcherConfig};
use qgenome::consent::{card_handler, Consent, ConsentRegistry, PcscReaders};
use qgenome::control::Handler;
use qgenome_tools::harness::{CardTestLock, Pcscd, Vcard};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const READER: &str = "Virtual PCD 00 00";
const PORT: u16 = 35963;
/// vpcd's second slot.
const SECOND_READER: &str = "Virtual PCD 00 01";
const SECOND_PORT: u16 = 35964;
const WAIT: Duration = Duration::from_secs(20);

struct Rig {
    dir: PathBuf,
    pcscd: Option<Pcscd>,
    events: Receiver<WatchEvent>,
    catalog: Arc<Catalog>,
    registry: Arc<ConsentRegistry>,
    handler: Arc<Handler>,
    runs: usize,
}

/// Whether pcscd reports a card in `reader` within `within`, asked over a context of our own.
fn pcscd_sees_card(reader: &str, within: Duration) -> Result<bool> {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).context("PC/SC context")?;
    let name = std::ffi::CString::new(reader)?;
    let mut states = [pcsc::ReaderState::new(name, pcsc::State::UNAWARE)];
    let deadline = Instant::now() + within;
    loop {
        match ctx.get_status_change(Duration::from_millis(250), &mut states) {
            Ok(()) | Err(pcsc::Error::Timeout) => {}
            Err(e) => bail!("status of {reader:?}: {e}"),
        }
        if states[0].event_state().contains(pcsc::State::PRESENT) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        states[0].sync_current_state();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn describe(ev: &WatchEvent) -> String {
    match ev {
        WatchEvent::Granted { presented, .. } => format!("granted {}", presented.patient),
        WatchEvent::Refused { code, reason, .. } => format!("refused {code}: {reason}"),
        WatchEvent::Removed { ended, .. } => format!("removed (ended {ended:?})"),
        WatchEvent::ServiceLost { error } => format!("service lost: {error}"),
        other => format!("{other:?}"),
    }
}

impl Rig {
    /// A virtual card into [`READER`], once pcscd reports it there (asked over a PC/SC context
    /// of the test's own): the card's TCP connect to vpcd succeeds as soon as it is in the
    /// listen backlog, before pcscd knows of it. One pcscd does not report within 5 s is put
    /// in again, and said so. What the watcher makes of a card pcscd reports is the test's to
    /// check, not this one's.
    fn insert(&mut self, args: &[&str]) -> Result<Vcard> {
        let bin = Path::new(env!("CARGO_BIN_EXE_qgenome-vcard"));
        let port = PORT.to_string();
        let mut all = vec!["--port", port.as_str()];
        all.extend_from_slice(args);
        for attempt in 1..=3 {
            self.runs += 1;
            let log = self.dir.join(format!("vcard-{}.log", self.runs));
            let vc = Vcard::start(bin, &all, &log)?;
            if pcscd_sees_card(READER, Duration::from_secs(5))? {
                return Ok(vc);
            }
            eprintln!(
                "pcscd did not see the card of {} in {READER:?} within 5 s (attempt {attempt}); putting it in again",
                log.display()
            );
        }
        bail!("pcscd never saw a card in {READER:?}")
    }

    fn next(&self, what: &str) -> Result<WatchEvent> {
        match self.events.recv_timeout(WAIT) {
            Ok(ev) => {
                eprintln!("event: {}", describe(&ev));
                Ok(ev)
            }
            Err(RecvTimeoutError::Timeout) => bail!("no watcher event within {WAIT:?} ({what})"),
            Err(RecvTimeoutError::Disconnected) => bail!("watcher gone ({what})"),
        }
    }

    fn expect_granted(&self, patient: &str) -> Result<()> {
        match self.next("grant")? {
            WatchEvent::Granted { presented, .. } if presented.patient == patient => Ok(()),
            other => bail!("expected a grant for {patient}, got {}", describe(&other)),
        }
    }

    fn expect_refused(&self, code: &str) -> Result<String> {
        match self.next("refusal")? {
            WatchEvent::Refused {
                code: c, reason, ..
            } if c == code => Ok(reason),
            other => bail!("expected refusal {code}, got {}", describe(&other)),
        }
    }

    fn remove(&self, vc: Vcard) -> Result<Option<String>> {
        drop(vc);
        match self.next("removal")? {
            // Only this reader's: another's removal taken here would let the test go on
            // before the watcher saw this card leave.
            WatchEvent::Removed { reader, ended } if reader == READER => Ok(ended),
            other => bail!("expected a removal, got {}", describe(&other)),
        }
    }

    fn call(&self, req: Value) -> Result<Value> {
        let reply = (self.handler)(&req).context("handler did not know the command")?;
        ensure!(reply["ok"] == json!(true), "{req}: {reply}");
        Ok(reply)
    }

    fn grants(&self) -> Result<usize> {
        Ok(self
            .catalog
            .audit_log()?
            .iter()
            .filter(|e| e.event == "consent-grant")
            .count())
    }

    /// A refused card never opens a session: no grant audited, nobody active.
    fn refused(&mut self, args: &[&str], code: &str) -> Result<String> {
        let before = self.grants()?;
        let vc = self.insert(args)?;
        let reason = self.expect_refused(code)?;
        ensure!(!self.registry.is_active("P0001"), "{code}: consent active");
        ensure!(!self.registry.is_active("P0002"), "{code}: consent active");
        ensure!(self.grants()? == before, "{code}: a grant was audited");
        ensure!(
            self.remove(vc)?.is_none(),
            "{code}: removal ended a session"
        );
        Ok(reason)
    }
}

#[test]
fn card_watcher_over_real_pcscd() -> Result<()> {
    let _lock = CardTestLock::acquire()?;
    let dir = tempfile::tempdir()?;
    let result = run(dir.path());
    if result.is_err() {
        for entry in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains("winscard_svc.c"))
                    .rev()
                    .take(40)
                    .collect();
                eprintln!("==> {} (last lines)", p.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
    if result.is_err() && std::env::var_os("QGENOME_KEEP_CARD_LOGS").is_some() {
        eprintln!("logs kept in {}", dir.keep().display());
    }
    result
}

fn run(dir: &Path) -> Result<()> {
    let pcscd = Pcscd::start(&dir.join("pcscd.log"), PORT)?;
    let catalog = Arc::new(Catalog::open(&dir.join("catalog"))?);
    catalog.add_patient("P0001")?;
    catalog.add_patient("P0002")?;
    let v = catalog.begin("P0001", "run1.cram", 1 << 20, 2, 3, 0o644)?;
    catalog.commit(&v.id, 1000, [0x11; 32])?;
    let registry = ConsentRegistry::new(catalog.clone());
    let cards = CardConsent::new(catalog.clone(), registry.clone());
    let (tx, events) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let cfg = WatcherConfig {
        mode: ConsentMode::UntilRemoved,
        reader: Some(READER.into()),
        on_event: Some(Arc::new(move |ev: &WatchEvent| {
            let _ = tx.lock().unwrap().send(ev.clone());
        })),
        ..WatcherConfig::default()
    };
    let watcher = watcher::start(cards.clone(), cfg)?;
    // A `[card] reader` that matches no reader present is said, naming the readers there.
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let typo = watcher::start(
            cards.clone(),
            WatcherConfig {
                mode: ConsentMode::UntilRemoved,
                reader: Some("Virtul PCD".into()),
                on_event: Some(Arc::new(move |ev: &WatchEvent| {
                    let _ = tx.lock().unwrap().send(ev.clone());
                })),
                ..WatcherConfig::default()
            },
        )?;
        match rx.recv_timeout(WAIT) {
            Ok(WatchEvent::NoReaderMatches { filter, present }) => ensure!(
                filter == "Virtul PCD" && present.iter().any(|r| r.contains(READER)),
                "{filter:?} {present:?}"
            ),
            other => bail!("expected a reader filter matching nothing to be said, got {other:?}"),
        }
        drop(typo);
    }
    let mut rig = Rig {
        dir: dir.to_owned(),
        pcscd: Some(pcscd),
        events,
        catalog: catalog.clone(),
        registry: registry.clone(),
        handler: card_handler(cards.clone(), Arc::new(PcscReaders::default())),
        runs: 0,
    };
    let state = dir.join("card.state");
    let record = dir.join("ga.recorded");
    let base = ["--state", s(&state)];

    // 1. Unenrolled card: refused; then enrolled through the control handler while present.
    let vc = rig.insert(&base)?;
    rig.expect_refused("unknown-card")?;
    ensure!(!registry.is_active("P0001"));
    let reply = rig.call(json!({"cmd": "card-enroll", "patient": "P0001", "reader": READER}))?;
    let guid = reply["card"]["guid"].as_str().context("guid")?.to_owned();
    let guid_bytes = parse_guid(&guid)?;
    ensure!(reply["card"]["policy"] == "card-auth-9e", "{reply}");
    ensure!(rig.remove(vc)?.is_none());
    let err = (rig.handler)(&json!({"cmd": "card-enroll", "patient": "P0001", "reader": READER}))
        .unwrap();
    ensure!(
        err["ok"] == json!(false) && err["error"].as_str().unwrap().contains("no card"),
        "enroll without a card: {err}"
    );

    // 2. Enrolled card: a reader blocked in wait() wakes; consent active until removal.
    let r2 = registry.clone();
    let waiter = std::thread::spawn(move || r2.wait("P0001", Duration::from_secs(60)));
    let mut args = base.to_vec();
    args.extend(["--record", s(&record)]);
    let vc = rig.insert(&args)?;
    rig.expect_granted("P0001")?;
    ensure!(
        waiter.join().unwrap().is_ok(),
        "blocked reader did not wake"
    );
    ensure!(registry.is_active("P0001") && !registry.is_active("P0002"));
    ensure!(
        rig.remove(vc)?.as_deref() == Some("P0001"),
        "removal ended no session"
    );
    ensure!(!registry.is_active("P0001"), "consent outlived the card");
    ensure!(
        registry.wait("P0001", Duration::from_millis(300)).is_err(),
        "read after removal did not block"
    );

    // 3. Clone (enrolled GUID and certificate, another key), bad signature, replayed answer.
    for flags in [
        vec!["--wrong-key"],
        vec!["--bad-signature"],
        vec!["--replay", s(&record)],
    ] {
        let mut args = base.to_vec();
        args.extend(flags.iter().copied());
        rig.refused(&args, "bad-signature")
            .with_context(|| format!("{flags:?}"))?;
    }
    // A fresh card carrying the enrolled GUID (copied card number): another key entirely.
    let clone_state = dir.join("clone.state");
    {
        let id = qgenome_tools::vcard::CardIdentity::generate()?.with_guid(guid_bytes);
        std::fs::write(&clone_state, &*id.to_bytes())?;
    }
    rig.refused(&["--state", s(&clone_state)], "bad-signature")?;

    // 4. Seal through the handler (card present and accepted), then present again: accepted.
    let vc = rig.insert(&base)?;
    rig.expect_granted("P0001")?;
    let reply = rig.call(json!({"cmd": "card-seal", "patient": "P0001", "reader": READER}))?;
    let digest = catalog.manifest_digest("P0001")?;
    ensure!(
        reply["digest"] == qgenome::catalog::cards::hex(&digest),
        "{reply}"
    );
    ensure!(catalog.card(&guid_bytes)?.unwrap().sealed_digest == Some(digest));
    rig.remove(vc)?;
    let vc = rig.insert(&base)?;
    rig.expect_granted("P0001")?;
    rig.remove(vc)?;
    // Wrong management key: refused by the card, nothing recorded.
    let vc = rig.insert(&base)?;
    rig.expect_granted("P0001")?;
    let bad = (rig.handler)(
        &json!({"cmd": "card-seal", "patient": "P0001", "reader": READER,
        "mgmt_key": "8102030405060708010203040506070801020304050607AA"}),
    )
    .unwrap();
    ensure!(bad["ok"] == json!(false), "seal with a wrong key: {bad}");
    rig.remove(vc)?;

    // 5. Catalog altered after sealing: the binding's digest no longer matches the card's, or
    //    the files no longer match the sealed digest.
    catalog.set_sealed_digest(&guid_bytes, Some([0x5A; 32]))?;
    rig.refused(&base, "digest-mismatch")?;
    catalog.set_sealed_digest(&guid_bytes, Some(digest))?;
    let v2 = catalog.begin("P0001", "run2.cram", 1 << 20, 2, 3, 0o644)?;
    catalog.commit(&v2.id, 5, [0x22; 32])?;
    let why = rig.refused(&base, "manifest-mismatch")?;
    ensure!(
        why.contains(&qgenome::catalog::cards::hex(&digest)),
        "{why}"
    );

    // 6. Re-seal (the card is refused as stale, but seal authenticates it itself), accepted.
    let vc = rig.insert(&base)?;
    rig.expect_refused("manifest-mismatch")?;
    rig.call(json!({"cmd": "card-seal", "patient": "P0001", "reader": READER}))?;
    rig.remove(vc)?;

    // 7. pcscd killed during a session: consent ends (nothing can see the card); after the
    //    restart the watcher re-establishes its context and the card is accepted again.
    let vc = rig.insert(&base)?;
    rig.expect_granted("P0001")?;
    let before = watcher.contexts();
    rig.pcscd.take().expect("running").kill();
    match rig.next("service lost")? {
        WatchEvent::ServiceLost { .. } => {}
        other => bail!("expected service lost, got {}", describe(&other)),
    }
    ensure!(!registry.is_active("P0001"), "session outlived pcscd");
    rig.pcscd = Some(Pcscd::start(&dir.join("pcscd-2.log"), PORT)?);
    rig.expect_granted("P0001")?;
    ensure!(
        watcher.contexts() > before,
        "no new context ({} then {})",
        before,
        watcher.contexts()
    );
    ensure!(registry.is_active("P0001"));

    // 8. Revoke while present: the session ends at once; the card is refused from then on.
    let reply = rig.call(json!({"cmd": "card-revoke", "patient": "P0001"}))?;
    ensure!(reply["sessions_ended"] == json!(["P0001"]), "{reply}");
    ensure!(!registry.is_active("P0001"));
    ensure!(rig.remove(vc)?.is_none());
    rig.refused(&base, "revoked")?;
    let list = rig.call(json!({"cmd": "card-list"}))?;
    ensure!(
        list["cards"][0]["revoked"] == json!(true) && list["cards"][0]["guid"] == guid,
        "{list}"
    );

    // 9. PIN policy (9A): no PIN refused, wrong PIN refused, right PIN accepted once.
    let pin_state = dir.join("pin.state");
    let pin_card = ["--state", s(&pin_state), "--pin", "246810"];
    let vc = rig.insert(&pin_card)?;
    rig.expect_refused("unknown-card")?;
    rig.call(
        json!({"cmd": "card-enroll", "patient": "P0002", "reader": READER, "policy": "pin-9a"}),
    )?;
    rig.remove(vc)?;
    rig.refused(&pin_card, "no-pin")?;
    // A PIN for a patient without a pin-9a card (a typo) is refused, naming the patient.
    let e =
        (rig.handler)(&json!({"cmd": "card-pin", "patient": "P0O02", "pin": "246810"})).unwrap();
    ensure!(
        e["ok"] == json!(false)
            && e["error"]
                .as_str()
                .unwrap()
                .contains("patient P0O02 has no card enrolled under the pin-9a policy"),
        "{e}"
    );
    rig.call(json!({"cmd": "card-pin", "patient": "P0002", "pin": "111111"}))?;
    rig.refused(&pin_card, "pin-refused")?;
    rig.call(json!({"cmd": "card-pin", "patient": "P0002", "pin": "246810"}))?;
    let vc = rig.insert(&pin_card)?;
    rig.expect_granted("P0002")?;
    ensure!(registry.is_active("P0002") && !registry.is_active("P0001"));
    ensure!(rig.remove(vc)?.as_deref() == Some("P0002"));
    rig.refused(&pin_card, "no-pin")?; // the PIN was used up

    // (For step 10: P0003's card.)
    catalog.add_patient("P0003")?;
    let p3_state = dir.join("p3.state");
    let p3 = ["--state", s(&p3_state)];
    let vc = rig.insert(&p3)?;
    rig.expect_refused("unknown-card")?;
    rig.call(json!({"cmd": "card-enroll", "patient": "P0003", "reader": READER}))?;
    ensure!(rig.remove(vc)?.is_none());

    // The audit log holds every step with its reason, and no PIN.
    let log = catalog.audit_log()?;
    let text: Vec<String> = log
        .iter()
        .map(|e| format!("{} {:?} {}", e.event, e.patient, e.detail))
        .collect();
    let joined = text.join("\n");
    for needle in [
        "card-presented",
        "card-accepted",
        "card-removed",
        "card-enrolled",
        "card-sealed",
        "card-seal-refused",
        "card-revoked",
        "card-pin-entered",
        "consent-grant",
        "consent-end",
        "unknown-card:",
        "bad-signature:",
        "digest-mismatch:",
        "manifest-mismatch:",
        "revoked:",
        "no-pin:",
        "pin-refused:",
        "PC/SC service lost",
    ] {
        ensure!(joined.contains(needle), "audit lacks {needle:?}:\n{joined}");
    }
    ensure!(
        !joined.contains("246810") && !joined.contains("111111"),
        "PIN in the audit"
    );
    let refusals = log.iter().filter(|e| e.event == "card-refused").count();
    ensure!(refusals >= 12, "{refusals} refusals audited:\n{joined}");
    drop(watcher);

    // 10. Every reader watched (no filter): a card that answers slowly in one reader holds
    //     nothing up in the other. P0003's card is granted in reader 00 00, a slow unenrolled
    //     card goes into 00 01, and P0003's card is pulled while the slow one is still being
    //     presented: the removal ends P0003's consent at once, not after the slow card.
    let (tx, events) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let both = watcher::start(
        cards.clone(),
        WatcherConfig {
            mode: ConsentMode::UntilRemoved,
            reader: None,
            on_event: Some(Arc::new(move |ev: &WatchEvent| {
                let _ = tx.lock().unwrap().send(ev.clone());
            })),
            ..WatcherConfig::default()
        },
    )?;
    rig.events = events;
    let vc = rig.insert(&p3)?;
    rig.expect_granted("P0003")?;
    let presented = |c: &Catalog| -> Result<usize> {
        Ok(c.audit_log()?
            .iter()
            .filter(|e| e.event == "card-presented" && e.detail.contains(SECOND_READER))
            .count())
    };
    let slow = Vcard::start(
        Path::new(env!("CARGO_BIN_EXE_qgenome-vcard")),
        &[
            "--port",
            &SECOND_PORT.to_string(),
            "--state",
            s(&dir.join("slow.state")),
            "--delay-ms",
            "4000",
        ],
        &dir.join("vcard-slow.log"),
    )?;
    let deadline = Instant::now() + WAIT;
    while presented(&catalog)? == 0 {
        ensure!(
            Instant::now() < deadline,
            "the slow card in {SECOND_READER:?} was never presented"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pulled = Instant::now();
    ensure!(
        rig.remove(vc)?.as_deref() == Some("P0003"),
        "removal ended no session"
    );
    ensure!(!registry.is_active("P0003"), "consent outlived the card");
    ensure!(
        pulled.elapsed() < Duration::from_secs(2),
        "the removal waited {:?} (behind the slow card's presentation)",
        pulled.elapsed()
    );
    // The slow card is refused in its turn (unenrolled, or gone before it answered), and its
    // removal seen, in either order: both are taken here, or the next step's removal would
    // take this one's event for its own.
    drop(slow);
    let (mut refused, mut removed) = (false, false);
    while !(refused && removed) {
        match rig.next("the slow card's refusal and removal")? {
            WatchEvent::Refused { reader, code, .. } if reader == SECOND_READER && !refused => {
                ensure!(
                    ["unknown-card", "card-error"].contains(&code),
                    "slow card refused as {code}"
                );
                refused = true;
            }
            WatchEvent::Removed { reader, ended } if reader == SECOND_READER && !removed => {
                ensure!(ended.is_none(), "the slow card's removal ended {ended:?}");
                removed = true;
            }
            other => bail!(
                "expected the slow card's refusal and removal, got {}",
                describe(&other)
            ),
        }
    }
    ensure!(!registry.is_active("P0003"));

    // 11. A presentation still waiting for the desk when its card left does not talk to the
    //     card that came next into that reader: that card has its own presentation, and the
    //     first would take its patient's PIN and leave it refused for want of one.
    let in_reader = |c: &Catalog| -> Result<usize> {
        Ok(c.audit_log()?
            .iter()
            .filter(|e| e.event == "card-presented" && e.detail.contains(READER))
            .count())
    };
    let wait_presented = |n: usize| -> Result<()> {
        let deadline = Instant::now() + WAIT;
        while in_reader(&catalog)? < n {
            ensure!(Instant::now() < deadline, "card not seen in {READER:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let before = in_reader(&catalog)?;
    let desk = cards.desk();
    let x = rig.insert(&["--state", s(&dir.join("x.state"))])?;
    wait_presented(before + 1)?;
    ensure!(rig.remove(x)?.is_none());
    rig.call(json!({"cmd": "card-pin", "patient": "P0002", "pin": "246810"}))?;
    let vc = rig.insert(&pin_card)?;
    wait_presented(before + 2)?;
    drop(desk);
    let (mut gone, mut granted) = (false, false);
    while !(gone && granted) {
        match rig.next("the two presentations' outcomes")? {
            WatchEvent::Refused { code, .. } if code == "left-during-presentation" && !gone => {
                gone = true
            }
            WatchEvent::Granted { presented, .. } if presented.patient == "P0002" => granted = true,
            other => bail!(
                "expected the first card's presentation dropped and P0002 granted, got {}",
                describe(&other)
            ),
        }
    }
    ensure!(registry.is_active("P0002"));
    ensure!(rig.remove(vc)?.as_deref() == Some("P0002"));
    drop(both);
    Ok(())
}
