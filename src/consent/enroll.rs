//! Enrollment, sealing, revocation and PIN entry: the card commands of the control socket.
//!
//! [`card_handler`] answers `card-enroll`, `card-list`, `card-revoke`, `card-seal` and
//! `card-pin` (see `docs/design.md` ("Patient smart cards") for the request fields). The card work itself is in
//! [`enroll`] and [`seal`], pure over a [`CardTransport`]; readers are reached through the
//! [`CardReaders`] trait ([`PcscReaders`] in production).
use std::sync::Arc;

use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::apdu::{Algorithm, Slot};
use super::card::{Backoff, PcscClient};
use super::piv::{self, CardError, CardTransport, ManagementKey, PivCard, PivError};
use super::watcher::CardConsent;
use crate::catalog::cards::{hex, parse_guid, CardBinding, CardBindingError, CardPolicy};
use crate::catalog::{Catalog, Hash};
use crate::control::{self, arg_str, Handler};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error("card in reader {reader:?}: {source}")]
    Card {
        reader: String,
        source: Box<PivError>,
    },
    #[error("PC/SC: {0}")]
    Reader(Box<CardError>),
    #[error(transparent)]
    Binding(Box<CardBindingError>),
    #[error("no card in any reader (readers: {readers:?})")]
    NoCard { readers: Vec<String> },
    #[error("cards in several readers {readers:?}: name one with --reader")]
    SeveralCards { readers: Vec<String> },
    #[error("card {guid} is enrolled for patient {bound}, not {asked}")]
    WrongPatient {
        guid: String,
        bound: String,
        asked: String,
    },
    #[error("card {guid} of patient {patient} is revoked")]
    Revoked { guid: String, patient: String },
    #[error("card {guid} of patient {patient}: signature does not verify against the enrolled key (not the enrolled card)")]
    NotAuthentic { guid: String, patient: String },
    #[error("card {guid} for patient {patient}: the card cannot sign with the key of its own certificate (a certificate copied onto another card?); not enrolled")]
    KeyNotHeld { guid: String, patient: String },
    #[error(
        "card {guid} of patient {patient}: PIN policy, enter the PIN first with `qgenome card pin`"
    )]
    NoPin { guid: String, patient: String },
    #[error("card {guid}: digest read back {got} differs from the one written {wrote}")]
    ReadBack {
        guid: String,
        wrote: String,
        got: String,
    },
}

impl From<CardError> for EnrollError {
    fn from(e: CardError) -> Self {
        EnrollError::Reader(Box::new(e))
    }
}

impl From<CardBindingError> for EnrollError {
    fn from(e: CardBindingError) -> Self {
        EnrollError::Binding(Box::new(e))
    }
}

impl From<crate::catalog::CatalogError> for EnrollError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        EnrollError::Binding(Box::new(e.into()))
    }
}

/// Where the control handler finds cards.
pub trait CardReaders: Send + Sync {
    /// The card in the reader named `reader`, else in the only reader whose name contains it
    /// (several: an error naming them), or without a name the card in the only reader that
    /// holds one.
    fn connect(&self, reader: Option<&str>) -> Result<Box<dyn CardTransport>, EnrollError>;
}

/// [`CardReaders`] through pcscd; a fresh context per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct PcscReaders {
    pub backoff: Backoff,
}

impl CardReaders for PcscReaders {
    fn connect(&self, reader: Option<&str>) -> Result<Box<dyn CardTransport>, EnrollError> {
        let mut client = PcscClient::new(self.backoff);
        if let Some(r) = reader {
            return Ok(Box::new(client.connect(r)?));
        }
        let readers = client.readers()?;
        let mut found = Vec::new();
        for r in &readers {
            match client.connect(r) {
                Ok(c) => found.push(c),
                Err(CardError::NoCard { .. } | CardError::Removed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match found.len() {
            0 => Err(EnrollError::NoCard { readers }),
            1 => Ok(Box::new(found.pop().expect("one"))),
            _ => Err(EnrollError::SeveralCards {
                readers: found.iter().map(|c| c.reader().to_owned()).collect(),
            }),
        }
    }
}

fn slot_of(policy: CardPolicy) -> Slot {
    match policy {
        CardPolicy::CardAuth9E => Slot::CardAuthentication9E,
        CardPolicy::Pin9A => Slot::Authentication9A,
    }
}

fn card_err(reader: &str) -> impl Fn(PivError) -> EnrollError + '_ {
    move |source| EnrollError::Card {
        reader: reader.to_owned(),
        source: Box::new(source),
    }
}

/// Reads the card's GUID and the certificate of the policy's slot, and binds the certificate's
/// public key (SEC1, uncompressed) to `patient`. The certificate's issuer is not checked: the
/// key is trusted because it was enrolled in person.
pub fn enroll<T: CardTransport>(
    transport: T,
    catalog: &Catalog,
    patient: &str,
    policy: CardPolicy,
) -> Result<CardBinding, EnrollError> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let reader = transport.reader().to_owned();
    let err = card_err(&reader);
    let mut card = PivCard::open(transport).map_err(&err)?;
    let guid = card.guid().map_err(&err)?;
    let key = card.public_key(slot_of(policy)).map_err(&err)?;
    // The card must hold the certificate's private key: a challenge signed now. (The 9A key
    // of the PIN policy needs the PIN, which enrollment does not take; its first presentation
    // proves it.)
    if policy == CardPolicy::CardAuth9E {
        let mut challenge = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(&mut challenge[..]).map_err(|e| {
            err(PivError::Random {
                detail: e.to_string(),
            })
        })?;
        let signature = card
            .sign(Slot::CardAuthentication9E, &challenge)
            .map_err(&err)?;
        if !crate::consent::piv::verify_challenge(&key, &challenge, &signature) {
            return Err(EnrollError::KeyNotHeld {
                guid: hex(&guid),
                patient: patient.to_string(),
            });
        }
    }
    let sec1 = key.to_encoded_point(false);
    Ok(catalog.enroll_card(&guid, patient, sec1.as_bytes(), policy)?)
}

/// Writes `patient`'s current manifest digest onto their enrolled card (after checking the card
/// is the enrolled one and authenticating with the management key), reads it back, and records
/// it in the binding. The card is written before the catalog: a crash between the two leaves a
/// binding without a sealed digest (the card still works; seal again).
pub fn seal<T: CardTransport>(
    transport: T,
    catalog: &Catalog,
    patient: &str,
    mgmt: &ManagementKey,
    pin: Option<Zeroizing<Vec<u8>>>,
) -> Result<(CardBinding, Hash), EnrollError> {
    let reader = transport.reader().to_owned();
    let err = card_err(&reader);
    let mut card = PivCard::open(transport).map_err(&err)?;
    let guid = card.guid().map_err(&err)?;
    let g = hex(&guid);
    let binding = catalog
        .card(&guid)?
        .ok_or_else(|| EnrollError::from(CardBindingError::NotEnrolled { guid: g.clone() }))?;
    if binding.patient != patient {
        return Err(EnrollError::WrongPatient {
            guid: g,
            bound: binding.patient,
            asked: patient.to_string(),
        });
    }
    if binding.revoked {
        return Err(EnrollError::Revoked {
            guid: g,
            patient: binding.patient,
        });
    }
    let not_authentic = || EnrollError::NotAuthentic {
        guid: g.clone(),
        patient: patient.to_string(),
    };
    let key = binding.key().ok_or_else(not_authentic)?;
    if binding.policy == CardPolicy::Pin9A {
        let pin = pin.ok_or_else(|| EnrollError::NoPin {
            guid: g.clone(),
            patient: patient.to_string(),
        })?;
        card.verify_pin(&pin).map_err(&err)?;
    }
    match card.authenticate(slot_of(binding.policy), &key) {
        Ok(()) => {}
        Err(PivError::SignatureInvalid { .. } | PivError::SignatureMalformed { .. }) => {
            return Err(not_authentic())
        }
        Err(e) => return Err(err(e)),
    }
    let digest = catalog.manifest_digest(patient)?;
    card.authenticate_management(mgmt).map_err(&err)?;
    card.write_digest(&digest).map_err(&err)?;
    let back = card.read_digest().map_err(&err)?;
    if back.is_none_or(|b| !piv::ct_eq(&b, &digest)) {
        return Err(EnrollError::ReadBack {
            guid: g,
            wrote: hex(&digest),
            got: back.map_or_else(|| "nothing".into(), |b| hex(&b)),
        });
    }
    let binding = catalog.set_sealed_digest(&guid, Some(digest))?;
    Ok((binding, digest))
}

fn binding_json(b: &CardBinding) -> Value {
    json!({
        "guid": hex(&b.guid),
        "patient": b.patient,
        "policy": b.policy.as_str(),
        "public_key": hex(&b.public_key),
        "sealed_digest": b.sealed_digest.map(|d| hex(&d)),
        "enrolled": b.enrolled,
        "revoked": b.revoked,
    })
}

/// Parses `mgmt_alg` (`3des`, `aes128`, `aes192`, `aes256`; default `3des`) and `mgmt_key` hex
/// (default: the YubiKey factory key). The hex and the bytes are zeroized after use.
fn management_key(req: &Value) -> Result<ManagementKey, String> {
    let text = |e: Value| e["error"].as_str().unwrap_or("bad argument").to_owned();
    let alg = match control::opt_str(req, "mgmt_alg")
        .map_err(text)?
        .unwrap_or("3des")
    {
        "3des" | "tdes" => Algorithm::TripleDes,
        "aes128" => Algorithm::Aes128,
        "aes192" => Algorithm::Aes192,
        "aes256" => Algorithm::Aes256,
        other => {
            return Err(format!(
                "mgmt_alg {other:?}: use 3des, aes128, aes192 or aes256"
            ))
        }
    };
    let len = alg.key_len().expect("symmetric");
    let bytes = Zeroizing::new(match control::opt_str(req, "mgmt_key").map_err(text)? {
        None => ManagementKey::DEFAULT_BYTES
            .iter()
            .cycle()
            .take(len)
            .copied()
            .collect::<Vec<u8>>(),
        Some(h) => {
            if h.len() % 2 != 0 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("mgmt_key is not hex".into());
            }
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("checked hex"))
                .collect()
        }
    });
    ManagementKey::new(alg, &bytes).map_err(|e| e.to_string())
}

/// The control handler for the card commands. The mount chains it with the others; it shares
/// `cards` (catalog, registry, PIN pad, reader lock) with the watcher.
pub fn card_handler(cards: Arc<CardConsent>, readers: Arc<dyn CardReaders>) -> Arc<Handler> {
    Arc::new(move |req: &Value| {
        let cmd = req.get("cmd").and_then(Value::as_str)?;
        let reply = match cmd {
            "card-enroll" => handle_enroll(&cards, readers.as_ref(), req),
            "card-list" => handle_list(&cards),
            "card-revoke" => handle_revoke(&cards, req),
            "card-seal" => handle_seal(&cards, readers.as_ref(), req),
            "card-pin" => handle_pin(&cards, req),
            _ => return None,
        };
        Some(reply.unwrap_or_else(|e| e))
    })
}

type Reply = Result<Value, Value>;

fn handle_enroll(cards: &CardConsent, readers: &dyn CardReaders, req: &Value) -> Reply {
    let patient = arg_str(req, "patient")?;
    let policy = match control::opt_str(req, "policy")? {
        None => CardPolicy::CardAuth9E,
        Some(p) => CardPolicy::parse(p)
            .ok_or_else(|| control::error(format!("policy {p:?}: use card-auth-9e or pin-9a")))?,
    };
    let reader = control::opt_str(req, "reader")?;
    let by = control::peer_of(req);
    let _desk = cards.desk();
    let result = readers
        .connect(reader)
        .and_then(|t| enroll(t, &cards.catalog, patient, policy));
    match result {
        Ok(b) => {
            cards.audit.record(
                "card-enrolled",
                Some(patient),
                None,
                &format!(
                    "card {}, policy {}, by {by}",
                    hex(&b.guid),
                    b.policy.as_str()
                ),
            );
            Ok(json!({"ok": true, "card": binding_json(&b)}))
        }
        Err(e) => {
            cards.audit.record(
                "card-enroll-refused",
                Some(patient),
                None,
                &format!("{e} (by {by})"),
            );
            Err(control::error(e))
        }
    }
}

fn handle_list(cards: &CardConsent) -> Reply {
    let list = cards.catalog.cards().map_err(control::error)?;
    Ok(json!({"ok": true, "cards": list.iter().map(binding_json).collect::<Vec<_>>()}))
}

fn handle_revoke(cards: &CardConsent, req: &Value) -> Reply {
    // Not between a presentation's last check of its card and its grant: the grant then
    // comes wholly before this revoke (whose check below finds its session) or after it
    // (and sees the card revoked).
    let _granting = cards.granting();
    let by = control::peer_of(req);
    let revoked = if let Some(g) = control::opt_str(req, "guid")? {
        let guid = parse_guid(g).map_err(control::error)?;
        vec![cards.catalog.revoke_card(&guid).map_err(control::error)?]
    } else if let Some(p) = control::opt_str(req, "patient")? {
        cards.catalog.revoke_cards_of(p).map_err(control::error)?
    } else {
        return Err(control::error("card-revoke needs \"guid\" or \"patient\""));
    };
    let mut ended = Vec::new();
    for b in &revoked {
        let g = hex(&b.guid);
        cards.audit.record(
            "card-revoked",
            Some(&b.patient),
            None,
            &format!("card {g}, by {by}"),
        );
        // A session opened by this card must not outlive its revocation.
        let granted_by_it = cards
            .registry
            .list()
            .iter()
            .any(|s| s.patient == b.patient && s.source == format!("card {g}"));
        if granted_by_it
            && cards
                .registry
                .end(&b.patient, &format!("card {g} revoked (by {by})"))
        {
            ended.push(b.patient.clone());
        }
    }
    Ok(json!({
        "ok": true,
        "revoked": revoked.iter().map(binding_json).collect::<Vec<_>>(),
        "sessions_ended": ended,
    }))
}

fn handle_seal(cards: &CardConsent, readers: &dyn CardReaders, req: &Value) -> Reply {
    let patient = arg_str(req, "patient")?;
    let mgmt = management_key(req).map_err(control::error)?;
    let reader = control::opt_str(req, "reader")?;
    let by = control::peer_of(req);
    let _desk = cards.desk();
    let pin = cards.pins.take(patient);
    let result = readers
        .connect(reader)
        .and_then(|t| seal(t, &cards.catalog, patient, &mgmt, pin));
    match result {
        Ok((b, digest)) => {
            cards.audit.record(
                "card-sealed",
                Some(patient),
                None,
                &format!(
                    "card {}, manifest digest {}, by {by}",
                    hex(&b.guid),
                    hex(&digest)
                ),
            );
            Ok(json!({"ok": true, "guid": hex(&b.guid), "digest": hex(&digest)}))
        }
        Err(e) => {
            cards.audit.record(
                "card-seal-refused",
                Some(patient),
                None,
                &format!("{e} (by {by})"),
            );
            Err(control::error(e))
        }
    }
}

fn handle_pin(cards: &CardConsent, req: &Value) -> Reply {
    let patient = arg_str(req, "patient")?;
    let pin = arg_str(req, "pin")?;
    if !(6..=8).contains(&pin.len()) || !pin.is_ascii() {
        return Err(control::error("PIN must be 6 to 8 ASCII characters"));
    }
    // A mistyped patient would hold the PIN for nobody, and the real patient's card would be
    // refused for want of one.
    let all = cards.catalog.cards().map_err(control::error)?;
    if !all
        .iter()
        .any(|b| b.patient == patient && !b.revoked && b.policy == CardPolicy::Pin9A)
    {
        return Err(control::error(format!(
            "card-pin: patient {patient} has no card enrolled under the pin-9a policy"
        )));
    }
    cards
        .pins
        .offer(patient, Zeroizing::new(pin.as_bytes().to_vec()));
    cards.audit.record(
        "card-pin-entered",
        Some(patient),
        None,
        &format!(
            "valid {} s, one use, by {}",
            super::watcher::PIN_VALID.as_secs(),
            control::peer_of(req)
        ),
    );
    Ok(json!({"ok": true}))
}
