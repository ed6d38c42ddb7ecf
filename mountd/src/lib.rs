//! qgenome-mountd: the site's share store.
//!
//! # Layout
//!
//! - [`volume`]: the [`volume::BlockDevice`] boundary; O_DIRECT through an io_uring thread
//!   ([`volume::UringVolume`]) and an in-memory volume with fault injection.
//! - [`layout`]: byte formats of the superblock, share header and index entry (pure).
//! - [`alloc`]: the extent allocator (pure).
//! - [`config`]: the site configuration file (TOML) and size parsing.
//! - [`bench`]: store throughput against fio, and deterministic share contents for tests.
//! - [`store`]: puts, gets, deletes, scrub and index rebuild of shares on a volume.
//! - [`server`]: the share protocol over a Unix socket (plain) and TCP (sealed link frames).
//!
//! Byte formats and the reasons behind the choices are in `docs/design.md` ("mountd").
pub mod alloc;
pub mod bench;
pub mod config;
pub mod layout;
pub mod server;
pub mod store;
pub mod volume;
