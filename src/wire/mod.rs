//! Byte formats shared between the mount and `qgenome-mountd`. Pure: no I/O, fuzzable.
//!
//! - [`frame`]: the sealed link frame header.
//! - [`msg`]: the share protocol messages (PUT/GET/DELETE/LIST/STAT, replies, errors).
pub mod frame;
pub mod msg;

use std::time::Duration;

/// The slowest transfer a deadline allows for, in bytes per second: a request's (at the
/// client) and a frame's or reply's (at the site) deadline moves on by the time its bytes take
/// at this rate, so a slow link still moves a large share while a dripping one is cut (a
/// 16 MiB share: 64 s more).
pub const SLOWEST_LINK: u64 = 256 << 10;

/// The time `bytes` take at [`SLOWEST_LINK`].
pub fn slowest_transfer(bytes: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / SLOWEST_LINK as f64)
}
