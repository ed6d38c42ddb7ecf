//! qgenome: genome storage by XOR threshold secret sharing over one-time-pad links.
//!
//! # Layout
//!
//! - [`sharing`]: the Kurihara XOR (k,n) threshold scheme, XOR kernels, randomness sources.
//! - [`consent`]: patient smart cards: BER-TLV, APDUs, PIV logic, the PC/SC transport.
//! - [`cli`]: the `qgenome` subcommands (argument parsing and dispatch only).
//!
//! Byte-level formats and the reasons behind the choices are in `docs/design.md`.
pub mod cli;
pub mod consent;
pub mod sharing;
