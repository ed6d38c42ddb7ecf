//! The real [`CardTransport`]: PC/SC through pcscd (the `pcsc` crate over libpcsclite).
//!
//! A restarted pcscd invalidates every established context (calls keep failing with
//! `NoService`/`InvalidHandle`), so [`PcscClient`] drops its context on those errors and
//! establishes a new one with backoff before giving up.

use super::piv::{CardError, CardTransport};
use std::ffi::CString;
use std::time::{Duration, Instant};

/// How often and how patiently to re-establish the PC/SC context.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Tries in all (the first one included).
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            attempts: 12,
        }
    }
}

fn is_service_gone(e: pcsc::Error) -> bool {
    matches!(
        e,
        pcsc::Error::NoService
            | pcsc::Error::ServiceStopped
            | pcsc::Error::InvalidHandle
            | pcsc::Error::CommError
    )
}

/// Which of the readers `present` `wanted` names: the one named exactly so, else the only one
/// whose name contains it. Two or more containing it is an error naming them all, not the
/// first of them: readers of one make differ only at the end ("Virtual PCD 00 00" and "... 01"),
/// and `card enroll --reader "PCD 00"` bound whichever card was in the first to the patient.
/// The watcher passes whole names (one reader's name may be contained in another's).
pub fn choose_reader(wanted: &str, present: Vec<String>) -> Result<String, CardError> {
    if present.iter().any(|r| r == wanted) {
        return Ok(wanted.to_owned());
    }
    let mut matching: Vec<String> = present
        .iter()
        .filter(|r| r.contains(wanted))
        .cloned()
        .collect();
    match matching.len() {
        0 => Err(CardError::NoReader {
            wanted: wanted.to_owned(),
            present,
        }),
        1 => Ok(matching.remove(0)),
        _ => Err(CardError::AmbiguousReader {
            wanted: wanted.to_owned(),
            matching,
        }),
    }
}

/// A PC/SC client that survives pcscd restarts.
pub struct PcscClient {
    ctx: Option<pcsc::Context>,
    backoff: Backoff,
    established: u32,
}

impl std::fmt::Debug for PcscClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PcscClient(context {})",
            if self.ctx.is_some() {
                "established"
            } else {
                "none"
            }
        )
    }
}

impl PcscClient {
    /// A client; the context is established on first use.
    pub fn new(backoff: Backoff) -> PcscClient {
        PcscClient {
            ctx: None,
            backoff,
            established: 0,
        }
    }

    /// How many times a context was established (1 after first use; each pcscd restart the
    /// client recovered from adds one).
    pub fn contexts_established(&self) -> u32 {
        self.established
    }

    /// A handle on the context held, if any (to cancel a wait from another thread).
    pub fn context(&self) -> Option<pcsc::Context> {
        self.ctx.clone()
    }

    /// Whether a context is currently held (it may still be stale after a pcscd restart).
    pub fn has_context(&self) -> bool {
        self.ctx.is_some()
    }

    /// Runs `op` on a valid context: (re-)establishes it and retries with backoff while the
    /// service is missing or the context went stale.
    pub fn with_context<R>(
        &mut self,
        mut op: impl FnMut(&pcsc::Context) -> Result<R, pcsc::Error>,
    ) -> Result<Result<R, pcsc::Error>, CardError> {
        let mut delay = self.backoff.initial;
        let mut last = pcsc::Error::NoService;
        for attempt in 0..self.backoff.attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(delay);
                delay = (delay * 2).min(self.backoff.max);
            }
            if self.ctx.is_none() {
                match pcsc::Context::establish(pcsc::Scope::User) {
                    Ok(c) => {
                        self.ctx = Some(c);
                        self.established += 1;
                    }
                    Err(e) if is_service_gone(e) => {
                        last = e;
                        continue;
                    }
                    Err(e) => return Err(CardError::NoService { source: e }),
                }
            }
            let ctx = self.ctx.as_ref().expect("just established");
            match op(ctx) {
                Err(e) if is_service_gone(e) => {
                    tracing::debug!(error = %e, attempt, "PC/SC context stale, re-establishing");
                    self.ctx = None;
                    last = e;
                }
                other => return Ok(other),
            }
        }
        Err(CardError::NoService { source: last })
    }

    /// Names of the readers pcscd knows (empty when there are none).
    pub fn readers(&mut self) -> Result<Vec<String>, CardError> {
        let r = self.with_context(|ctx| ctx.list_readers_owned())?;
        match r {
            Ok(names) => Ok(names
                .into_iter()
                .map(|n| n.to_string_lossy().into_owned())
                .collect()),
            Err(pcsc::Error::NoReadersAvailable) => Ok(Vec::new()),
            Err(e) => Err(CardError::Pcsc {
                reader: String::new(),
                op: "list readers",
                source: e,
            }),
        }
    }

    /// The reader `wanted` names among those present: see [`choose_reader`].
    pub fn find_reader(&mut self, wanted: &str) -> Result<String, CardError> {
        choose_reader(wanted, self.readers()?)
    }

    /// Waits until a card is present in `reader` (exact name), up to `timeout`.
    pub fn wait_for_card(&mut self, reader: &str, timeout: Duration) -> Result<(), CardError> {
        self.wait_for_state(reader, true, timeout)
    }

    /// Waits until `reader` (exact name) is empty, up to `timeout`.
    pub fn wait_for_removal(&mut self, reader: &str, timeout: Duration) -> Result<(), CardError> {
        self.wait_for_state(reader, false, timeout)
    }

    fn wait_for_state(
        &mut self,
        reader: &str,
        present: bool,
        timeout: Duration,
    ) -> Result<(), CardError> {
        let name = CString::new(reader).map_err(|_| CardError::NoReader {
            wanted: reader.to_owned(),
            present: Vec::new(),
        })?;
        let start = Instant::now();
        let mut known = pcsc::State::UNAWARE;
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(CardError::Timeout {
                    reader: reader.to_owned(),
                    what: if present { "a card" } else { "card removal" },
                    waited_ms: timeout.as_millis() as u64,
                    last_state: format!("{known:?}"),
                });
            }
            let mut states = [pcsc::ReaderState::new(name.clone(), known)];
            let wait = left.min(Duration::from_millis(500));
            match self.with_context(|ctx| ctx.get_status_change(wait, &mut states))? {
                Ok(()) => {
                    let ev = states[0].event_state();
                    let is_present =
                        ev.contains(pcsc::State::PRESENT) && !ev.contains(pcsc::State::MUTE);
                    if is_present == present && !ev.contains(pcsc::State::UNKNOWN) {
                        return Ok(());
                    }
                    if ev.contains(pcsc::State::UNKNOWN) {
                        // Reader not (yet) known to this pcscd: poll instead of spinning.
                        std::thread::sleep(Duration::from_millis(50));
                        known = pcsc::State::UNAWARE;
                    } else {
                        known = ev - pcsc::State::CHANGED;
                    }
                }
                Err(pcsc::Error::Timeout) => {}
                // The reader itself may appear only after pcscd has (re)started its driver.
                Err(pcsc::Error::UnknownReader) | Err(pcsc::Error::ReaderUnavailable) => {
                    std::thread::sleep(Duration::from_millis(50));
                    known = pcsc::State::UNAWARE;
                }
                Err(e) => {
                    return Err(CardError::Pcsc {
                        reader: reader.to_owned(),
                        op: "get status change",
                        source: e,
                    })
                }
            }
        }
    }

    /// Connects (shared mode, T=0 or T=1) to the card in the reader `wanted` names (see
    /// [`choose_reader`]).
    pub fn connect(&mut self, wanted: &str) -> Result<PcscCard, CardError> {
        let reader = self.find_reader(wanted)?;
        let name = CString::new(reader.clone()).expect("reader names have no NUL");
        let r = self.with_context(|ctx| {
            ctx.connect(&name, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
        })?;
        match r {
            Ok(card) => Ok(PcscCard {
                card,
                reader,
                buf: vec![0u8; pcsc::MAX_BUFFER_SIZE_EXTENDED],
            }),
            Err(pcsc::Error::NoSmartcard) => Err(CardError::NoCard { reader }),
            Err(pcsc::Error::RemovedCard) => Err(CardError::Removed { reader }),
            Err(e) => Err(CardError::Pcsc {
                reader,
                op: "connect",
                source: e,
            }),
        }
    }
}

/// A connected card over PC/SC.
pub struct PcscCard {
    card: pcsc::Card,
    reader: String,
    /// Big enough for any extended APDU answer: a short buffer makes pcscd report
    /// InsufficientBuffer after the card already ran the command.
    buf: Vec<u8>,
}

impl std::fmt::Debug for PcscCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PcscCard(reader {:?})", self.reader)
    }
}

impl CardTransport for PcscCard {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CardError> {
        let result = self.card.transmit(apdu, &mut self.buf);
        match result {
            // vpcd (and some readers) report a card that vanished mid-command as an empty answer.
            Ok(resp) if resp.len() < 2 => Err(CardError::Mute {
                reader: self.reader.clone(),
                got: resp.len(),
            }),
            Ok(resp) => {
                let out = resp.to_vec();
                let n = out.len();
                zeroize::Zeroize::zeroize(&mut self.buf[..n]);
                Ok(out)
            }
            Err(pcsc::Error::RemovedCard) | Err(pcsc::Error::NoSmartcard) => {
                Err(CardError::Removed {
                    reader: self.reader.clone(),
                })
            }
            Err(e) if is_service_gone(e) => Err(CardError::NoService { source: e }),
            Err(e) => Err(CardError::Pcsc {
                reader: self.reader.clone(),
                op: "transmit",
                source: e,
            }),
        }
    }

    fn reader(&self) -> &str {
        &self.reader
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Part of a name that two readers share is refused, naming both and asking for the whole
    /// name, instead of taking the first (and binding whatever card is in it to the patient).
    #[test]
    fn a_reader_named_by_part_must_be_the_only_one_matching() {
        let two = names(&["Virtual PCD 00 00", "Virtual PCD 00 01"]);
        let e = choose_reader("PCD 00", two.clone()).expect_err("two readers match");
        match &e {
            CardError::AmbiguousReader { wanted, matching } => {
                assert_eq!(wanted, "PCD 00");
                assert_eq!(matching, &two);
            }
            other => panic!("{other:?}"),
        }
        let said = e.to_string();
        for part in [
            "\"PCD 00\"",
            "Virtual PCD 00 00",
            "Virtual PCD 00 01",
            "whole name",
        ] {
            assert!(said.contains(part), "{said}");
        }

        // The whole name, or a part only one reader has, still chooses it.
        assert_eq!(
            choose_reader("Virtual PCD 00 01", two.clone()).unwrap(),
            two[1]
        );
        assert_eq!(choose_reader("00 01", two.clone()).unwrap(), two[1]);
        // An exact name wins over another reader whose name contains it.
        let nested = names(&["Reader 1 extra", "Reader 1"]);
        assert_eq!(choose_reader("Reader 1", nested).unwrap(), "Reader 1");
        // None matching: every reader present named.
        match choose_reader("Yubico", two.clone()) {
            Err(CardError::NoReader { wanted, present }) => {
                assert_eq!((wanted.as_str(), present), ("Yubico", two));
            }
            other => panic!("{other:?}"),
        }
    }
}
