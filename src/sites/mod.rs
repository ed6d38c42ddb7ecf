//! The boundary between the home node and the places shares live.
//!
//! A [`ShareSite`] stores and returns share chunks by [`ShareKey`]. The real implementations
//! talk to a `qgenome-mountd` (over a Unix socket at the home site, over a sealed one-time-pad
//! link to remote sites); [`MemSite`] keeps shares in memory and can be told to fail, for tests.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::catalog::{merkle::hex, FileId};

pub mod mountd;
pub use mountd::{LinkKeys, MountdSite};

/// Identifies one share of one chunk of one file version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShareKey {
    pub file: FileId,
    pub chunk: u64,
    pub share: u8,
}

impl std::fmt::Display for ShareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "file {} chunk {} share {}",
            hex(&self.file),
            self.chunk,
            self.share
        )
    }
}

/// What a site records beside a share so that a lost catalog can be rebuilt from the sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareMeta {
    pub k: u8,
    pub n: u8,
    /// Plaintext bytes of the chunk the share belongs to.
    pub secret_len: u32,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SiteError {
    #[error("site {site}: unreachable: {reason}")]
    Unreachable { site: String, reason: String },
    #[error("site {site}: no {key}")]
    NotFound { site: String, key: ShareKey },
    #[error("site {site}: {key} is damaged: {reason}")]
    Damaged {
        site: String,
        key: ShareKey,
        reason: String,
    },
    #[error("site {site}: volume full ({reason})")]
    Full { site: String, reason: String },
    #[error("site {site}: link {link} is out of key material ({reason})")]
    KeyExhausted {
        site: String,
        link: String,
        reason: String,
    },
    #[error("site {site}: {reason}")]
    Protocol { site: String, reason: String },
}

impl SiteError {
    /// Whether trying another site (or the same one later) can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, SiteError::Unreachable { .. })
    }
}

pub trait ShareSite: Send + Sync {
    fn name(&self) -> &str;
    /// Store a share durably; returns only once the site has acknowledged it.
    fn put(&self, key: &ShareKey, meta: &ShareMeta, data: &[u8]) -> Result<(), SiteError>;
    /// Fetch a share, checked by the site against its stored checksum.
    fn get(&self, key: &ShareKey) -> Result<Vec<u8>, SiteError>;
    fn delete(&self, key: &ShareKey) -> Result<(), SiteError>;
    /// Key material left on the link to this site, if it is behind one (placement prefers
    /// links with more key left).
    fn key_remaining(&self) -> Option<u64> {
        None
    }
    /// What the site reports about itself: capacity, free space, shares held (as JSON, for
    /// `qgenome status`), or `None` if it cannot say.
    fn usage(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Shares in memory, with switches to simulate a site that is down or returns damaged data.
#[derive(Default)]
pub struct MemSite {
    name: String,
    shares: Mutex<HashMap<ShareKey, (ShareMeta, Vec<u8>)>>,
    down: AtomicBool,
    corrupt: AtomicBool,
}

impl std::fmt::Debug for MemSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemSite")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl MemSite {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Self::default()
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Serve every share with one bit flipped (a site that lies without knowing it).
    pub fn set_corrupt(&self, corrupt: bool) {
        self.corrupt.store(corrupt, Ordering::SeqCst);
    }

    pub fn len(&self) -> usize {
        self.shares.lock().expect("memsite").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every stored share's bytes, for leak scans in tests.
    pub fn all_bytes(&self) -> Vec<Vec<u8>> {
        let shares = self.shares.lock().expect("memsite");
        shares.values().map(|(_, d)| d.clone()).collect()
    }

    fn up(&self) -> Result<(), SiteError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(SiteError::Unreachable {
                site: self.name.clone(),
                reason: "site is down (simulated)".into(),
            });
        }
        Ok(())
    }
}

impl ShareSite for MemSite {
    fn name(&self) -> &str {
        &self.name
    }

    fn put(&self, key: &ShareKey, meta: &ShareMeta, data: &[u8]) -> Result<(), SiteError> {
        self.up()?;
        let mut shares = self.shares.lock().expect("memsite");
        shares.insert(*key, (*meta, data.to_vec()));
        Ok(())
    }

    fn get(&self, key: &ShareKey) -> Result<Vec<u8>, SiteError> {
        self.up()?;
        let shares = self.shares.lock().expect("memsite");
        let mut data =
            shares
                .get(key)
                .map(|(_, d)| d.clone())
                .ok_or_else(|| SiteError::NotFound {
                    site: self.name.clone(),
                    key: *key,
                })?;
        if self.corrupt.load(Ordering::SeqCst) && !data.is_empty() {
            data[0] ^= 1;
        }
        Ok(data)
    }

    fn delete(&self, key: &ShareKey) -> Result<(), SiteError> {
        self.up()?;
        self.shares.lock().expect("memsite").remove(key);
        Ok(())
    }
}
