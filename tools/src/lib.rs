//! qgenome developer and operator tools.
//!
//! # Layout
//!
//! - [`vcard`]: a virtual PIV card (keys, CHUID, certificates, PIN, management key, data
//!   objects, misbehaviour switches) and an in-memory `CardTransport` over it.
//! - [`vpcd`]: the vpcd wire protocol that plugs the virtual card into pcscd.
//! - [`harness`]: test harness for the real PC/SC stack (pcscd + virtual card), with guards.
//!
//! Binaries: `qgenome-vcard` (src/bin/qgenome-vcard.rs).
pub mod harness;
pub mod vcard;
pub mod vpcd;
