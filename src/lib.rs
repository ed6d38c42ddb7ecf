//! qgenome: genome storage by XOR threshold secret sharing over one-time-pad links.
//!
//! # Layout
//!
//! - [`sharing`]: the Kurihara XOR (k,n) threshold scheme, XOR kernels, randomness sources.
//! - [`catalog`]: the home site's sled catalog (patients, files, chunks, share locations,
//!   audit) and the per-file Merkle tree.
//! - [`cli`]: the `qgenome` subcommands (argument parsing and dispatch only).
//!
//! Byte-level formats and the reasons behind the choices are in `docs/design.md`.
pub mod catalog;
pub mod cli;
pub mod sharing;
