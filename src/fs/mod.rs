//! The `/qgenome` filesystem.
//!
//! - [`engine`]: the data path (split-on-write pipeline, rebuild-on-read, plaintext cache),
//!   independent of FUSE.
//! - [`fuse`]: the FUSE tree `/<patient>/<file>` over the engine (fuser).
//! - [`mount`]: bringing a mount up (catalog, consent, recovery, control socket) and down.
pub mod engine;
pub mod fuse;
pub mod mount;

pub use engine::{Engine, EngineConfig, EngineError, FileWriter, RebuildReport};
pub use fuse::QgenomeFs;
