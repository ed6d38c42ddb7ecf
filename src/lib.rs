//! qgenome: genome storage by XOR threshold secret sharing over one-time-pad links.
//!
//! # Layout
//!
//! - [`sharing`]: the Kurihara XOR (k,n) threshold scheme, XOR kernels, randomness sources.
//! - [`keys`]: key sources: pre-shared pool files (and later ETSI GS QKD 014).
//! - [`link`]: one-time-pad + Wegman–Carter sealing of frames, key streams, key ledger.
//! - [`wire`]: byte formats shared with mountd (frame header).
//! - [`cli`]: the `qgenome` subcommands (argument parsing and dispatch only).
//!
//! Byte-level formats and the reasons behind the choices are in `docs/design.md`.
pub mod cli;
pub mod keys;
pub mod link;
pub mod sharing;
pub mod wire;
