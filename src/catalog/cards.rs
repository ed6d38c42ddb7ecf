//! Card bindings: which PIV card (by CHUID GUID) gives consent for which patient, with which
//! enrolled public key and policy, and the manifest digest sealed onto the card.
//!
//! Tree `cards`: key = card GUID (16 bytes), value = [`CardBinding`] as JSON. A revoked binding
//! is kept (with `revoked: true`) so the audit trail and `card list` still show it; enrolling
//! the same GUID again replaces a revoked binding, never an active one.
//!
//! [`manifest_digest`](Catalog::manifest_digest) is pure over the catalog's committed file
//! records; its byte layout is in `docs/design.md` ("Patient smart cards").
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{merkle, now_secs, validate_patient, Catalog, CatalogError, Hash};

/// A card's CHUID GUID.
pub type Guid = [u8; 16];

/// Domain separation string that opens every manifest digest (version 1).
pub const MANIFEST_DOMAIN: &[u8] = b"qgenome-manifest-v1\0";

/// How a card proves consent at presentation.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum CardPolicy {
    /// GENERAL AUTHENTICATE with the Card Authentication key (9E): no PIN, works contactless.
    #[serde(rename = "card-auth-9e")]
    CardAuth9E,
    /// VERIFY PIN, then GENERAL AUTHENTICATE with the PIV Authentication key (9A).
    #[serde(rename = "pin-9a")]
    Pin9A,
}

impl CardPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            CardPolicy::CardAuth9E => "card-auth-9e",
            CardPolicy::Pin9A => "pin-9a",
        }
    }

    pub fn parse(s: &str) -> Option<CardPolicy> {
        match s {
            "card-auth-9e" | "9e" | "9E" => Some(CardPolicy::CardAuth9E),
            "pin-9a" | "9a" | "9A" => Some(CardPolicy::Pin9A),
            _ => None,
        }
    }
}

/// One enrolled card. Holds only public data (GUID, public key, digest): no secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CardBinding {
    #[serde(with = "super::hex16")]
    pub guid: Guid,
    pub patient: String,
    /// SEC1 encoding (uncompressed, 65 bytes) of the enrolled P-256 public key of the policy's
    /// slot (9E for `card-auth-9e`, 9A for `pin-9a`), as hex in the JSON record.
    #[serde(with = "hex_vec")]
    pub public_key: Vec<u8>,
    pub policy: CardPolicy,
    /// The manifest digest written onto the card by `card seal`, if any.
    #[serde(default, with = "super::opt_hex32")]
    pub sealed_digest: Option<Hash>,
    /// Seconds since the Unix epoch.
    pub enrolled: u64,
    #[serde(default)]
    pub revoked: bool,
}

impl CardBinding {
    /// The enrolled key, parsed.
    pub fn key(&self) -> Option<p256::PublicKey> {
        p256::PublicKey::from_sec1_bytes(&self.public_key).ok()
    }
}

/// Lowercase hex of any bytes.
pub fn hex(b: &[u8]) -> String {
    merkle::hex(b)
}

/// Parses a 32-hex-digit GUID.
pub fn parse_guid(s: &str) -> Result<Guid> {
    super::unhex::<16>(s).map_err(|reason| CardBindingError::BadGuid {
        guid: s.to_string(),
        reason,
    })
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CardBindingError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("card {guid} is not enrolled")]
    NotEnrolled { guid: String },
    #[error("card {guid} is already enrolled for patient {patient} (revoke it first)")]
    AlreadyEnrolled { guid: String, patient: String },
    #[error("patient {patient} has no enrolled card")]
    NoCardFor { patient: String },
    #[error("card {guid}: public key is not a P-256 SEC1 point")]
    BadKey { guid: String },
    #[error("card GUID {guid:?}: {reason}")]
    BadGuid { guid: String, reason: String },
}

type Result<T> = std::result::Result<T, CardBindingError>;

mod hex_vec {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::super::merkle::hex(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd hex length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// The manifest digest over `(name, size, root)` of committed files, sorted by name bytes.
/// Pure, so tests and the docs can pin its bytes:
///
/// ```text
/// SHA-256( "qgenome-manifest-v1\0"
///          || u32be(len(patient)) || patient
///          || u64be(file count)
///          || for each file, names in ascending byte order:
///               u32be(len(name)) || name || u64be(size) || root (32 bytes) )
/// ```
pub fn manifest_digest_of<'a>(
    patient: &str,
    files: impl IntoIterator<Item = (&'a str, u64, Hash)>,
) -> Hash {
    let mut files: Vec<(&str, u64, Hash)> = files.into_iter().collect();
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = Sha256::new();
    h.update(MANIFEST_DOMAIN);
    h.update((patient.len() as u32).to_be_bytes());
    h.update(patient.as_bytes());
    h.update((files.len() as u64).to_be_bytes());
    for (name, size, root) in files {
        h.update((name.len() as u32).to_be_bytes());
        h.update(name.as_bytes());
        h.update(size.to_be_bytes());
        h.update(root);
    }
    h.finalize().into()
}

impl Catalog {
    fn cards_tree(&self) -> std::result::Result<sled::Tree, CatalogError> {
        self.db.open_tree("cards").map_err(|e| self.db_err(e))
    }

    /// Binds `guid` to `patient` with `public_key` (SEC1) under `policy`; flushes. Refuses a GUID
    /// that is already actively enrolled (revoked bindings are replaced).
    pub fn enroll_card(
        &self,
        guid: &Guid,
        patient: &str,
        public_key: &[u8],
        policy: CardPolicy,
    ) -> Result<CardBinding> {
        validate_patient(patient)?;
        if self.patient(patient)?.is_none() {
            return Err(CatalogError::NoPatient(patient.to_string()).into());
        }
        if p256::PublicKey::from_sec1_bytes(public_key).is_err() {
            return Err(CardBindingError::BadKey { guid: hex(guid) });
        }
        let binding = CardBinding {
            guid: *guid,
            patient: patient.to_string(),
            public_key: public_key.to_vec(),
            policy,
            sealed_digest: None,
            enrolled: now_secs(),
            revoked: false,
        };
        let tree = self.cards_tree()?;
        let old = tree.get(guid).map_err(|e| self.db_err(e))?;
        if let Some(old) = &old {
            let old: CardBinding = self.decode(guid, old)?;
            if !old.revoked {
                return Err(CardBindingError::AlreadyEnrolled {
                    guid: hex(guid),
                    patient: old.patient,
                });
            }
        }
        // Compare-and-swap so two concurrent enrollments cannot both win.
        let swapped = tree
            .compare_and_swap(guid, old, Some(Self::encode(&binding)))
            .map_err(|e| self.db_err(e))?;
        if swapped.is_err() {
            return Err(CardBindingError::AlreadyEnrolled {
                guid: hex(guid),
                patient: "(concurrent enrollment)".into(),
            });
        }
        self.flush()?;
        Ok(binding)
    }

    /// The binding of `guid`, revoked or not.
    pub fn card(&self, guid: &Guid) -> Result<Option<CardBinding>> {
        let tree = self.cards_tree()?;
        match tree.get(guid).map_err(|e| self.db_err(e))? {
            Some(v) => Ok(Some(self.decode(guid, &v)?)),
            None => Ok(None),
        }
    }

    /// Every binding, in GUID order.
    pub fn cards(&self) -> Result<Vec<CardBinding>> {
        let tree = self.cards_tree()?;
        let mut out = Vec::new();
        for item in tree.iter() {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            out.push(self.decode(&k, &v)?);
        }
        Ok(out)
    }

    fn update_card(&self, guid: &Guid, f: impl Fn(&mut CardBinding)) -> Result<CardBinding> {
        let tree = self.cards_tree()?;
        loop {
            let old = tree
                .get(guid)
                .map_err(|e| self.db_err(e))?
                .ok_or_else(|| CardBindingError::NotEnrolled { guid: hex(guid) })?;
            let mut b: CardBinding = self.decode(guid, &old)?;
            f(&mut b);
            let swapped = tree
                .compare_and_swap(guid, Some(old), Some(Self::encode(&b)))
                .map_err(|e| self.db_err(e))?;
            if swapped.is_ok() {
                self.flush()?;
                return Ok(b);
            }
        }
    }

    /// Marks `guid` revoked (kept for the record); returns the binding.
    pub fn revoke_card(&self, guid: &Guid) -> Result<CardBinding> {
        self.update_card(guid, |b| b.revoked = true)
    }

    /// Revokes every active card of `patient`; errors if there was none.
    pub fn revoke_cards_of(&self, patient: &str) -> Result<Vec<CardBinding>> {
        let mut out = Vec::new();
        for b in self.cards()? {
            if b.patient == patient && !b.revoked {
                out.push(self.revoke_card(&b.guid)?);
            }
        }
        if out.is_empty() {
            return Err(CardBindingError::NoCardFor {
                patient: patient.to_string(),
            });
        }
        Ok(out)
    }

    /// Records (or clears) the digest sealed onto `guid`.
    pub fn set_sealed_digest(&self, guid: &Guid, digest: Option<Hash>) -> Result<CardBinding> {
        self.update_card(guid, |b| b.sealed_digest = digest)
    }

    /// The manifest digest of `patient`'s committed files (see [`manifest_digest_of`]). A
    /// committed record without a root (never written by `commit`) counts as 32 zero bytes.
    pub fn manifest_digest(&self, patient: &str) -> Result<Hash> {
        let files = self.files_of(patient)?;
        Ok(manifest_digest_of(
            patient,
            files
                .iter()
                .map(|f| (f.name.as_str(), f.size, f.root.unwrap_or([0; 32]))),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog")).unwrap();
        (dir, c)
    }

    fn key() -> Vec<u8> {
        // A valid P-256 point: the generator.
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        p256::PublicKey::from_secret_scalar(&p256::NonZeroScalar::new(p256::Scalar::ONE).unwrap())
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn enroll_lookup_revoke_and_reenroll() {
        let (_d, c) = cat();
        c.add_patient("P1").unwrap();
        let g = [7u8; 16];
        assert!(matches!(
            c.enroll_card(&g, "P9", &key(), CardPolicy::CardAuth9E),
            Err(CardBindingError::Catalog(CatalogError::NoPatient(_)))
        ));
        assert!(matches!(
            c.enroll_card(&g, "P1", &[4, 1, 2], CardPolicy::CardAuth9E),
            Err(CardBindingError::BadKey { .. })
        ));
        let b = c
            .enroll_card(&g, "P1", &key(), CardPolicy::CardAuth9E)
            .unwrap();
        assert_eq!(c.card(&g).unwrap(), Some(b.clone()));
        assert!(b.key().is_some());
        let err = c
            .enroll_card(&g, "P1", &key(), CardPolicy::Pin9A)
            .unwrap_err();
        assert!(err.to_string().contains(&hex(&g)), "{err}");
        assert!(c.card(&[8; 16]).unwrap().is_none());
        let sealed = c.set_sealed_digest(&g, Some([3; 32])).unwrap();
        assert_eq!(sealed.sealed_digest, Some([3; 32]));
        assert!(c.revoke_card(&g).unwrap().revoked);
        assert!(matches!(
            c.revoke_cards_of("P1"),
            Err(CardBindingError::NoCardFor { .. })
        ));
        let again = c.enroll_card(&g, "P1", &key(), CardPolicy::Pin9A).unwrap();
        assert!(!again.revoked && again.sealed_digest.is_none());
        assert_eq!(c.cards().unwrap().len(), 1);
        assert_eq!(c.revoke_cards_of("P1").unwrap().len(), 1);
        assert!(matches!(
            c.revoke_card(&[9; 16]),
            Err(CardBindingError::NotEnrolled { .. })
        ));
    }

    #[test]
    fn bindings_survive_reopen_as_readable_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        {
            let c = Catalog::open(&path).unwrap();
            c.add_patient("P1").unwrap();
            c.enroll_card(&[1; 16], "P1", &key(), CardPolicy::Pin9A)
                .unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        let b = c.card(&[1; 16]).unwrap().unwrap();
        assert_eq!(b.policy, CardPolicy::Pin9A);
        let json = serde_json::to_string(&b).unwrap();
        assert!(json.contains("\"policy\":\"pin-9a\""), "{json}");
        assert!(json.contains(&"01".repeat(16)), "{json}");
    }

    #[test]
    fn manifest_digest_pins_its_bytes_and_follows_the_catalog() {
        // Known answer computed by hand from the layout in the doc comment.
        let mut h = Sha256::new();
        h.update(b"qgenome-manifest-v1\0");
        h.update([0, 0, 0, 2]);
        h.update(b"P1");
        h.update(1u64.to_be_bytes());
        h.update([0, 0, 0, 1]);
        h.update(b"a");
        h.update(5u64.to_be_bytes());
        h.update([9u8; 32]);
        let want: Hash = h.finalize().into();
        assert_eq!(manifest_digest_of("P1", [("a", 5, [9; 32])]), want);
        // Order-independent input, name-ordered digest; any field changes it.
        let two = manifest_digest_of("P1", [("b", 1, [1; 32]), ("a", 5, [9; 32])]);
        assert_eq!(
            two,
            manifest_digest_of("P1", [("a", 5, [9; 32]), ("b", 1, [1; 32])])
        );
        assert_ne!(
            two,
            manifest_digest_of("P1", [("a", 5, [9; 32]), ("b", 2, [1; 32])])
        );
        assert_ne!(
            two,
            manifest_digest_of("P2", [("a", 5, [9; 32]), ("b", 1, [1; 32])])
        );
        // Length prefixes: moving a byte between name and patient changes the digest.
        assert_ne!(
            manifest_digest_of("P1a", [("b", 1, [1; 32])]),
            manifest_digest_of("P1", [("ab", 1, [1; 32])])
        );

        let (_d, c) = cat();
        c.add_patient("P1").unwrap();
        let empty = c.manifest_digest("P1").unwrap();
        assert_eq!(empty, manifest_digest_of("P1", []));
        let v = c.begin("P1", "a", 1024, 2, 3, 0o600).unwrap();
        assert_eq!(
            c.manifest_digest("P1").unwrap(),
            empty,
            "uncommitted counted"
        );
        c.commit(&v.id, 5, [9; 32]).unwrap();
        assert_eq!(c.manifest_digest("P1").unwrap(), want);
    }
}
