//! qgenome-mountd: the site's share store.
//!
//! # Layout
//!
//! - [`volume`]: the [`volume::BlockDevice`] boundary; O_DIRECT through an io_uring thread
//!   ([`volume::UringVolume`]) and an in-memory volume with fault injection.
pub mod volume;
