//! qgenome-mountd: the site's share store.
//!
//! # Layout
//!
//! - [`volume`]: the [`volume::BlockDevice`] boundary; O_DIRECT through an io_uring thread
//!   ([`volume::UringVolume`]) and an in-memory volume with fault injection.
//! - [`layout`]: byte formats of the superblock, share header and index entry (pure).
//! - [`alloc`]: the extent allocator (pure).
//! - [`store`]: puts, gets, deletes, scrub and index rebuild of shares on a volume.
//!
//! Byte formats and the reasons behind the choices are in `docs/design/mountd.md`.
pub mod alloc;
pub mod layout;
pub mod store;
pub mod volume;
