//! Byte formats shared between the mount and `qgenome-mountd`. Pure: no I/O, fuzzable.
//!
//! - [`frame`]: the sealed link frame header.
//! - [`msg`]: the share protocol messages (PUT/GET/DELETE/LIST/STAT, replies, errors).
pub mod frame;
pub mod msg;
