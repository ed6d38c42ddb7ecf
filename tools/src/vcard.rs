//! A virtual PIV card: answers command APDUs the way a YubiKey-like PIV applet does, with
//! switches for misbehaviour. No I/O: the vpcd client ([`crate::vpcd`]) and the in-memory
//! transport ([`MemoryTransport`]) both drive [`VirtualCard::process`].

use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{DerSignature, Signature, SigningKey};
use qgenome::consent::apdu::{self, object, Algorithm, Command, Response, Status};
use qgenome::consent::piv::{ct_eq, CardError, CardTransport, ManagementKey};
use qgenome::consent::tlv::{self, Tag};
use rand_core::{OsRng, RngCore};
use std::collections::BTreeMap;
use thiserror::Error;
use zeroize::Zeroizing;

/// Errors of the virtual card's own state (its state file).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VcardError {
    #[error("virtual card state {what}: {detail}")]
    State { what: String, detail: String },
    #[error("building the self-signed certificate for slot {slot}: {detail}")]
    Certificate { slot: &'static str, detail: String },
}

const STATE_GUID: Tag = Tag::from_const(0xC0);
const STATE_KEY_9E: Tag = Tag::from_const(0xC1);
const STATE_KEY_9A: Tag = Tag::from_const(0xC2);
const STATE_KEY_OTHER: Tag = Tag::from_const(0xC3);
const STATE_OBJECT: Tag = Tag::from_const(0xC4);

/// Largest chained command we accept (certificates are a few KiB).
const MAX_CHAIN: usize = 16 * 1024;

/// What survives a restart: GUID, keys, data objects. Debug never shows key bytes.
#[derive(Clone)]
pub struct CardIdentity {
    pub guid: [u8; 16],
    key_9e: SigningKey,
    key_9a: SigningKey,
    /// The key `--wrong-key` signs with.
    key_other: SigningKey,
    /// Object tag -> the object's bytes as stored (`53 L ...`).
    objects: BTreeMap<u32, Vec<u8>>,
}

impl std::fmt::Debug for CardIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CardIdentity(guid {}, keys redacted, {} objects)",
            hex(&self.guid),
            self.objects.len()
        )
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl CardIdentity {
    /// Fresh random GUID and keys, with CHUID and self-signed certificates for 9E and 9A.
    pub fn generate() -> Result<CardIdentity, VcardError> {
        let mut guid = [0u8; 16];
        OsRng.fill_bytes(&mut guid);
        let mut id = CardIdentity {
            guid,
            key_9e: SigningKey::random(&mut OsRng),
            key_9a: SigningKey::random(&mut OsRng),
            key_other: SigningKey::random(&mut OsRng),
            objects: BTreeMap::new(),
        };
        id.objects.insert(object::CHUID.value(), chuid(&guid));
        let c9e = self_signed_cert(&id.key_9e, "qgenome virtual card 9E")
            .map_err(|detail| VcardError::Certificate { slot: "9E", detail })?;
        let c9a = self_signed_cert(&id.key_9a, "qgenome virtual card 9A")
            .map_err(|detail| VcardError::Certificate { slot: "9A", detail })?;
        id.objects
            .insert(object::CERT_9E.value(), cert_object(&c9e));
        id.objects
            .insert(object::CERT_9A.value(), cert_object(&c9a));
        Ok(id)
    }

    /// The same card with another GUID (to model a copied card number on a different card).
    pub fn with_guid(mut self, guid: [u8; 16]) -> CardIdentity {
        self.guid = guid;
        self.objects.insert(object::CHUID.value(), chuid(&guid));
        self
    }

    /// The stored bytes of a data object (`53 L ...`), if present.
    pub fn object(&self, tag: Tag) -> Option<&[u8]> {
        self.objects.get(&tag.value()).map(Vec::as_slice)
    }

    pub fn public_key_9e(&self) -> p256::PublicKey {
        self.key_9e.verifying_key().into()
    }

    pub fn public_key_9a(&self) -> p256::PublicKey {
        self.key_9a.verifying_key().into()
    }

    /// Serialized state: `C0 10 guid, C1 20 k9E, C2 20 k9A, C3 20 kOther, (C4 L tag3 object)*`.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        tlv::encode_into(STATE_GUID, &self.guid, &mut out).expect("fits");
        for (tag, key) in [
            (STATE_KEY_9E, &self.key_9e),
            (STATE_KEY_9A, &self.key_9a),
            (STATE_KEY_OTHER, &self.key_other),
        ] {
            let bytes = Zeroizing::new(key.to_bytes());
            tlv::encode_into(tag, &bytes, &mut out).expect("fits");
        }
        for (tag, content) in &self.objects {
            let mut rec = tag.to_be_bytes()[1..].to_vec();
            rec.extend_from_slice(content);
            tlv::encode_into(STATE_OBJECT, &rec, &mut out).expect("fits");
        }
        out
    }

    /// Parses [`CardIdentity::to_bytes`]; `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<CardIdentity, VcardError> {
        let err = |detail: String| VcardError::State {
            what: what.to_owned(),
            detail,
        };
        let items = tlv::parse_all(bytes).map_err(|e| err(e.to_string()))?;
        let find = |tag: Tag| {
            items
                .iter()
                .find(|t| t.tag == tag)
                .map(|t| t.value)
                .ok_or_else(|| err(format!("record {tag} missing")))
        };
        let key = |tag: Tag| -> Result<SigningKey, VcardError> {
            SigningKey::from_slice(find(tag)?).map_err(|_| err(format!("record {tag}: bad key")))
        };
        let guid = find(STATE_GUID)?
            .try_into()
            .map_err(|_| err("GUID is not 16 bytes".into()))?;
        let mut objects = BTreeMap::new();
        for t in items.iter().filter(|t| t.tag == STATE_OBJECT) {
            if t.value.len() < 3 {
                return Err(err("object record too short".into()));
            }
            let tag = u32::from_be_bytes([0, t.value[0], t.value[1], t.value[2]]);
            objects.insert(tag, t.value[3..].to_vec());
        }
        Ok(CardIdentity {
            guid,
            key_9e: key(STATE_KEY_9E)?,
            key_9a: key(STATE_KEY_9A)?,
            key_other: key(STATE_KEY_OTHER)?,
            objects,
        })
    }
}

/// CHUID: `53 L { 30 19 FASC-N, 34 10 GUID, 35 08 expiry, 3E 00 signature, FE 00 }`.
fn chuid(guid: &[u8; 16]) -> Vec<u8> {
    let mut inner = Vec::new();
    // FASC-N of all-9s agency code style placeholder (25 bytes): not used by qgenome.
    tlv::encode_into(Tag::from_const(0x30), &[0xD4; 25], &mut inner).expect("fits");
    tlv::encode_into(Tag::from_const(0x34), guid, &mut inner).expect("fits");
    tlv::encode_into(Tag::from_const(0x35), b"20991231", &mut inner).expect("fits");
    tlv::encode_into(Tag::from_const(0x3E), &[], &mut inner).expect("fits");
    tlv::encode_into(Tag::from_const(0xFE), &[], &mut inner).expect("fits");
    tlv::encode(Tag::DATA, &inner).expect("fits")
}

/// Certificate object: `53 L { 70 L <DER>, 71 01 00, FE 00 }`.
pub fn cert_object(der: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    tlv::encode_into(Tag::from_const(0x70), der, &mut inner).expect("fits");
    tlv::encode_into(Tag::from_const(0x71), &[0x00], &mut inner).expect("fits");
    tlv::encode_into(Tag::from_const(0xFE), &[], &mut inner).expect("fits");
    tlv::encode(Tag::DATA, &inner).expect("fits")
}

/// A self-signed X.509 certificate (ecdsa-with-SHA256) for `key`, valid ten years.
pub fn self_signed_cert(key: &SigningKey, cn: &str) -> Result<Vec<u8>, String> {
    use std::str::FromStr;
    use x509_cert::builder::{Builder, CertificateBuilder, Profile};
    use x509_cert::der::Encode;
    use x509_cert::name::Name;
    use x509_cert::serial_number::SerialNumber;
    use x509_cert::spki::SubjectPublicKeyInfoOwned;
    use x509_cert::time::Validity;

    let mut serial = [0u8; 16];
    OsRng.fill_bytes(&mut serial);
    serial[0] &= 0x7F;
    serial[0] |= 0x01;
    let serial = SerialNumber::new(&serial).map_err(|e| e.to_string())?;
    let validity = Validity::from_now(std::time::Duration::from_secs(10 * 365 * 86400))
        .map_err(|e| e.to_string())?;
    let subject = Name::from_str(&format!("CN={cn}")).map_err(|e| e.to_string())?;
    let spki =
        SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).map_err(|e| e.to_string())?;
    let builder = CertificateBuilder::new(Profile::Root, serial, validity, subject, spki, key)
        .map_err(|e| e.to_string())?;
    let cert = builder.build::<DerSignature>().map_err(|e| e.to_string())?;
    cert.to_der().map_err(|e| e.to_string())
}

/// Settings and misbehaviour switches.
#[derive(Clone)]
pub struct CardOptions {
    /// Application PIN (6 to 8 ASCII bytes).
    pub pin: Zeroizing<Vec<u8>>,
    pub pin_tries: u8,
    pub management_key: ManagementKey,
    /// Sign with a key other than the certificate's.
    pub wrong_key: bool,
    /// Corrupt every signature (still well-formed DER).
    pub bad_signature: bool,
    /// Answer every 9E/9A GENERAL AUTHENTICATE with these response data bytes (`7C ...`).
    pub replay: Option<Vec<u8>>,
}

impl std::fmt::Debug for CardOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardOptions")
            .field("pin", &"redacted")
            .field("pin_tries", &self.pin_tries)
            .field("management_key", &self.management_key)
            .field("wrong_key", &self.wrong_key)
            .field("bad_signature", &self.bad_signature)
            .field("replay", &self.replay.as_ref().map(|r| r.len()))
            .finish()
    }
}

impl Default for CardOptions {
    fn default() -> Self {
        CardOptions {
            pin: Zeroizing::new(b"123456".to_vec()),
            pin_tries: 3,
            management_key: ManagementKey::new(Algorithm::TripleDes, &ManagementKey::DEFAULT_BYTES)
                .expect("default key length"),
            wrong_key: false,
            bad_signature: false,
            replay: None,
        }
    }
}

/// The virtual card.
pub struct VirtualCard {
    identity: CardIdentity,
    opts: CardOptions,
    pin_padded: Zeroizing<[u8; 8]>,
    pin_tries_left: u8,
    pin_verified: bool,
    mgmt_authenticated: bool,
    pending_witness: Option<Zeroizing<Vec<u8>>>,
    selected: bool,
    pending_response: Vec<u8>,
    chain: Option<(u8, u8, u8, Vec<u8>)>,
    last_auth_response: Option<Vec<u8>>,
    dirty: bool,
}

impl std::fmt::Debug for VirtualCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VirtualCard({:?}, selected {}, pin verified {}, management authenticated {})",
            self.identity, self.selected, self.pin_verified, self.mgmt_authenticated
        )
    }
}

impl VirtualCard {
    pub fn new(identity: CardIdentity, opts: CardOptions) -> VirtualCard {
        let mut pin_padded = Zeroizing::new([0xFFu8; 8]);
        let n = opts.pin.len().min(8);
        pin_padded[..n].copy_from_slice(&opts.pin[..n]);
        VirtualCard {
            identity,
            pin_tries_left: opts.pin_tries,
            opts,
            pin_padded,
            pin_verified: false,
            mgmt_authenticated: false,
            pending_witness: None,
            selected: false,
            pending_response: Vec::new(),
            chain: None,
            last_auth_response: None,
            dirty: false,
        }
    }

    pub fn identity(&self) -> &CardIdentity {
        &self.identity
    }

    /// The response data of the last 9E/9A GENERAL AUTHENTICATE (for `--record`).
    pub fn last_auth_response(&self) -> Option<&[u8]> {
        self.last_auth_response.as_deref()
    }

    /// True once after a PUT DATA changed an object (the caller persists the identity).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// A T=1 answer-to-reset with historical bytes "qgenome".
    pub fn atr() -> Vec<u8> {
        let hist = b"qgenome";
        let mut atr = vec![0x3B, 0x80 | hist.len() as u8, 0x80, 0x01];
        atr.extend_from_slice(hist);
        let tck = atr[1..].iter().fold(0u8, |a, b| a ^ b);
        atr.push(tck);
        atr
    }

    /// Cold or warm reset: security state is lost, objects and keys stay.
    pub fn reset(&mut self) {
        self.pin_verified = false;
        self.mgmt_authenticated = false;
        self.pending_witness = None;
        self.selected = false;
        self.pending_response.clear();
        self.chain = None;
    }

    /// Answers one command APDU with data + SW1 SW2.
    pub fn process(&mut self, raw: &[u8]) -> Vec<u8> {
        let resp = match Command::parse(raw) {
            Ok(cmd) => self.dispatch(cmd),
            Err(_) => Response::new(Vec::new(), Status::WrongLength),
        };
        resp.to_bytes()
    }

    fn dispatch(&mut self, cmd: Command) -> Response {
        if cmd.ins != apdu::INS_GET_RESPONSE {
            self.pending_response.clear();
        }
        if cmd.cla & !apdu::CLA_CHAIN != 0 {
            return status(Status::ClaNotSupported);
        }
        // Command chaining: collect blocks, run the command on the last one.
        let data = if cmd.cla & apdu::CLA_CHAIN != 0 {
            let buf = match self.chain.take() {
                Some((ins, p1, p2, mut buf)) if (ins, p1, p2) == (cmd.ins, cmd.p1, cmd.p2) => {
                    buf.extend_from_slice(&cmd.data);
                    buf
                }
                _ => cmd.data.clone(),
            };
            if buf.len() > MAX_CHAIN {
                return status(Status::NotEnoughMemory);
            }
            self.chain = Some((cmd.ins, cmd.p1, cmd.p2, buf));
            return status(Status::Ok);
        } else {
            match self.chain.take() {
                Some((ins, p1, p2, mut buf)) if (ins, p1, p2) == (cmd.ins, cmd.p1, cmd.p2) => {
                    buf.extend_from_slice(&cmd.data);
                    buf
                }
                Some(_) => return status(Status::ChainingError),
                None => cmd.data.clone(),
            }
        };
        if data.len() > MAX_CHAIN {
            return status(Status::NotEnoughMemory);
        }
        let le = cmd.le.unwrap_or(256) as usize;
        let full = match cmd.ins {
            apdu::INS_SELECT => self.select(&cmd, &data),
            apdu::INS_GET_RESPONSE => return self.get_response(le),
            _ if !self.selected => status(Status::InsNotSupported),
            apdu::INS_GET_DATA => self.get_data(&cmd, &data),
            apdu::INS_PUT_DATA => self.put_data(&cmd, &data),
            apdu::INS_VERIFY => self.verify(&cmd, &data),
            apdu::INS_GENERAL_AUTHENTICATE => self.general_authenticate(&cmd, &data),
            _ => status(Status::InsNotSupported),
        };
        self.limit(full, le)
    }

    /// Short APDUs carry at most 256 bytes: the rest waits for GET RESPONSE behind `61xx`.
    fn limit(&mut self, resp: Response, le: usize) -> Response {
        let max = le.clamp(1, 256);
        if resp.status != Status::Ok || resp.data.len() <= max {
            return resp;
        }
        let mut data = resp.data;
        self.pending_response = data.split_off(max);
        let left = self.pending_response.len();
        Response::new(
            data,
            Status::MoreData(if left > 255 { 0 } else { left as u8 }),
        )
    }

    fn get_response(&mut self, le: usize) -> Response {
        if self.pending_response.is_empty() {
            return status(Status::ConditionsNotSatisfied);
        }
        let rest = std::mem::take(&mut self.pending_response);
        self.limit(Response::new(rest, Status::Ok), le)
    }

    fn select(&mut self, cmd: &Command, data: &[u8]) -> Response {
        if cmd.p1 != 0x04 {
            return status(Status::WrongP1P2);
        }
        // Accept the full AID or its truncated 9-byte form, as PIV cards do.
        if data.len() < 9 || !apdu::PIV_AID.starts_with(data) {
            self.selected = false;
            return status(Status::NotFound);
        }
        self.reset();
        self.selected = true;
        // Application property template: 61 { 4F <PIX>, 79 { 4F <RID> } }.
        let mut inner = Vec::new();
        tlv::encode_into(Tag::from_const(0x4F), &apdu::PIV_AID[5..], &mut inner).expect("fits");
        let auth = tlv::encode(Tag::from_const(0x4F), &apdu::PIV_AID[..5]).expect("fits");
        tlv::encode_into(Tag::from_const(0x79), &auth, &mut inner).expect("fits");
        Response::new(
            tlv::encode(Tag::from_const(0x61), &inner).expect("fits"),
            Status::Ok,
        )
    }

    fn requested_object(cmd: &Command, data: &[u8]) -> Result<(Tag, usize), Status> {
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF) {
            return Err(Status::WrongP1P2);
        }
        let (list, rest) = tlv::parse_one(data).map_err(|_| Status::WrongData)?;
        if list.tag != Tag::TAG_LIST {
            return Err(Status::WrongData);
        }
        let v = list.value;
        let tag = match v.len() {
            1 => u32::from(v[0]),
            3 => u32::from_be_bytes([0, v[0], v[1], v[2]]),
            _ => return Err(Status::WrongData),
        };
        let tag = Tag::new(tag).ok_or(Status::WrongData)?;
        Ok((tag, data.len() - rest.len()))
    }

    fn get_data(&mut self, cmd: &Command, data: &[u8]) -> Response {
        let (tag, _) = match Self::requested_object(cmd, data) {
            Ok(t) => t,
            Err(s) => return status(s),
        };
        match self.identity.objects.get(&tag.value()) {
            Some(content) => Response::new(content.clone(), Status::Ok),
            None => status(Status::NotFound),
        }
    }

    fn put_data(&mut self, cmd: &Command, data: &[u8]) -> Response {
        if !self.mgmt_authenticated {
            return status(Status::SecurityNotSatisfied);
        }
        let (tag, used) = match Self::requested_object(cmd, data) {
            Ok(t) => t,
            Err(s) => return status(s),
        };
        if !(0x5F_0000..=0x5F_FFFF).contains(&tag.value()) {
            return status(Status::WrongData);
        }
        let content = &data[used..];
        match tlv::parse_exact(content, Tag::DATA) {
            Ok(t) if t.value.is_empty() => {
                // An empty object deletes it, as on YubiKeys.
                self.identity.objects.remove(&tag.value());
            }
            Ok(_) => {
                self.identity.objects.insert(tag.value(), content.to_vec());
            }
            Err(_) => return status(Status::WrongData),
        }
        self.dirty = true;
        status(Status::Ok)
    }

    fn verify(&mut self, cmd: &Command, data: &[u8]) -> Response {
        if (cmd.p1, cmd.p2) != (0x00, 0x80) {
            return status(Status::ReferenceNotFound);
        }
        if self.pin_tries_left == 0 {
            return status(Status::Blocked);
        }
        if data.is_empty() {
            return if self.pin_verified {
                status(Status::Ok)
            } else {
                status(Status::VerifyFailed {
                    tries_left: self.pin_tries_left,
                })
            };
        }
        if data.len() != 8 {
            return status(Status::WrongLength);
        }
        if ct_eq(data, &self.pin_padded[..]) {
            self.pin_tries_left = self.opts.pin_tries;
            self.pin_verified = true;
            status(Status::Ok)
        } else {
            self.pin_verified = false;
            self.pin_tries_left -= 1;
            if self.pin_tries_left == 0 {
                status(Status::Blocked)
            } else {
                status(Status::VerifyFailed {
                    tries_left: self.pin_tries_left,
                })
            }
        }
    }

    fn general_authenticate(&mut self, cmd: &Command, data: &[u8]) -> Response {
        let Ok(tmpl) = tlv::parse_exact(data, Tag::DYN_AUTH) else {
            return status(Status::WrongData);
        };
        let Ok(items) = tmpl.children() else {
            return status(Status::WrongData);
        };
        let get = |t: u32| items.iter().find(|i| i.tag.value() == t).map(|i| i.value);
        match cmd.p2 {
            0x9B => self.management_auth(cmd.p1, get(0x80), get(0x81)),
            0x9E | 0x9A => {
                if cmd.p1 != Algorithm::EcP256.id() {
                    return status(Status::WrongP1P2);
                }
                if cmd.p2 == 0x9A && !self.pin_verified {
                    return status(Status::SecurityNotSatisfied);
                }
                match (get(0x82), get(0x81)) {
                    (Some([]), Some(challenge)) if challenge.len() == 32 => {
                        self.sign(cmd.p2, challenge)
                    }
                    _ => status(Status::WrongData),
                }
            }
            _ => status(Status::ReferenceNotFound),
        }
    }

    fn sign(&mut self, slot: u8, challenge: &[u8]) -> Response {
        if let Some(recorded) = &self.opts.replay {
            return Response::new(recorded.clone(), Status::Ok);
        }
        let key = if self.opts.wrong_key {
            &self.identity.key_other
        } else if slot == 0x9E {
            &self.identity.key_9e
        } else {
            &self.identity.key_9a
        };
        let sig: Signature = match key.sign_prehash(challenge) {
            Ok(s) => s,
            Err(_) => return status(Status::Other(0x6F00)),
        };
        let mut der = sig.to_der().as_bytes().to_vec();
        if self.opts.bad_signature {
            // Flip a bit of s (the last byte): still DER, no longer valid.
            *der.last_mut().expect("non-empty") ^= 0x01;
        }
        let sig_tlv = tlv::encode(Tag::from_const(0x82), &der).expect("fits");
        let out = tlv::encode(Tag::DYN_AUTH, &sig_tlv).expect("fits");
        self.last_auth_response = Some(out.clone());
        Response::new(out, Status::Ok)
    }

    fn management_auth(
        &mut self,
        alg: u8,
        witness: Option<&[u8]>,
        challenge: Option<&[u8]>,
    ) -> Response {
        let key = &self.opts.management_key;
        if alg != key.algorithm().id() {
            return status(Status::WrongP1P2);
        }
        let bl = key.algorithm().block_len().expect("symmetric");
        match (witness, challenge) {
            (Some([]), None) => {
                let mut w = Zeroizing::new(vec![0u8; bl]);
                OsRng.fill_bytes(&mut w);
                let enc = key.crypt_block(&w, true).expect("block length");
                self.pending_witness = Some(w);
                self.mgmt_authenticated = false;
                let inner = tlv::encode(Tag::from_const(0x80), &enc).expect("fits");
                Response::new(
                    tlv::encode(Tag::DYN_AUTH, &inner).expect("fits"),
                    Status::Ok,
                )
            }
            (Some(w), Some(c)) if w.len() == bl && c.len() == bl => {
                let Some(expected) = self.pending_witness.take() else {
                    return status(Status::ConditionsNotSatisfied);
                };
                if !ct_eq(w, &expected) {
                    return status(Status::SecurityNotSatisfied);
                }
                self.mgmt_authenticated = true;
                let enc = key.crypt_block(c, true).expect("block length");
                let inner = tlv::encode(Tag::from_const(0x82), &enc).expect("fits");
                Response::new(
                    tlv::encode(Tag::DYN_AUTH, &inner).expect("fits"),
                    Status::Ok,
                )
            }
            _ => {
                self.pending_witness = None;
                status(Status::WrongData)
            }
        }
    }
}

fn status(s: Status) -> Response {
    Response::new(Vec::new(), s)
}

/// A [`CardTransport`] that calls a [`VirtualCard`] in-process, optionally failing after a
/// number of APDUs (a card pulled out mid-exchange).
pub struct MemoryTransport {
    pub card: VirtualCard,
    reader: String,
    remove_after: Option<usize>,
    sent: usize,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemoryTransport(reader {:?}, {} APDUs sent)",
            self.reader, self.sent
        )
    }
}

impl MemoryTransport {
    pub fn new(card: VirtualCard) -> MemoryTransport {
        MemoryTransport {
            card,
            reader: "in-memory virtual card".into(),
            remove_after: None,
            sent: 0,
        }
    }

    /// After `n` APDUs every transmit fails with [`CardError::Removed`].
    pub fn remove_after(mut self, n: usize) -> MemoryTransport {
        self.remove_after = Some(n);
        self
    }
}

impl CardTransport for MemoryTransport {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, CardError> {
        if self.remove_after.is_some_and(|n| self.sent >= n) {
            return Err(CardError::Removed {
                reader: self.reader.clone(),
            });
        }
        self.sent += 1;
        Ok(self.card.process(apdu))
    }

    fn reader(&self) -> &str {
        &self.reader
    }
}
