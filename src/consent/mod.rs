//! Patient consent: who may read whose genome, and for how long, proven by their smart card.
//!
//! - [`session`]: consent sessions (grant, expiry, revoke), blocked readers waking at a grant,
//!   hooks that wipe cached plaintext when a session ends, and the audit of each step.
//! - [`tlv`]: BER-TLV encode/decode (pure).
//! - [`apdu`]: command builders, response and status parsing (pure).
//! - [`piv`]: PIV card logic over the [`piv::CardTransport`] trait: GUID, certificates,
//!   challenge–response, PIN, management key, patient digest object.
//! - [`card`]: the PC/SC transport with context re-establishment after pcscd restarts.
//! - [`watcher`]: one card presentation ([`watcher::present`]) and the PC/SC watcher thread
//!   that grants consent when an enrolled card authenticates and ends it on removal.
//! - [`enroll`]: enroll, seal, revoke and PIN entry, and the control-socket handler for them.
//!
//! Byte layouts and the reasons behind them: `docs/design.md` ("Patient smart cards").
pub mod apdu;
pub mod card;
pub mod enroll;
pub mod piv;
pub mod session;
pub mod tlv;
pub mod watcher;

pub use card::{Backoff, PcscCard, PcscClient};
pub use enroll::{card_handler, CardReaders, PcscReaders};
pub use piv::{CardError, CardTransport, ManagementKey, PivCard, PivError};
pub use session::{Audit, Consent, ConsentError, ConsentRegistry, GrantInfo, MAX_GRANT_MINUTES};
pub use watcher::{CardConsent, ConsentMode, WatchEvent, WatcherConfig, WatcherHandle};
