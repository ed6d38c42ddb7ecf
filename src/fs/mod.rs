//! The `/qgenome` filesystem.
//!
//! - [`engine`]: the data path (split-on-write pipeline, rebuild-on-read, plaintext cache),
//!   independent of FUSE.
//! - [`fuse`]: the FUSE tree `/<patient>/<file>` over the engine (fuser).
pub mod engine;
pub mod fuse;

pub use engine::{Engine, EngineConfig, EngineError, FileWriter};
pub use fuse::QgenomeFs;
