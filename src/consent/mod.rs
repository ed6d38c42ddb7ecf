//! Patient consent: who may read whose genome, and for how long, proven by their smart card.
//!
//! - [`session`]: consent sessions (grant, expiry, revoke), blocked readers waking at a grant,
//!   hooks that wipe cached plaintext when a session ends, and the audit of each step.
//! - [`tlv`]: BER-TLV encode/decode (pure).
//! - [`apdu`]: command builders, response and status parsing (pure).
//! - [`piv`]: PIV card logic over the [`piv::CardTransport`] trait: GUID, certificates,
//!   challenge–response, PIN, management key, patient digest object.
//! - [`card`]: the PC/SC transport with context re-establishment after pcscd restarts.
//!
//! Byte layouts and the reasons behind them: `docs/design/card.md`.
pub mod apdu;
pub mod card;
pub mod piv;
pub mod session;
pub mod tlv;

pub use card::{Backoff, PcscCard, PcscClient};
pub use piv::{CardError, CardTransport, ManagementKey, PivCard, PivError};
pub use session::{Audit, Consent, ConsentError, ConsentRegistry, GrantInfo};
