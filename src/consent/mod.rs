//! Consent: patient smart cards (PIV over PC/SC).
//!
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
pub mod tlv;

pub use card::{Backoff, PcscCard, PcscClient};
pub use piv::{CardError, CardTransport, ManagementKey, PivCard, PivError};
