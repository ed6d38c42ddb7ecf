//! PIV card logic over any [`CardTransport`]: select, CHUID GUID, certificates and their P-256
//! keys, challenge–response with the Card Authentication key (9E) or the PIV Authentication key
//! (9A, after VERIFY PIN), management key mutual authentication and the patient digest object.
//!
//! Chaining lives here, not in a transport: long commands go out as command chains and `61xx`
//! answers are collected with GET RESPONSE, so the PC/SC and the in-memory transports behave
//! the same way.

use super::apdu::{self, object, Algorithm, ApduError, Command, Response, Slot, Status};
use super::tlv::{self, Tag, TlvError};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

/// Largest response we assemble from GET RESPONSE chains (PIV objects are well below this).
pub const MAX_RESPONSE: usize = 64 * 1024;
/// Most GET RESPONSE rounds one answer may take: [`MAX_RESPONSE`] in full 256-byte rounds. A
/// card that dribbles a byte a round would otherwise take 65,536 round trips per answer.
pub const MAX_RESPONSE_ROUNDS: usize = MAX_RESPONSE / 256;
/// Version byte of the patient digest record.
pub const DIGEST_RECORD_VERSION: u8 = 1;

/// What went wrong below the PIV layer: the reader, the card's presence, the service.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CardError {
    #[error("PC/SC service unavailable (pcscd not running or restarted): {source}")]
    NoService { source: pcsc::Error },
    #[error("no reader matching {wanted:?} (readers present: {present:?})")]
    NoReader {
        wanted: String,
        present: Vec<String>,
    },
    #[error(
        "{count} readers' names contain {wanted:?} ({matching:?}): give the whole name of \
         the reader to use",
        count = matching.len()
    )]
    AmbiguousReader {
        wanted: String,
        matching: Vec<String>,
    },
    #[error("no card in reader {reader:?}")]
    NoCard { reader: String },
    #[error("card removed from reader {reader:?}")]
    Removed { reader: String },
    #[error(
        "card in reader {reader:?} answered {got} byte(s), no status word (mute or pulled out)"
    )]
    Mute { reader: String, got: usize },
    #[error("timed out after {waited_ms} ms waiting for {what} on reader {reader:?} (last state {last_state})")]
    Timeout {
        reader: String,
        what: &'static str,
        waited_ms: u64,
        last_state: String,
    },
    #[error("PC/SC {op} failed on reader {reader:?}: {source}")]
    Pcsc {
        reader: String,
        op: &'static str,
        source: pcsc::Error,
    },
    #[error("transport to reader {reader:?} failed: {detail}")]
    Transport { reader: String, detail: String },
}

impl CardError {
    /// Whether trying again (after re-establishing the context or re-inserting the card) can help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CardError::NoService { .. }
                | CardError::NoCard { .. }
                | CardError::Removed { .. }
                | CardError::Mute { .. }
                | CardError::Timeout { .. }
        )
    }
}

/// One connected card. Sends one short APDU, returns the whole response including SW1 SW2.
pub trait CardTransport {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CardError>;
    /// Name of the reader (for error messages).
    fn reader(&self) -> &str;
}

impl<T: CardTransport + ?Sized> CardTransport for Box<T> {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CardError> {
        (**self).transmit(apdu)
    }
    fn reader(&self) -> &str {
        (**self).reader()
    }
}

impl<T: CardTransport + ?Sized> CardTransport for &mut T {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CardError> {
        (**self).transmit(apdu)
    }
    fn reader(&self) -> &str {
        (**self).reader()
    }
}

/// A PIV operation that failed; each names the reader and the step.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PivError {
    #[error("reader {reader:?}, {step}: {source}")]
    Transport {
        reader: String,
        step: &'static str,
        source: CardError,
    },
    #[error("reader {reader:?}, {step}: card answered {status}")]
    Status {
        reader: String,
        step: &'static str,
        status: Status,
    },
    #[error("reader {reader:?}, {step}: malformed answer: {source}")]
    Malformed {
        reader: String,
        step: &'static str,
        source: TlvError,
    },
    #[error("reader {reader:?}, {step}: {source}")]
    Apdu {
        reader: String,
        step: &'static str,
        source: ApduError,
    },
    #[error("reader {reader:?}, {step}: answer longer than {MAX_RESPONSE} bytes")]
    ResponseTooLong { reader: String, step: &'static str },
    #[error("reader {reader:?}, {step}: the card announced more data (61xx) and sent none")]
    NoMoreData { reader: String, step: &'static str },
    #[error("reader {reader:?}, {step}: the card's answer took more than {MAX_RESPONSE_ROUNDS} GET RESPONSE rounds")]
    TooManyRounds { reader: String, step: &'static str },
    #[error("reader {reader:?}: PIV application not on the card (SELECT answered 6A82)")]
    NotPiv { reader: String },
    #[error("reader {reader:?}: object {object} is not on the card")]
    ObjectMissing { reader: String, object: Tag },
    #[error("reader {reader:?}: CHUID has no 16-byte GUID (tag 34)")]
    NoGuid { reader: String },
    #[error("reader {reader:?}, slot {slot}: certificate unusable: {reason}")]
    Certificate {
        reader: String,
        slot: Slot,
        reason: String,
    },
    #[error("reader {reader:?}, slot {slot}: signature is not a DER ECDSA signature")]
    SignatureMalformed { reader: String, slot: Slot },
    #[error("reader {reader:?}, slot {slot}: signature over the challenge does not verify")]
    SignatureInvalid { reader: String, slot: Slot },
    #[error("reader {reader:?}: PIN incorrect, {tries_left} tries left")]
    PinIncorrect { reader: String, tries_left: u8 },
    #[error("reader {reader:?}: PIN blocked")]
    PinBlocked { reader: String },
    #[error("reader {reader:?}: PIN required for slot {slot}")]
    PinRequired { reader: String, slot: Slot },
    #[error("reader {reader:?}: the card refused our management key")]
    ManagementKeyRejected { reader: String },
    #[error("reader {reader:?}: the card did not prove knowledge of the management key")]
    CardNotAuthentic { reader: String },
    #[error("management key for {alg:?} must be {expected} bytes, got {got}")]
    ManagementKeyLength {
        alg: Algorithm,
        expected: usize,
        got: usize,
    },
    #[error("reader {reader:?}: patient digest record has version {version}, expected {DIGEST_RECORD_VERSION}")]
    DigestVersion { reader: String, version: u8 },
    #[error("random source failed: {detail}")]
    Random { detail: String },
}

/// A symmetric PIV management key (3DES or AES). Debug never shows the key.
#[derive(Clone)]
pub struct ManagementKey {
    alg: Algorithm,
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ManagementKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ManagementKey({:?}, {} bytes, redacted)",
            self.alg,
            self.key.len()
        )
    }
}

impl ManagementKey {
    /// The factory default of YubiKeys (3DES before firmware 5.7, AES-192 from 5.7, same bytes).
    pub const DEFAULT_BYTES: [u8; 24] = [
        1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
    ];

    pub fn new(alg: Algorithm, key: &[u8]) -> Result<ManagementKey, PivError> {
        let expected = alg.key_len().ok_or(PivError::ManagementKeyLength {
            alg,
            expected: 0,
            got: key.len(),
        })?;
        if key.len() != expected {
            return Err(PivError::ManagementKeyLength {
                alg,
                expected,
                got: key.len(),
            });
        }
        Ok(ManagementKey {
            alg,
            key: Zeroizing::new(key.to_vec()),
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// ECB encryption (`encrypt`) or decryption of exactly one block.
    pub fn crypt_block(&self, block: &[u8], encrypt: bool) -> Option<Zeroizing<Vec<u8>>> {
        use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
        if Some(block.len()) != self.alg.block_len() {
            return None;
        }
        let mut buf = Zeroizing::new(block.to_vec());
        macro_rules! run {
            ($cipher:ty) => {{
                let c = <$cipher>::new_from_slice(&self.key).ok()?;
                let b = (&mut buf[..]).try_into().ok()?;
                if encrypt {
                    c.encrypt_block(b)
                } else {
                    c.decrypt_block(b)
                }
            }};
        }
        match self.alg {
            Algorithm::TripleDes => run!(des::TdesEde3),
            Algorithm::Aes128 => run!(aes::Aes128),
            Algorithm::Aes192 => run!(aes::Aes192),
            Algorithm::Aes256 => run!(aes::Aes256),
            Algorithm::EcP256 => return None,
        }
        Some(buf)
    }
}

/// Compares without an early exit on the first differing byte.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Verifies a DER ECDSA P-256 signature over `challenge` taken as a prehashed digest (the way
/// PIV cards sign: GENERAL AUTHENTICATE gets the 32 bytes, not a message to hash).
pub fn verify_challenge(key: &p256::PublicKey, challenge: &[u8; 32], der_signature: &[u8]) -> bool {
    let Ok(sig) = Signature::from_der(der_signature) else {
        return false;
    };
    VerifyingKey::from(key)
        .verify_prehash(challenge, &sig)
        .is_ok()
}

/// The P-256 public key of a DER X.509 certificate (its SubjectPublicKeyInfo must be
/// id-ecPublicKey on prime256v1). The certificate's own signature is not checked: the key is
/// trusted because it was enrolled, not because of who issued the certificate.
pub fn certificate_public_key(cert_der: &[u8]) -> Result<p256::PublicKey, String> {
    use x509_cert::der::{Decode, Encode};
    let cert = x509_cert::Certificate::from_der(cert_der).map_err(|e| format!("X.509 DER: {e}"))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| format!("SubjectPublicKeyInfo: {e}"))?;
    p256::PublicKey::from_public_key_der(&spki).map_err(|e| format!("not a P-256 key: {e}"))
}

/// Builds the patient digest record `53 25 { 80 01 01, 81 20 <digest> }` (inner bytes only,
/// without the 53 wrapper).
pub fn digest_record(digest: &[u8; 32]) -> Vec<u8> {
    let mut inner = Vec::with_capacity(37);
    tlv::encode_into(Tag::from_const(0x80), &[DIGEST_RECORD_VERSION], &mut inner).expect("fits");
    tlv::encode_into(Tag::from_const(0x81), digest, &mut inner).expect("fits");
    inner
}

/// A PIV session on one card.
pub struct PivCard<T: CardTransport> {
    transport: T,
    reader: String,
}

impl<T: CardTransport> std::fmt::Debug for PivCard<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PivCard(reader {:?})", self.reader)
    }
}

impl<T: CardTransport> PivCard<T> {
    /// Wraps a transport and SELECTs the PIV application.
    pub fn open(transport: T) -> Result<PivCard<T>, PivError> {
        let reader = transport.reader().to_owned();
        let mut card = PivCard { transport, reader };
        card.select()?;
        Ok(card)
    }

    pub fn reader(&self) -> &str {
        &self.reader
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    pub fn into_transport(self) -> T {
        self.transport
    }

    fn status_err(&self, step: &'static str, status: Status) -> PivError {
        PivError::Status {
            reader: self.reader.clone(),
            step,
            status,
        }
    }

    fn malformed(&self, step: &'static str, source: TlvError) -> PivError {
        PivError::Malformed {
            reader: self.reader.clone(),
            step,
            source,
        }
    }

    fn send_one(&mut self, step: &'static str, cmd: &Command) -> Result<Response, PivError> {
        // The wire bytes may hold a PIN or a management-key witness: wiped on drop.
        let bytes = Zeroizing::new(cmd.to_bytes().map_err(|source| PivError::Apdu {
            reader: self.reader.clone(),
            step,
            source,
        })?);
        let raw = self
            .transport
            .transmit(&bytes)
            .map_err(|source| PivError::Transport {
                reader: self.reader.clone(),
                step,
                source,
            })?;
        Response::parse(&raw).map_err(|source| PivError::Apdu {
            reader: self.reader.clone(),
            step,
            source,
        })
    }

    /// Sends `cmd` (chained if long), follows `61xx` with GET RESPONSE and `6Cxx` with one resend;
    /// returns the assembled data and the final status (which may be an error status).
    pub fn transceive(&mut self, step: &'static str, cmd: &Command) -> Result<Response, PivError> {
        let blocks = cmd.chained();
        let last = blocks.len() - 1;
        let mut resp = None;
        for (i, block) in blocks.iter().enumerate() {
            let r = self.send_one(step, block)?;
            if i < last && r.status != Status::Ok {
                return Ok(r);
            }
            resp = Some(r);
        }
        let mut resp = resp.expect("at least one block");
        if let Status::WrongLe(n) = resp.status {
            let mut again = blocks[last].clone();
            again.le = Some(if n == 0 { 256 } else { u32::from(n) });
            resp = self.send_one(step, &again)?;
        }
        let mut data = std::mem::take(&mut resp.data);
        let mut status = resp.status;
        let mut rounds = 0;
        while let Status::MoreData(n) = status {
            rounds += 1;
            if rounds > MAX_RESPONSE_ROUNDS {
                data.zeroize();
                return Err(PivError::TooManyRounds {
                    reader: self.reader.clone(),
                    step,
                });
            }
            let r = self.send_one(step, &apdu::get_response(n))?;
            // A card that keeps announcing more and sends nothing would hold the watcher in
            // this loop for good (every other round adds a byte at least, so MAX_RESPONSE
            // bounds the rounds; an empty answer with any other status ends the loop).
            if r.data.is_empty() && matches!(r.status, Status::MoreData(_)) {
                data.zeroize();
                return Err(PivError::NoMoreData {
                    reader: self.reader.clone(),
                    step,
                });
            }
            if data.len() + r.data.len() > MAX_RESPONSE {
                data.zeroize();
                return Err(PivError::ResponseTooLong {
                    reader: self.reader.clone(),
                    step,
                });
            }
            data.extend_from_slice(&r.data);
            status = r.status;
        }
        Ok(Response::new(data, status))
    }

    /// Like [`PivCard::transceive`] but any status other than 9000 is an error.
    fn transceive_ok(&mut self, step: &'static str, cmd: &Command) -> Result<Vec<u8>, PivError> {
        let r = self.transceive(step, cmd)?;
        match r.status {
            Status::Ok => Ok(r.data),
            other => Err(self.status_err(step, other)),
        }
    }

    /// SELECT the PIV application.
    pub fn select(&mut self) -> Result<(), PivError> {
        let r = self.transceive("select PIV", &apdu::select_piv())?;
        match r.status {
            Status::Ok => Ok(()),
            Status::NotFound => Err(PivError::NotPiv {
                reader: self.reader.clone(),
            }),
            other => Err(self.status_err("select PIV", other)),
        }
    }

    /// GET DATA of `obj`; returns the content of the `53` wrapper, `None` if the object is absent.
    pub fn read_object(&mut self, obj: Tag) -> Result<Option<Vec<u8>>, PivError> {
        const STEP: &str = "get data";
        let r = self.transceive(STEP, &apdu::get_data(obj))?;
        match r.status {
            Status::Ok => {}
            Status::NotFound => return Ok(None),
            other => return Err(self.status_err(STEP, other)),
        }
        let outer = tlv::parse_exact(&r.data, Tag::DATA).map_err(|e| self.malformed(STEP, e))?;
        Ok(Some(outer.value.to_vec()))
    }

    /// PUT DATA of `obj` with `inner` wrapped in `53` (needs management key authentication).
    pub fn write_object(&mut self, obj: Tag, inner: &[u8]) -> Result<(), PivError> {
        const STEP: &str = "put data";
        let content = tlv::encode(Tag::DATA, inner).map_err(|e| self.malformed(STEP, e))?;
        let mut data = tlv::encode(Tag::TAG_LIST, &obj.to_bytes()).expect("a tag fits");
        data.extend_from_slice(&content);
        let cmd = Command::new(0x00, apdu::INS_PUT_DATA, 0x3F, 0xFF, data, None);
        self.transceive_ok(STEP, &cmd).map(drop)
    }

    /// The CHUID's 16-byte GUID (tag 34): the card's identity, but a copyable one.
    pub fn guid(&mut self) -> Result<[u8; 16], PivError> {
        let chuid = self
            .read_object(object::CHUID)?
            .ok_or_else(|| PivError::ObjectMissing {
                reader: self.reader.clone(),
                object: object::CHUID,
            })?;
        let guid = tlv::find(&chuid, Tag::from_const(0x34))
            .map_err(|e| self.malformed("read CHUID", e))?;
        guid.value.try_into().map_err(|_| PivError::NoGuid {
            reader: self.reader.clone(),
        })
    }

    /// The DER X.509 certificate of `slot` (tag 70 inside the object; compressed ones refused).
    pub fn certificate(&mut self, slot: Slot) -> Result<Vec<u8>, PivError> {
        let obj = slot
            .certificate_object()
            .ok_or_else(|| PivError::Certificate {
                reader: self.reader.clone(),
                slot,
                reason: "slot has no certificate object".into(),
            })?;
        let content = self
            .read_object(obj)?
            .ok_or_else(|| PivError::ObjectMissing {
                reader: self.reader.clone(),
                object: obj,
            })?;
        let cert = tlv::find(&content, Tag::from_const(0x70))
            .map_err(|e| self.malformed("read certificate", e))?;
        if let Ok(info) = tlv::find(&content, Tag::from_const(0x71)) {
            if info.value.first().is_some_and(|b| b & 0x01 != 0) {
                return Err(PivError::Certificate {
                    reader: self.reader.clone(),
                    slot,
                    reason: "certificate is gzip-compressed (CertInfo 01), not supported".into(),
                });
            }
        }
        Ok(cert.value.to_vec())
    }

    /// The P-256 public key from `slot`'s certificate.
    pub fn public_key(&mut self, slot: Slot) -> Result<p256::PublicKey, PivError> {
        let der = self.certificate(slot)?;
        certificate_public_key(&der).map_err(|reason| PivError::Certificate {
            reader: self.reader.clone(),
            slot,
            reason,
        })
    }

    /// GENERAL AUTHENTICATE: `slot` signs `challenge`; returns the DER ECDSA signature.
    pub fn sign(&mut self, slot: Slot, challenge: &[u8; 32]) -> Result<Vec<u8>, PivError> {
        const STEP: &str = "general authenticate";
        let r = self.transceive(STEP, &apdu::sign_challenge(slot, challenge))?;
        match r.status {
            Status::Ok => {}
            Status::SecurityNotSatisfied if slot == Slot::Authentication9A => {
                return Err(PivError::PinRequired {
                    reader: self.reader.clone(),
                    slot,
                })
            }
            other => return Err(self.status_err(STEP, other)),
        }
        let tmpl = tlv::parse_exact(&r.data, Tag::DYN_AUTH).map_err(|e| self.malformed(STEP, e))?;
        let sig = tmpl
            .child(Tag::from_const(0x82))
            .map_err(|e| self.malformed(STEP, e))?;
        Ok(sig.value.to_vec())
    }

    /// Challenge–response against an enrolled key: draws a fresh random challenge, has `slot`
    /// sign it and verifies the signature with `enrolled`. The challenge is never reused, so a
    /// recorded answer or a copied CHUID gets nowhere.
    pub fn authenticate(&mut self, slot: Slot, enrolled: &p256::PublicKey) -> Result<(), PivError> {
        let mut challenge = [0u8; 32];
        getrandom::getrandom(&mut challenge).map_err(|e| PivError::Random {
            detail: e.to_string(),
        })?;
        self.authenticate_with(slot, enrolled, &challenge)
    }

    /// [`PivCard::authenticate`] with a caller-chosen challenge (tests; callers must never reuse one).
    pub fn authenticate_with(
        &mut self,
        slot: Slot,
        enrolled: &p256::PublicKey,
        challenge: &[u8; 32],
    ) -> Result<(), PivError> {
        let sig = self.sign(slot, challenge)?;
        if Signature::from_der(&sig).is_err() {
            return Err(PivError::SignatureMalformed {
                reader: self.reader.clone(),
                slot,
            });
        }
        if verify_challenge(enrolled, challenge, &sig) {
            Ok(())
        } else {
            Err(PivError::SignatureInvalid {
                reader: self.reader.clone(),
                slot,
            })
        }
    }

    /// VERIFY the application PIN (needed before 9A signs).
    pub fn verify_pin(&mut self, pin: &[u8]) -> Result<(), PivError> {
        const STEP: &str = "verify PIN";
        let cmd = apdu::verify_pin(pin).map_err(|source| PivError::Apdu {
            reader: self.reader.clone(),
            step: STEP,
            source,
        })?;
        let r = self.transceive(STEP, &cmd)?;
        match r.status {
            Status::Ok => Ok(()),
            Status::VerifyFailed { tries_left } => Err(PivError::PinIncorrect {
                reader: self.reader.clone(),
                tries_left,
            }),
            Status::Blocked => Err(PivError::PinBlocked {
                reader: self.reader.clone(),
            }),
            other => Err(self.status_err(STEP, other)),
        }
    }

    /// Mutual authentication with the management key (slot 9B): the card proves it knows the
    /// key (by encrypting our random challenge) and we prove it (by decrypting its witness).
    pub fn authenticate_management(&mut self, key: &ManagementKey) -> Result<(), PivError> {
        const STEP: &str = "management key authentication";
        let alg = key.algorithm();
        let bl = alg.block_len().expect("management keys are symmetric");
        let data = self.transceive_ok(STEP, &apdu::management_witness_request(alg))?;
        let tmpl = tlv::parse_exact(&data, Tag::DYN_AUTH).map_err(|e| self.malformed(STEP, e))?;
        let witness = tmpl
            .child(Tag::from_const(0x80))
            .map_err(|e| self.malformed(STEP, e))?;
        // A witness not one cipher block long is the card's answer at fault (it said 9000),
        // not a status word: named as such.
        let plain = key.crypt_block(witness.value, false).ok_or_else(|| {
            self.malformed(
                STEP,
                TlvError::WrongLength {
                    tag: witness.tag,
                    len: witness.value.len(),
                    expected: bl,
                },
            )
        })?;
        let mut challenge = Zeroizing::new(vec![0u8; bl]);
        getrandom::getrandom(&mut challenge).map_err(|e| PivError::Random {
            detail: e.to_string(),
        })?;
        let r = self.transceive(STEP, &apdu::management_response(alg, &plain, &challenge))?;
        match r.status {
            Status::Ok => {}
            Status::SecurityNotSatisfied | Status::WrongData => {
                return Err(PivError::ManagementKeyRejected {
                    reader: self.reader.clone(),
                })
            }
            other => return Err(self.status_err(STEP, other)),
        }
        let tmpl = tlv::parse_exact(&r.data, Tag::DYN_AUTH).map_err(|e| self.malformed(STEP, e))?;
        let answer = tmpl
            .child(Tag::from_const(0x82))
            .map_err(|e| self.malformed(STEP, e))?;
        let expected = key.crypt_block(&challenge, true).expect("block length");
        if ct_eq(answer.value, &expected) {
            Ok(())
        } else {
            Err(PivError::CardNotAuthentic {
                reader: self.reader.clone(),
            })
        }
    }

    /// The patient manifest digest stored on the card, `None` if never written.
    pub fn read_digest(&mut self) -> Result<Option<[u8; 32]>, PivError> {
        const STEP: &str = "read patient digest";
        let Some(inner) = self.read_object(object::PATIENT_DIGEST)? else {
            return Ok(None);
        };
        let version =
            tlv::find(&inner, Tag::from_const(0x80)).map_err(|e| self.malformed(STEP, e))?;
        if version.value != [DIGEST_RECORD_VERSION] {
            return Err(PivError::DigestVersion {
                reader: self.reader.clone(),
                version: version.value.first().copied().unwrap_or(0),
            });
        }
        let digest =
            tlv::find(&inner, Tag::from_const(0x81)).map_err(|e| self.malformed(STEP, e))?;
        let digest: [u8; 32] = digest.value.try_into().map_err(|_| {
            self.malformed(
                STEP,
                TlvError::WrongLength {
                    tag: digest.tag,
                    len: digest.value.len(),
                    expected: 32,
                },
            )
        })?;
        Ok(Some(digest))
    }

    /// Writes the patient manifest digest (authenticate the management key first).
    pub fn write_digest(&mut self, digest: &[u8; 32]) -> Result<(), PivError> {
        self.write_object(object::PATIENT_DIGEST, &digest_record(digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Answers from a script and records what was sent.
    struct Scripted {
        answers: VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    impl CardTransport for Scripted {
        fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CardError> {
            self.sent.push(apdu.to_vec());
            self.answers.pop_front().ok_or(CardError::Removed {
                reader: "scripted".into(),
            })
        }
        fn reader(&self) -> &str {
            "scripted"
        }
    }

    fn scripted(answers: &[&[u8]]) -> Scripted {
        Scripted {
            answers: answers.iter().map(|a| a.to_vec()).collect(),
            sent: Vec::new(),
        }
    }

    #[test]
    fn get_response_chaining_assembles_data() {
        let mut chuid_inner = Vec::new();
        tlv::encode_into(Tag::from_const(0x34), &[7u8; 16], &mut chuid_inner).unwrap();
        let obj = tlv::encode(Tag::DATA, &chuid_inner).unwrap();
        let (a, b) = obj.split_at(5);
        let mut first = a.to_vec();
        first.extend_from_slice(&[0x61, b.len() as u8]);
        let mut second = b.to_vec();
        second.extend_from_slice(&[0x90, 0x00]);
        let mut card = PivCard::open(scripted(&[&[0x90, 0x00], &first, &second])).unwrap();
        assert_eq!(card.guid().unwrap(), [7u8; 16]);
        let t = card.into_transport();
        assert_eq!(t.sent[2], vec![0x00, 0xC0, 0x00, 0x00, b.len() as u8]);
    }

    /// A card answering a byte at a time is cut off after [`MAX_RESPONSE_ROUNDS`] rounds, not
    /// 65,536 (each a round trip that held the card watcher before presentations had threads
    /// of their own, and still holds the desk).
    #[test]
    fn a_card_dribbling_its_answer_is_cut_off_after_a_bounded_number_of_rounds() {
        let mut answers: Vec<&[u8]> = vec![&[0x90, 0x00]];
        answers.extend(std::iter::repeat_n(&[0x53, 0x61, 0x01][..], 1000));
        let mut card = PivCard::open(scripted(&answers)).unwrap();
        let err = card.guid().unwrap_err();
        assert!(matches!(err, PivError::TooManyRounds { .. }), "{err}");
        assert!(err.to_string().contains("scripted"), "{err}");
        let sent = card.into_transport().sent.len();
        assert_eq!(sent, 2 + MAX_RESPONSE_ROUNDS, "APDUs sent");
    }

    #[test]
    fn a_card_announcing_more_data_and_sending_none_is_refused() {
        let mut card = PivCard::open(scripted(&[
            &[0x90, 0x00],
            &[0x61, 0x01],
            &[0x61, 0x01],
            &[0x61, 0x01],
        ]))
        .unwrap();
        let err = card.guid().unwrap_err();
        assert!(matches!(err, PivError::NoMoreData { .. }), "{err}");
        assert!(err.to_string().contains("scripted"), "{err}");
    }

    #[test]
    fn select_6a82_is_not_piv_and_errors_name_reader() {
        let err = PivCard::open(scripted(&[&[0x6A, 0x82]])).unwrap_err();
        assert!(matches!(err, PivError::NotPiv { .. }));
        assert!(err.to_string().contains("scripted"), "{err}");
    }

    #[test]
    fn digest_record_layout() {
        let rec = tlv::encode(Tag::DATA, &digest_record(&[0xAB; 32])).unwrap();
        assert_eq!(&rec[..7], &[0x53, 0x25, 0x80, 0x01, 0x01, 0x81, 0x20]);
        assert_eq!(rec.len(), 39);
        assert!(rec[7..].iter().all(|&b| b == 0xAB));
    }

    /// A digest object whose tag 81 is there but not 32 bytes long says so, naming reader and
    /// step; before, it was reported as "tag 81 missing".
    #[test]
    fn a_digest_of_the_wrong_length_is_named_as_such_not_as_missing() {
        let answer = [
            0x53, 0x0A, 0x80, 0x01, 0x01, 0x81, 0x05, 1, 2, 3, 4, 5, 0x90, 0x00,
        ];
        let mut card = PivCard::open(scripted(&[&[0x90, 0x00], &answer])).unwrap();
        let err = card.read_digest().unwrap_err().to_string();
        assert!(!err.contains("missing"), "{err}");
        for part in [
            "scripted",
            "read patient digest",
            "tag 81 holds 5 byte(s), not 32",
        ] {
            assert!(err.contains(part), "{err}");
        }
    }

    /// A management-key witness (tag 80) that is not one cipher block, in an answer the card
    /// ended with 9000, is a malformed answer, named as such; before, it was reported as
    /// "card answered 6700 (wrong length)", a status the card never sent.
    #[test]
    fn a_management_witness_of_the_wrong_length_is_not_reported_as_6700() {
        let key = ManagementKey::new(Algorithm::Aes192, &ManagementKey::DEFAULT_BYTES).unwrap();
        let answer = [0x7C, 0x03, 0x80, 0x01, 0xAA, 0x90, 0x00];
        let mut card = PivCard::open(scripted(&[&[0x90, 0x00], &answer])).unwrap();
        let err = card.authenticate_management(&key).unwrap_err();
        assert!(matches!(err, PivError::Malformed { .. }), "{err}");
        let err = err.to_string();
        assert!(
            !err.contains("6700") && !err.contains("wrong length"),
            "{err}"
        );
        for part in [
            "scripted",
            "management key authentication",
            "tag 80 holds 1 byte(s), not 16",
        ] {
            assert!(err.contains(part), "{err}");
        }
    }

    #[test]
    fn pin_statuses_are_typed() {
        let mut card =
            PivCard::open(scripted(&[&[0x90, 0x00], &[0x63, 0xC2], &[0x69, 0x83]])).unwrap();
        assert!(matches!(
            card.verify_pin(b"000000"),
            Err(PivError::PinIncorrect { tries_left: 2, .. })
        ));
        assert!(matches!(
            card.verify_pin(b"000000"),
            Err(PivError::PinBlocked { .. })
        ));
    }

    #[test]
    fn removed_card_mid_exchange_is_transport_error() {
        let mut card = PivCard::open(scripted(&[&[0x90, 0x00]])).unwrap();
        let err = card.guid().unwrap_err();
        assert!(matches!(
            err,
            PivError::Transport {
                source: CardError::Removed { .. },
                ..
            }
        ));
    }

    #[test]
    fn endless_61xx_is_bounded() {
        let chunk: Vec<u8> = std::iter::repeat_n(0u8, 256).chain([0x61, 0x00]).collect();
        let answers: Vec<&[u8]> = std::iter::once(&[0x90u8, 0x00][..])
            .chain(std::iter::repeat_n(&chunk[..], 300))
            .collect();
        let mut card = PivCard::open(scripted(&answers)).unwrap();
        assert!(matches!(
            card.read_object(object::CHUID),
            Err(PivError::ResponseTooLong { .. })
        ));
    }

    #[test]
    fn management_key_block_ciphers_roundtrip_and_check_lengths() {
        for (alg, len) in [
            (Algorithm::TripleDes, 24),
            (Algorithm::Aes128, 16),
            (Algorithm::Aes192, 24),
            (Algorithm::Aes256, 32),
        ] {
            let k = ManagementKey::new(alg, &vec![0x42; len]).unwrap();
            let bl = alg.block_len().unwrap();
            let block = vec![0x11u8; bl];
            let enc = k.crypt_block(&block, true).unwrap();
            assert_ne!(&enc[..], &block[..]);
            assert_eq!(&k.crypt_block(&enc, false).unwrap()[..], &block[..]);
            assert!(k.crypt_block(&[0u8; 3], true).is_none());
            assert!(!format!("{k:?}").contains("42"));
        }
        assert!(matches!(
            ManagementKey::new(Algorithm::Aes128, &[0; 24]),
            Err(PivError::ManagementKeyLength {
                expected: 16,
                got: 24,
                ..
            })
        ));
        // Known answer: 3DES with all three keys equal is single DES; FIPS 81 / classic vector
        // key 0123456789ABCDEF, plaintext "Now is t" (4E6F772069732074) -> 3FA40E8A984D4815.
        let k1 = [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF];
        let k = ManagementKey::new(Algorithm::TripleDes, &[k1, k1, k1].concat()).unwrap();
        let enc = k.crypt_block(b"Now is t", true).unwrap();
        assert_eq!(&enc[..], &[0x3F, 0xA4, 0x0E, 0x8A, 0x98, 0x4D, 0x48, 0x15]);
    }
}
