//! PIV logic against the virtual card in-process (no pcscd): every path of the consent card
//! protocol, including the misbehaving cards.

use qgenome::consent::apdu::{object, Algorithm, Slot, Status};
use qgenome::consent::piv::{CardError, ManagementKey, PivCard, PivError};
use qgenome_tools::vcard::{CardIdentity, CardOptions, MemoryTransport, VirtualCard};

fn card(identity: CardIdentity, opts: CardOptions) -> PivCard<MemoryTransport> {
    PivCard::open(MemoryTransport::new(VirtualCard::new(identity, opts))).unwrap()
}

fn challenge(seed: u8) -> [u8; 32] {
    std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
}

#[test]
fn enrolment_then_challenge_response_succeeds() {
    let id = CardIdentity::generate().unwrap();
    let mut c = card(id.clone(), CardOptions::default());
    assert_eq!(c.guid().unwrap(), id.guid);
    // The certificate object is over 256 bytes, so reading it exercises GET RESPONSE.
    assert!(id.object(object::CERT_9E).unwrap().len() > 256);
    let enrolled = c.public_key(Slot::CardAuthentication9E).unwrap();
    assert_eq!(enrolled, id.public_key_9e());
    c.authenticate(Slot::CardAuthentication9E, &enrolled)
        .unwrap();
    c.authenticate_with(Slot::CardAuthentication9E, &enrolled, &challenge(1))
        .unwrap();
}

#[test]
fn wrong_key_and_bad_signature_are_refused() {
    let id = CardIdentity::generate().unwrap();
    let enrolled = id.public_key_9e();
    for opts in [
        CardOptions {
            wrong_key: true,
            ..CardOptions::default()
        },
        CardOptions {
            bad_signature: true,
            ..CardOptions::default()
        },
    ] {
        let mut c = card(id.clone(), opts.clone());
        // The certificate still carries the enrolled key: only the signature gives it away.
        assert_eq!(c.public_key(Slot::CardAuthentication9E).unwrap(), enrolled);
        let err = c
            .authenticate(Slot::CardAuthentication9E, &enrolled)
            .unwrap_err();
        assert!(
            matches!(err, PivError::SignatureInvalid { .. }),
            "{opts:?}: {err}"
        );
    }
}

#[test]
fn replayed_answer_fails_on_a_fresh_challenge() {
    let id = CardIdentity::generate().unwrap();
    let enrolled = id.public_key_9e();
    let mut genuine = VirtualCard::new(id.clone(), CardOptions::default());
    let mut c = PivCard::open(MemoryTransport::new(VirtualCard::new(
        id.clone(),
        CardOptions::default(),
    )))
    .unwrap();
    c.authenticate_with(Slot::CardAuthentication9E, &enrolled, &challenge(2))
        .unwrap();
    let recorded = c
        .transport_mut()
        .card
        .last_auth_response()
        .unwrap()
        .to_vec();
    drop(genuine.process(&[0]));
    // A clone that only knows the recorded answer (and the public certificate and GUID).
    let mut replayer = card(
        id,
        CardOptions {
            replay: Some(recorded),
            ..CardOptions::default()
        },
    );
    replayer
        .authenticate_with(Slot::CardAuthentication9E, &enrolled, &challenge(2))
        .expect("same challenge: the recorded answer is valid, which is why challenges are fresh");
    let err = replayer
        .authenticate(Slot::CardAuthentication9E, &enrolled)
        .unwrap_err();
    assert!(matches!(err, PivError::SignatureInvalid { .. }), "{err}");
}

#[test]
fn copied_guid_on_another_card_fails() {
    let victim = CardIdentity::generate().unwrap();
    let enrolled = victim.public_key_9e();
    let forged = CardIdentity::generate().unwrap().with_guid(victim.guid);
    let mut c = card(forged, CardOptions::default());
    assert_eq!(c.guid().unwrap(), victim.guid, "GUID is copyable");
    let err = c
        .authenticate(Slot::CardAuthentication9E, &enrolled)
        .unwrap_err();
    assert!(matches!(err, PivError::SignatureInvalid { .. }), "{err}");
}

#[test]
fn slot_9a_needs_pin_and_pin_blocks() {
    let id = CardIdentity::generate().unwrap();
    let key_9a = id.public_key_9a();
    let mut c = card(id, CardOptions::default());
    assert_eq!(c.public_key(Slot::Authentication9A).unwrap(), key_9a);
    assert!(matches!(
        c.authenticate(Slot::Authentication9A, &key_9a),
        Err(PivError::PinRequired { .. })
    ));
    assert!(matches!(
        c.verify_pin(b"654321"),
        Err(PivError::PinIncorrect { tries_left: 2, .. })
    ));
    c.verify_pin(b"123456").unwrap();
    c.authenticate(Slot::Authentication9A, &key_9a).unwrap();
    for left in [2u8, 1] {
        assert!(matches!(
            c.verify_pin(b"000000"),
            Err(PivError::PinIncorrect { tries_left, .. }) if tries_left == left
        ));
    }
    assert!(matches!(
        c.verify_pin(b"000000"),
        Err(PivError::PinBlocked { .. })
    ));
    assert!(matches!(
        c.verify_pin(b"123456"),
        Err(PivError::PinBlocked { .. })
    ));
    assert!(c.authenticate(Slot::Authentication9A, &key_9a).is_err());
}

#[test]
fn digest_write_needs_management_key_3des_and_aes() {
    for (alg, len) in [
        (Algorithm::TripleDes, 24),
        (Algorithm::Aes128, 16),
        (Algorithm::Aes192, 24),
        (Algorithm::Aes256, 32),
    ] {
        let key_bytes: Vec<u8> = (0..len as u8).map(|i| i ^ 0x5A).collect();
        let key = ManagementKey::new(alg, &key_bytes).unwrap();
        let opts = CardOptions {
            management_key: key.clone(),
            ..CardOptions::default()
        };
        let mut c = card(CardIdentity::generate().unwrap(), opts);
        assert_eq!(c.read_digest().unwrap(), None);
        let digest = [0xD1u8; 32];
        let err = c.write_digest(&digest).unwrap_err();
        assert!(
            matches!(
                err,
                PivError::Status {
                    status: Status::SecurityNotSatisfied,
                    ..
                }
            ),
            "{err}"
        );
        let mut wrong = key_bytes.clone();
        // Not bit 0: DES ignores the parity bit of every key byte.
        wrong[0] ^= 0x80;
        let err = c
            .authenticate_management(&ManagementKey::new(alg, &wrong).unwrap())
            .unwrap_err();
        assert!(
            matches!(err, PivError::ManagementKeyRejected { .. }),
            "{alg:?}: {err}"
        );
        c.authenticate_management(&key).unwrap();
        c.write_digest(&digest).unwrap();
        assert_eq!(c.read_digest().unwrap(), Some(digest));
    }
}

#[test]
fn put_data_chains_long_objects_and_state_survives_restart() {
    let key = ManagementKey::new(Algorithm::TripleDes, &ManagementKey::DEFAULT_BYTES).unwrap();
    let mut c = card(CardIdentity::generate().unwrap(), CardOptions::default());
    c.authenticate_management(&key).unwrap();
    let big: Vec<u8> = (0..1200u32).map(|i| (i % 251) as u8).collect();
    let tag = qgenome::consent::tlv::Tag::from_const(0x5FD001);
    c.write_object(tag, &big).unwrap();
    c.write_digest(&[7u8; 32]).unwrap();
    assert_eq!(c.read_object(tag).unwrap().unwrap(), big);
    // Persist and restore the card: keys, GUID and objects survive.
    let state = c.transport_mut().card.identity().to_bytes();
    let restored = CardIdentity::from_bytes(&state, "test state").unwrap();
    let mut again = card(restored.clone(), CardOptions::default());
    assert_eq!(again.read_object(tag).unwrap().unwrap(), big);
    assert_eq!(again.read_digest().unwrap(), Some([7u8; 32]));
    let enrolled = c.public_key(Slot::CardAuthentication9E).unwrap();
    again
        .authenticate(Slot::CardAuthentication9E, &enrolled)
        .unwrap();
    let dbg = format!("{restored:?}");
    assert!(dbg.contains("redacted") && dbg.len() < 120, "{dbg}");
    assert!(CardIdentity::from_bytes(&state[..state.len() - 1], "cut").is_err());
}

#[test]
fn card_removed_mid_exchange_names_the_reader() {
    // APDU 1 SELECT, 2 GET DATA (first 256 bytes, 61xx), 3 GET RESPONSE: removed here.
    let id = CardIdentity::generate().unwrap();
    let t =
        MemoryTransport::new(VirtualCard::new(id.clone(), CardOptions::default())).remove_after(2);
    let mut c = PivCard::open(t).unwrap();
    let err = c.public_key(Slot::CardAuthentication9E).unwrap_err();
    assert!(
        matches!(
            err,
            PivError::Transport {
                source: CardError::Removed { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("in-memory virtual card"), "{err}");
}

#[test]
fn unselected_card_and_unknown_objects() {
    let mut vc = VirtualCard::new(CardIdentity::generate().unwrap(), CardOptions::default());
    let get = qgenome::consent::apdu::get_data(object::CHUID)
        .to_bytes()
        .unwrap();
    assert_eq!(vc.process(&get), vec![0x6D, 0x00], "PIV not selected yet");
    let mut c = card(CardIdentity::generate().unwrap(), CardOptions::default());
    assert_eq!(
        c.read_object(qgenome::consent::tlv::Tag::from_const(0x5FC10B))
            .unwrap(),
        None
    );
}
