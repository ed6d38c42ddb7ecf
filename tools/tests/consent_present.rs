//! Presentation, enrollment and sealing in-process, against the virtual card's in-memory
//! transport (no pcscd): the same logic the watcher and the control handler run.

use qgenome::catalog::cards::CardPolicy;
use qgenome::catalog::Catalog;
use qgenome::consent::apdu::Algorithm;
use qgenome::consent::enroll::{enroll, seal, EnrollError};
use qgenome::consent::piv::ManagementKey;
use qgenome::consent::watcher::{present, PinPad, Refusal};
use qgenome_tools::vcard::{CardIdentity, CardOptions, MemoryTransport, VirtualCard};
use zeroize::Zeroizing;

fn card(id: &CardIdentity, opts: CardOptions) -> MemoryTransport {
    MemoryTransport::new(VirtualCard::new(id.clone(), opts))
}

fn catalog() -> (tempfile::TempDir, Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let c = Catalog::open(&dir.path().join("catalog")).unwrap();
    c.add_patient("P0001").unwrap();
    let v = c.begin("P0001", "a.cram", 1 << 20, 2, 3, 0o644).unwrap();
    c.commit(&v.id, 10, [1; 32]).unwrap();
    (dir, c)
}

#[test]
fn presentation_outcomes_in_process() {
    let (_d, cat) = catalog();
    let pins = PinPad::default();
    let id = CardIdentity::generate().unwrap();
    let ok = CardOptions::default;

    let r = present(card(&id, ok()), &cat, &pins).unwrap_err();
    assert_eq!(r.code(), "unknown-card", "{r}");

    // A card that signs with another key than its certificate's is not enrolled.
    let other = CardIdentity::generate().unwrap();
    let r = enroll(
        card(
            &other,
            CardOptions {
                wrong_key: true,
                ..ok()
            },
        ),
        &cat,
        "P0001",
        CardPolicy::CardAuth9E,
    );
    assert!(matches!(r, Err(EnrollError::KeyNotHeld { .. })), "{r:?}");
    assert!(cat.card(&other.guid).unwrap().is_none());

    let b = enroll(card(&id, ok()), &cat, "P0001", CardPolicy::CardAuth9E).unwrap();
    assert_eq!(b.guid, id.guid);
    assert!(matches!(
        enroll(card(&id, ok()), &cat, "P0001", CardPolicy::CardAuth9E),
        Err(EnrollError::Binding(_))
    ));
    let p = present(card(&id, ok()), &cat, &pins).unwrap();
    assert_eq!((p.patient.as_str(), p.guid), ("P0001", id.guid));

    // Misbehaving cards and a copied GUID on another card.
    for opts in [
        CardOptions {
            wrong_key: true,
            ..ok()
        },
        CardOptions {
            bad_signature: true,
            ..ok()
        },
    ] {
        let r = present(card(&id, opts), &cat, &pins).unwrap_err();
        assert_eq!(r.code(), "bad-signature", "{r}");
        assert_eq!(r.patient(), Some("P0001"));
    }
    let copy = CardIdentity::generate().unwrap().with_guid(id.guid);
    assert_eq!(
        present(card(&copy, ok()), &cat, &pins).unwrap_err().code(),
        "bad-signature"
    );
    // Pulled out mid-exchange: a card error naming the reader, no grant.
    let r = present(card(&id, ok()).remove_after(2), &cat, &pins).unwrap_err();
    assert!(matches!(r, Refusal::Card { .. }), "{r}");
    assert!(r.to_string().contains("in-memory virtual card"), "{r}");

    // Seal: the card then carries the digest, and the catalog must keep matching it.
    let mgmt = ManagementKey::new(Algorithm::TripleDes, &ManagementKey::DEFAULT_BYTES).unwrap();
    let mut vc = card(&id, ok());
    let (sealed, digest) = seal(&mut vc, &cat, "P0001", &mgmt, None).unwrap();
    assert_eq!(sealed.sealed_digest, Some(digest));
    assert_eq!(digest, cat.manifest_digest("P0001").unwrap());
    let sealed_card = vc.card.identity().clone();
    present(card(&sealed_card, ok()), &cat, &pins).unwrap();
    // The unsealed card (no digest object) against a sealed binding.
    assert_eq!(
        present(card(&id, ok()), &cat, &pins).unwrap_err().code(),
        "digest-missing"
    );
    let v = cat.begin("P0001", "b.cram", 1 << 20, 2, 3, 0o644).unwrap();
    cat.commit(&v.id, 3, [2; 32]).unwrap();
    assert_eq!(
        present(card(&sealed_card, ok()), &cat, &pins)
            .unwrap_err()
            .code(),
        "manifest-mismatch"
    );
    // A catalog whose binding of the sealed card says "never sealed" (a catalog built to
    // pass, with the public GUID and key copied in) is caught by the card's own digest.
    cat.set_sealed_digest(&id.guid, None).unwrap();
    let r = present(card(&sealed_card, ok()), &cat, &pins).unwrap_err();
    assert!(
        matches!(r, Refusal::DigestUnsealed { .. }) && r.code() == "digest-mismatch",
        "{r}"
    );
    assert!(r.to_string().contains("card seal"), "{r}");
    cat.set_sealed_digest(&id.guid, Some(digest)).unwrap();
    // Seal refuses a card that is not the enrolled one, and the wrong patient.
    assert!(matches!(
        seal(card(&copy, ok()), &cat, "P0001", &mgmt, None),
        Err(EnrollError::NotAuthentic { .. })
    ));
    cat.add_patient("P0002").unwrap();
    assert!(matches!(
        seal(card(&sealed_card, ok()), &cat, "P0002", &mgmt, None),
        Err(EnrollError::WrongPatient { .. })
    ));

    // Revoked.
    cat.revoke_card(&id.guid).unwrap();
    assert_eq!(
        present(card(&id, ok()), &cat, &pins).unwrap_err().code(),
        "revoked"
    );
}

#[test]
fn pin_policy_uses_each_pin_once() {
    let (_d, cat) = catalog();
    let pins = PinPad::default();
    let id = CardIdentity::generate().unwrap();
    let ok = CardOptions::default;
    enroll(card(&id, ok()), &cat, "P0001", CardPolicy::Pin9A).unwrap();
    assert_eq!(
        present(card(&id, ok()), &cat, &pins).unwrap_err().code(),
        "no-pin"
    );
    pins.offer("P0001", Zeroizing::new(b"654321".to_vec()));
    assert_eq!(
        present(card(&id, ok()), &cat, &pins).unwrap_err().code(),
        "pin-refused"
    );
    pins.offer("P0001", Zeroizing::new(b"123456".to_vec()));
    assert!(!format!("{pins:?}").contains("123456"));
    present(card(&id, ok()), &cat, &pins).unwrap();
    assert!(pins.take("P0001").is_none(), "PIN kept after use");
}
