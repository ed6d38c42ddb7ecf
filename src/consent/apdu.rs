//! Command and response APDUs (ISO/IEC 7816-4) for PIV: pure builders and parsers, no I/O.
//!
//! Commands are built in the short form (Lc <= 255, Le 00 meaning 256); longer data goes out with
//! command chaining (CLA bit 0x10 on every block but the last). Responses longer than 256 bytes
//! come back as `61xx` and are fetched with GET RESPONSE. The virtual card parses commands with
//! [`Command::parse`], which also accepts the extended form.

use super::tlv::{self, Tag, TlvError};
use thiserror::Error;

/// PIV application identifier (NIST SP 800-73-4), used by SELECT.
pub const PIV_AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00,
];

pub const INS_VERIFY: u8 = 0x20;
pub const INS_GENERAL_AUTHENTICATE: u8 = 0x87;
pub const INS_SELECT: u8 = 0xA4;
pub const INS_GET_RESPONSE: u8 = 0xC0;
pub const INS_GET_DATA: u8 = 0xCB;
pub const INS_PUT_DATA: u8 = 0xDB;
/// CLA bit announcing that more command blocks follow.
pub const CLA_CHAIN: u8 = 0x10;

/// PIV data objects used by qgenome (SP 800-73-4 part 1 table 3).
pub mod object {
    use super::Tag;
    /// Card Holder Unique Identifier; the GUID sits under tag 34.
    pub const CHUID: Tag = Tag::from_const(0x5FC102);
    /// X.509 certificate for Card Authentication (key 9E).
    pub const CERT_9E: Tag = Tag::from_const(0x5FC101);
    /// X.509 certificate for PIV Authentication (key 9A).
    pub const CERT_9A: Tag = Tag::from_const(0x5FC105);
    /// Patient manifest digest: an object tag neither PIV nor Yubico defines ("QG" in the low
    /// bits), inside the 5F0000..5FFFFF range YubiKeys accept for PUT DATA. Why this one:
    /// docs/design.md ("Patient smart cards").
    pub const PATIENT_DIGEST: Tag = Tag::from_const(0x5FD147);
}

/// PIV key references (slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Slot {
    /// PIV Authentication, PIN required.
    Authentication9A,
    /// Card Authentication, no PIN, usable contactless.
    CardAuthentication9E,
    /// Card management key (mutual authentication for PUT DATA).
    Management9B,
}

impl Slot {
    pub const fn key_ref(self) -> u8 {
        match self {
            Slot::Authentication9A => 0x9A,
            Slot::CardAuthentication9E => 0x9E,
            Slot::Management9B => 0x9B,
        }
    }
    pub const fn from_key_ref(r: u8) -> Option<Slot> {
        match r {
            0x9A => Some(Slot::Authentication9A),
            0x9E => Some(Slot::CardAuthentication9E),
            0x9B => Some(Slot::Management9B),
            _ => None,
        }
    }
    /// The certificate object of an asymmetric slot.
    pub const fn certificate_object(self) -> Option<Tag> {
        match self {
            Slot::Authentication9A => Some(object::CERT_9A),
            Slot::CardAuthentication9E => Some(object::CERT_9E),
            Slot::Management9B => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02X}", self.key_ref())
    }
}

/// PIV algorithm identifiers (SP 800-78-4 table 6-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// 3-key triple DES (ECB), 24-byte key, 8-byte blocks. The historic default management key.
    TripleDes,
    Aes128,
    Aes192,
    Aes256,
    EcP256,
}

impl Algorithm {
    pub const fn id(self) -> u8 {
        match self {
            Algorithm::TripleDes => 0x03,
            Algorithm::Aes128 => 0x08,
            Algorithm::Aes192 => 0x0A,
            Algorithm::Aes256 => 0x0C,
            Algorithm::EcP256 => 0x11,
        }
    }
    pub const fn from_id(id: u8) -> Option<Algorithm> {
        match id {
            0x03 => Some(Algorithm::TripleDes),
            0x08 => Some(Algorithm::Aes128),
            0x0A => Some(Algorithm::Aes192),
            0x0C => Some(Algorithm::Aes256),
            0x11 => Some(Algorithm::EcP256),
            _ => None,
        }
    }
    /// Block size of a symmetric (management key) algorithm; `None` for EC.
    pub const fn block_len(self) -> Option<usize> {
        match self {
            Algorithm::TripleDes => Some(8),
            Algorithm::Aes128 | Algorithm::Aes192 | Algorithm::Aes256 => Some(16),
            Algorithm::EcP256 => None,
        }
    }
    /// Key length of a symmetric algorithm; `None` for EC.
    pub const fn key_len(self) -> Option<usize> {
        match self {
            Algorithm::TripleDes | Algorithm::Aes192 => Some(24),
            Algorithm::Aes128 => Some(16),
            Algorithm::Aes256 => Some(32),
            Algorithm::EcP256 => None,
        }
    }
}

/// Why bytes are not a command APDU, or a command cannot be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApduError {
    #[error("command APDU of {len} bytes is shorter than the 4-byte header")]
    TooShort { len: usize },
    #[error("command APDU body of {body} bytes does not match its Lc/Le fields")]
    BadLength { body: usize },
    #[error("response APDU of {len} bytes has no status word")]
    NoStatus { len: usize },
    #[error("command data of {len} bytes does not fit a short APDU (at most 255)")]
    DataTooLong { len: usize },
    #[error("PIN must be 6 to 8 bytes, got {len}")]
    PinLength { len: usize },
    #[error(transparent)]
    Tlv(#[from] TlvError),
}

/// A command APDU. `le`: `None` = no Le field; `Some(n)` = expect up to n bytes (256 encodes as 00).
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    pub cla: u8,
    pub ins: u8,
    pub p1: u8,
    pub p2: u8,
    pub data: Vec<u8>,
    pub le: Option<u32>,
}

impl std::fmt::Debug for Command {
    // The body may hold a PIN, a management-key witness or a challenge: header and length only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Command({:02X} {:02X} {:02X} {:02X}, {} data bytes, le {:?})",
            self.cla,
            self.ins,
            self.p1,
            self.p2,
            self.data.len(),
            self.le
        )
    }
}

impl Drop for Command {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.data);
    }
}

impl Command {
    pub fn new(cla: u8, ins: u8, p1: u8, p2: u8, data: Vec<u8>, le: Option<u32>) -> Command {
        Command {
            cla,
            ins,
            p1,
            p2,
            data,
            le,
        }
    }

    /// Short-form wire bytes. Data must be at most 255 bytes (use [`Command::chained`] beyond).
    pub fn to_bytes(&self) -> Result<Vec<u8>, ApduError> {
        if self.data.len() > 255 {
            return Err(ApduError::DataTooLong {
                len: self.data.len(),
            });
        }
        let mut out = Vec::with_capacity(6 + self.data.len());
        out.extend_from_slice(&[self.cla, self.ins, self.p1, self.p2]);
        if !self.data.is_empty() {
            out.push(self.data.len() as u8);
            out.extend_from_slice(&self.data);
        }
        if let Some(le) = self.le {
            out.push(if le >= 256 { 0 } else { le as u8 });
        }
        Ok(out)
    }

    /// Splits into short APDUs of at most 255 data bytes; every block but the last carries
    /// [`CLA_CHAIN`] and no Le.
    pub fn chained(&self) -> Vec<Command> {
        if self.data.len() <= 255 {
            return vec![self.clone()];
        }
        let blocks: Vec<&[u8]> = self.data.chunks(255).collect();
        let last = blocks.len() - 1;
        blocks
            .into_iter()
            .enumerate()
            .map(|(i, block)| Command {
                cla: if i < last {
                    self.cla | CLA_CHAIN
                } else {
                    self.cla
                },
                ins: self.ins,
                p1: self.p1,
                p2: self.p2,
                data: block.to_vec(),
                le: if i < last { None } else { self.le },
            })
            .collect()
    }

    /// Parses short or extended command APDUs (ISO 7816-4 cases 1 to 4).
    pub fn parse(bytes: &[u8]) -> Result<Command, ApduError> {
        if bytes.len() < 4 {
            return Err(ApduError::TooShort { len: bytes.len() });
        }
        let (cla, ins, p1, p2) = (bytes[0], bytes[1], bytes[2], bytes[3]);
        let body = &bytes[4..];
        let bad = ApduError::BadLength { body: body.len() };
        let (data, le): (&[u8], Option<u32>) = match body.len() {
            0 => (&[], None),
            1 => (
                &[],
                Some(if body[0] == 0 {
                    256
                } else {
                    u32::from(body[0])
                }),
            ),
            _ if body[0] != 0 => {
                let lc = usize::from(body[0]);
                match body.len() - 1 {
                    n if n == lc => (&body[1..], None),
                    n if n == lc + 1 => {
                        let le = body[lc + 1];
                        (
                            &body[1..1 + lc],
                            Some(if le == 0 { 256 } else { u32::from(le) }),
                        )
                    }
                    _ => return Err(bad),
                }
            }
            3 => {
                // Extended case 2: 00 Le1 Le2.
                let le = u32::from(u16::from_be_bytes([body[1], body[2]]));
                (&[], Some(if le == 0 { 65536 } else { le }))
            }
            _ if body.len() >= 3 => {
                let lc = usize::from(u16::from_be_bytes([body[1], body[2]]));
                let rest = &body[3..];
                if lc == 0 {
                    return Err(bad);
                }
                match rest.len() {
                    n if n == lc => (rest, None),
                    n if n == lc + 2 => {
                        let le = u32::from(u16::from_be_bytes([rest[lc], rest[lc + 1]]));
                        (&rest[..lc], Some(if le == 0 { 65536 } else { le }))
                    }
                    _ => return Err(bad),
                }
            }
            _ => return Err(bad),
        };
        Ok(Command::new(cla, ins, p1, p2, data.to_vec(), le))
    }
}

/// SELECT the PIV application: `00 A4 04 00 0B <AID> 00`.
pub fn select_piv() -> Command {
    Command::new(0x00, INS_SELECT, 0x04, 0x00, PIV_AID.to_vec(), Some(256))
}

/// GET DATA for one object: `00 CB 3F FF 05 5C 03 <tag> 00`.
pub fn get_data(object: Tag) -> Command {
    let data = tlv::encode(Tag::TAG_LIST, &object.to_bytes()).expect("a tag fits");
    Command::new(0x00, INS_GET_DATA, 0x3F, 0xFF, data, Some(256))
}

/// GET RESPONSE for the `available` bytes announced by `61xx` (00 = 256 or more).
pub fn get_response(available: u8) -> Command {
    let le = if available == 0 {
        256
    } else {
        u32::from(available)
    };
    Command::new(0x00, INS_GET_RESPONSE, 0x00, 0x00, Vec::new(), Some(le))
}

/// PUT DATA of a whole object (`content` is the `53 L ...` wrapper), chained if long:
/// data field `5C 03 <tag> <content>`.
pub fn put_data(object: Tag, content: &[u8]) -> Vec<Command> {
    let mut data = tlv::encode(Tag::TAG_LIST, &object.to_bytes()).expect("a tag fits");
    data.extend_from_slice(content);
    Command::new(0x00, INS_PUT_DATA, 0x3F, 0xFF, data, None).chained()
}

/// VERIFY the PIV application PIN (key reference 80): ASCII padded with FF to 8 bytes.
pub fn verify_pin(pin: &[u8]) -> Result<Command, ApduError> {
    if !(6..=8).contains(&pin.len()) {
        return Err(ApduError::PinLength { len: pin.len() });
    }
    let mut data = [0xFFu8; 8];
    data[..pin.len()].copy_from_slice(pin);
    let cmd = Command::new(0x00, INS_VERIFY, 0x00, 0x80, data.to_vec(), None);
    zeroize::Zeroize::zeroize(&mut data);
    Ok(cmd)
}

/// VERIFY with no data: asks how many PIN tries remain (answers 63Cx, or 9000 if verified).
pub fn pin_status() -> Command {
    Command::new(0x00, INS_VERIFY, 0x00, 0x80, Vec::new(), None)
}

/// GENERAL AUTHENTICATE asking `slot` to sign `challenge` as a prehashed P-256 digest:
/// `00 87 11 <slot> 26 7C 24 82 00 81 20 <challenge> 00`.
pub fn sign_challenge(slot: Slot, challenge: &[u8; 32]) -> Command {
    let mut inner = vec![0x82, 0x00];
    tlv::encode_into(Tag::from_const(0x81), challenge, &mut inner).expect("32 bytes fit");
    let data = tlv::encode(Tag::DYN_AUTH, &inner).expect("fits");
    Command::new(
        0x00,
        INS_GENERAL_AUTHENTICATE,
        Algorithm::EcP256.id(),
        slot.key_ref(),
        data,
        Some(256),
    )
}

/// Step 1 of management key mutual authentication: ask the card for a witness,
/// `00 87 <alg> 9B 04 7C 02 80 00`.
pub fn management_witness_request(alg: Algorithm) -> Command {
    Command::new(
        0x00,
        INS_GENERAL_AUTHENTICATE,
        alg.id(),
        Slot::Management9B.key_ref(),
        vec![0x7C, 0x02, 0x80, 0x00],
        Some(256),
    )
}

/// Step 2: return the decrypted witness and send our own challenge,
/// `00 87 <alg> 9B L 7C L 80 <b> <witness> 81 <b> <challenge>`; the card answers `7C L 82 <b>
/// <challenge encrypted>`.
pub fn management_response(alg: Algorithm, decrypted_witness: &[u8], challenge: &[u8]) -> Command {
    let mut inner = Vec::with_capacity(4 + decrypted_witness.len() + challenge.len());
    tlv::encode_into(Tag::from_const(0x80), decrypted_witness, &mut inner).expect("fits");
    tlv::encode_into(Tag::from_const(0x81), challenge, &mut inner).expect("fits");
    let data = tlv::encode(Tag::DYN_AUTH, &inner).expect("fits");
    zeroize::Zeroize::zeroize(&mut inner);
    Command::new(
        0x00,
        INS_GENERAL_AUTHENTICATE,
        alg.id(),
        Slot::Management9B.key_ref(),
        data,
        Some(256),
    )
}

/// A status word (SW1 SW2) in typed form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// 9000
    Ok,
    /// 61xx: xx more bytes (00 = 256 or more) to fetch with GET RESPONSE.
    MoreData(u8),
    /// 6Cxx: wrong Le; resend with Le = xx.
    WrongLe(u8),
    /// 63Cx: verification failed, x tries left.
    VerifyFailed { tries_left: u8 },
    /// 6700
    WrongLength,
    /// 6882: secure messaging not supported / 6883 last command of chain expected.
    ChainingError,
    /// 6982: security status not satisfied (PIN, management key, or touch over NFC).
    SecurityNotSatisfied,
    /// 6983: authentication method blocked (PIN blocked).
    Blocked,
    /// 6984: reference data not usable.
    DataInvalid,
    /// 6985: conditions of use not satisfied.
    ConditionsNotSatisfied,
    /// 6A80: incorrect data field.
    WrongData,
    /// 6A81: function not supported.
    FunctionNotSupported,
    /// 6A82: file or application not found (object absent, or PIV not on the card).
    NotFound,
    /// 6A84: not enough memory.
    NotEnoughMemory,
    /// 6A86: incorrect P1/P2.
    WrongP1P2,
    /// 6A88: referenced data (key) not found.
    ReferenceNotFound,
    /// 6D00
    InsNotSupported,
    /// 6E00
    ClaNotSupported,
    /// 6F00 or anything else.
    Other(u16),
}

impl Status {
    pub fn from_sw(sw: u16) -> Status {
        let [sw1, sw2] = sw.to_be_bytes();
        match (sw1, sw2) {
            (0x90, 0x00) => Status::Ok,
            (0x61, n) => Status::MoreData(n),
            (0x6C, n) => Status::WrongLe(n),
            (0x63, n) if n & 0xF0 == 0xC0 => Status::VerifyFailed {
                tries_left: n & 0x0F,
            },
            (0x67, 0x00) => Status::WrongLength,
            (0x68, 0x82..=0x84) => Status::ChainingError,
            (0x69, 0x82) => Status::SecurityNotSatisfied,
            (0x69, 0x83) => Status::Blocked,
            (0x69, 0x84) => Status::DataInvalid,
            (0x69, 0x85) => Status::ConditionsNotSatisfied,
            (0x6A, 0x80) => Status::WrongData,
            (0x6A, 0x81) => Status::FunctionNotSupported,
            (0x6A, 0x82) => Status::NotFound,
            (0x6A, 0x84) => Status::NotEnoughMemory,
            (0x6A, 0x86) => Status::WrongP1P2,
            (0x6A, 0x88) => Status::ReferenceNotFound,
            (0x6D, 0x00) => Status::InsNotSupported,
            (0x6E, 0x00) => Status::ClaNotSupported,
            _ => Status::Other(sw),
        }
    }

    pub fn to_sw(self) -> u16 {
        match self {
            Status::Ok => 0x9000,
            Status::MoreData(n) => 0x6100 | u16::from(n),
            Status::WrongLe(n) => 0x6C00 | u16::from(n),
            Status::VerifyFailed { tries_left } => 0x63C0 | u16::from(tries_left & 0x0F),
            Status::WrongLength => 0x6700,
            Status::ChainingError => 0x6883,
            Status::SecurityNotSatisfied => 0x6982,
            Status::Blocked => 0x6983,
            Status::DataInvalid => 0x6984,
            Status::ConditionsNotSatisfied => 0x6985,
            Status::WrongData => 0x6A80,
            Status::FunctionNotSupported => 0x6A81,
            Status::NotFound => 0x6A82,
            Status::NotEnoughMemory => 0x6A84,
            Status::WrongP1P2 => 0x6A86,
            Status::ReferenceNotFound => 0x6A88,
            Status::InsNotSupported => 0x6D00,
            Status::ClaNotSupported => 0x6E00,
            Status::Other(sw) => sw,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self {
            Status::Ok => "success",
            Status::MoreData(_) => "more data available",
            Status::WrongLe(_) => "wrong Le",
            Status::VerifyFailed { .. } => "verification failed",
            Status::WrongLength => "wrong length",
            Status::ChainingError => "command chaining error",
            Status::SecurityNotSatisfied => "security status not satisfied",
            Status::Blocked => "authentication method blocked",
            Status::DataInvalid => "reference data not usable",
            Status::ConditionsNotSatisfied => "conditions of use not satisfied",
            Status::WrongData => "incorrect data field",
            Status::FunctionNotSupported => "function not supported",
            Status::NotFound => "object or application not found",
            Status::NotEnoughMemory => "not enough memory",
            Status::WrongP1P2 => "incorrect P1/P2",
            Status::ReferenceNotFound => "key reference not found",
            Status::InsNotSupported => "instruction not supported",
            Status::ClaNotSupported => "class not supported",
            Status::Other(_) => "unknown status",
        };
        write!(f, "{:04X} ({what})", self.to_sw())
    }
}

/// A response APDU: data and status.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    pub data: Vec<u8>,
    pub status: Status,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Response({} data bytes, {})",
            self.data.len(),
            self.status
        )
    }
}

impl Response {
    /// Splits wire bytes into data and SW1 SW2.
    pub fn parse(bytes: &[u8]) -> Result<Response, ApduError> {
        if bytes.len() < 2 {
            return Err(ApduError::NoStatus { len: bytes.len() });
        }
        let (data, sw) = bytes.split_at(bytes.len() - 2);
        Ok(Response {
            data: data.to_vec(),
            status: Status::from_sw(u16::from_be_bytes([sw[0], sw[1]])),
        })
    }

    pub fn new(data: Vec<u8>, status: Status) -> Response {
        Response { data, status }
    }

    /// Data followed by SW1 SW2.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() + 2);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.status.to_sw().to_be_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn select_matches_field_notes() {
        assert_eq!(
            select_piv().to_bytes().unwrap(),
            hex("00 A4 04 00 0B A0 00 00 03 08 00 00 10 00 01 00 00")
        );
    }

    #[test]
    fn get_data_matches_field_notes() {
        assert_eq!(
            get_data(object::CHUID).to_bytes().unwrap(),
            hex("00 CB 3F FF 05 5C 03 5F C1 02 00")
        );
        assert_eq!(
            get_data(object::CERT_9E).to_bytes().unwrap(),
            hex("00 CB 3F FF 05 5C 03 5F C1 01 00")
        );
        assert_eq!(
            get_data(object::CERT_9A).to_bytes().unwrap(),
            hex("00 CB 3F FF 05 5C 03 5F C1 05 00")
        );
        assert_eq!(
            get_response(0x20).to_bytes().unwrap(),
            hex("00 C0 00 00 20")
        );
        assert_eq!(get_response(0).to_bytes().unwrap(), hex("00 C0 00 00 00"));
    }

    #[test]
    fn general_authenticate_matches_field_notes() {
        let challenge: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        let mut want = hex("00 87 11 9E 26 7C 24 82 00 81 20");
        want.extend_from_slice(&challenge);
        want.push(0x00);
        assert_eq!(
            sign_challenge(Slot::CardAuthentication9E, &challenge)
                .to_bytes()
                .unwrap(),
            want
        );
        let a = sign_challenge(Slot::Authentication9A, &challenge)
            .to_bytes()
            .unwrap();
        assert_eq!(a[3], 0x9A);
    }

    #[test]
    fn verify_pin_pads_with_ff() {
        assert_eq!(
            verify_pin(b"123456").unwrap().to_bytes().unwrap(),
            hex("00 20 00 80 08 31 32 33 34 35 36 FF FF")
        );
        assert_eq!(
            verify_pin(b"12345").unwrap_err(),
            ApduError::PinLength { len: 5 }
        );
        assert_eq!(pin_status().to_bytes().unwrap(), hex("00 20 00 80"));
    }

    #[test]
    fn management_key_apdus() {
        assert_eq!(
            management_witness_request(Algorithm::TripleDes)
                .to_bytes()
                .unwrap(),
            hex("00 87 03 9B 04 7C 02 80 00 00")
        );
        let cmd = management_response(Algorithm::Aes192, &[0xAA; 16], &[0xBB; 16]);
        let bytes = cmd.to_bytes().unwrap();
        assert_eq!(&bytes[..9], &hex("00 87 0A 9B 26 7C 24 80 10")[..]);
        assert_eq!(bytes[25..27], [0x81, 0x10]);
        assert_eq!(bytes.len(), 5 + 38 + 1);
    }

    #[test]
    fn put_data_chains_long_objects() {
        let content = vec![0x53; 600];
        let cmds = put_data(object::PATIENT_DIGEST, &content);
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0].cla, 0x10);
        assert_eq!(cmds[1].cla, 0x10);
        assert_eq!(cmds[2].cla, 0x00);
        assert_eq!(&cmds[0].data[..5], &hex("5C 03 5F D1 47")[..]);
        let total: usize = cmds.iter().map(|c| c.data.len()).sum();
        assert_eq!(total, 605);
        assert!(cmds.iter().all(|c| c.le.is_none()));
        let short = put_data(object::PATIENT_DIGEST, &[0x53, 0x00]);
        assert_eq!(
            short[0].to_bytes().unwrap(),
            hex("00 DB 3F FF 07 5C 03 5F D1 47 53 00")
        );
        let big = Command::new(0, INS_PUT_DATA, 0x3F, 0xFF, vec![0; 256], None);
        assert_eq!(
            big.to_bytes().unwrap_err(),
            ApduError::DataTooLong { len: 256 }
        );
    }

    #[test]
    fn status_words() {
        let cases = [
            (0x9000, Status::Ok),
            (0x6110, Status::MoreData(0x10)),
            (0x6100, Status::MoreData(0)),
            (0x63C2, Status::VerifyFailed { tries_left: 2 }),
            (0x6982, Status::SecurityNotSatisfied),
            (0x6983, Status::Blocked),
            (0x6A82, Status::NotFound),
            (0x6A80, Status::WrongData),
            (0x6D00, Status::InsNotSupported),
            (0x6F00, Status::Other(0x6F00)),
        ];
        for (sw, st) in cases {
            assert_eq!(Status::from_sw(sw), st, "{sw:04X}");
            assert_eq!(st.to_sw(), sw);
        }
        let r = Response::parse(&hex("01 02 61 20")).unwrap();
        assert_eq!(r.data, vec![1, 2]);
        assert_eq!(r.status, Status::MoreData(0x20));
        assert_eq!(r.to_bytes(), hex("01 02 61 20"));
        assert_eq!(
            Response::parse(&[0x90]).unwrap_err(),
            ApduError::NoStatus { len: 1 }
        );
    }

    #[test]
    fn parse_cases() {
        let c = Command::parse(&hex("00 A4 04 00 0B A0 00 00 03 08 00 00 10 00 01 00 00")).unwrap();
        assert_eq!((c.ins, c.data.len(), c.le), (0xA4, 11, Some(256)));
        let c = Command::parse(&hex("00 20 00 80")).unwrap();
        assert_eq!((c.data.len(), c.le), (0, None));
        let c = Command::parse(&hex("00 C0 00 00 20")).unwrap();
        assert_eq!((c.data.len(), c.le), (0, Some(0x20)));
        let c = Command::parse(&hex("00 DB 3F FF 02 53 00")).unwrap();
        assert_eq!((c.data.clone(), c.le), (vec![0x53, 0x00], None));
        let c = Command::parse(&hex("00 CB 3F FF 00 00 02 5C 00 01 00")).unwrap();
        assert_eq!((c.data.clone(), c.le), (vec![0x5C, 0x00], Some(256)));
        assert!(Command::parse(&hex("00 DB 3F FF 05 53 00")).is_err());
        assert_eq!(
            Command::parse(&[0, 1]).unwrap_err(),
            ApduError::TooShort { len: 2 }
        );
    }

    proptest! {
        #[test]
        fn short_roundtrip(cla in 0u8..0x10, ins: u8, p1: u8, p2: u8,
                           data in proptest::collection::vec(any::<u8>(), 0..256),
                           le in proptest::option::of(1u32..=256)) {
            let c = Command::new(cla, ins, p1, p2, data, le);
            let back = Command::parse(&c.to_bytes().unwrap()).unwrap();
            prop_assert_eq!(back, c);
        }

        #[test]
        fn parse_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Command::parse(&bytes);
            let _ = Response::parse(&bytes);
        }
    }
}
