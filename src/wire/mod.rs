//! Byte formats shared between the mount and `qgenome-mountd`. Pure: no I/O, fuzzable.
pub mod frame;
