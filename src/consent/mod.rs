//! Patient consent: who may read whose genome, and for how long.
//!
//! - [`session`]: consent sessions (grant, expiry, revoke), blocked readers waking at a grant,
//!   hooks that wipe cached plaintext when a session ends, and the audit of each step.
pub mod session;

pub use session::{Audit, Consent, ConsentError, ConsentRegistry, GrantInfo};
