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
    #[error("site {site}: link {link}: cannot open its key material: {reason}")]
    Link {
        site: String,
        link: String,
        reason: String,
    },
    #[error("site {site}: {reason}")]
    Protocol { site: String, reason: String },
}

pub trait ShareSite: Send + Sync {
    fn name(&self) -> &str;
    /// Store a share durably; returns only once the site has acknowledged it.
    fn put(&self, key: &ShareKey, meta: &ShareMeta, data: &[u8]) -> Result<(), SiteError>;
    /// Fetch a share, checked by the site against its stored checksum.
    fn get(&self, key: &ShareKey) -> Result<Vec<u8>, SiteError>;
    /// [`get`](Self::get) into `out` (resized to the share), so that a caller can reuse one
    /// buffer for many shares. On error `out`'s contents are unspecified.
    fn get_into(&self, key: &ShareKey, out: &mut Vec<u8>) -> Result<(), SiteError> {
        *out = self.get(key)?;
        Ok(())
    }
    fn delete(&self, key: &ShareKey) -> Result<(), SiteError>;
    /// One page of the shares the site holds, in key order (file id, chunk, share), strictly
    /// after `after` (from the start if None), and where the next page starts (None: no
    /// more). Used to rebuild a lost catalog; see [`list_all`].
    fn list_shares(&self, after: Option<ShareKey>) -> Result<SharePage, SiteError>;
    /// As [`ShareSite::list_shares`], for a caller that wants only the shares of file `id`
    /// (it stops at the first key of another file): a site that can filters at its end, so
    /// that such a listing does not carry, and spend link key on, other files' keys.
    fn list_shares_of(
        &self,
        id: &[u8; 16],
        after: Option<ShareKey>,
    ) -> Result<SharePage, SiteError> {
        let _ = id;
        self.list_shares(after)
    }
    /// Key material left on the link to this site for what the home sends (a PUT's share
    /// spends it), if the site is behind a link.
    fn key_remaining(&self) -> Option<u64> {
        None
    }
    /// Key material left on the link for what the site sends back (a GET's share spends
    /// it), if the site is behind a link: reads prefer the links with more of it left.
    fn reply_key_remaining(&self) -> Option<u64> {
        None
    }
    /// What the site reports about itself: capacity, free space, shares held (as JSON, for
    /// `qgenome status`), or `None` if it cannot say.
    fn usage(&self) -> Option<serde_json::Value> {
        None
    }
    /// The site's volume size and free space in bytes, or `None` if it cannot say (down).
    fn space(&self) -> Option<(u64, u64)> {
        None
    }
    /// Completes the destruction of the link key used so far and makes it durable: a process
    /// about to exit calls it, or that key stays readable on disk until the link's next
    /// opening (the destroyer holds small used ranges back a while to punch them together).
    fn flush_link(&self) -> Result<(), SiteError> {
        Ok(())
    }
}

/// A page of a site's share listing: entries, and the key the next page starts after.
pub type SharePage = (Vec<(ShareKey, ShareMeta)>, Option<ShareKey>);

/// Checks a page a site listed after `after`: its keys strictly increasing past `after`, and
/// a next page, if any, starting after its last key. A page that breaks this (a broken or
/// hostile site) is a protocol error naming the site: else a listing could go round for ever.
pub fn check_page(
    site: &dyn ShareSite,
    after: Option<ShareKey>,
    page: &SharePage,
) -> Result<(), SiteError> {
    let (entries, next) = page;
    let bad = |reason: String| {
        Err(SiteError::Protocol {
            site: site.name().to_string(),
            reason,
        })
    };
    let mut last = after;
    for (k, _) in entries {
        if let Some(l) = last.filter(|l| k <= l) {
            return bad(format!("listing goes back to {k} after {l}"));
        }
        last = Some(*k);
    }
    match next {
        Some(n) if entries.is_empty() || Some(*n) != last => bad(format!(
            "listing's next page starts after {n}, not after its last key"
        )),
        _ => Ok(()),
    }
}

/// Walk a site's whole listing page by page, handing each entry to `each`, which may stop
/// the walk with an error: a site that pages for ever, every page well formed, is stopped
/// only by its caller's bound on what that site could hold (see the catalog rebuild's).
pub fn list_all(
    site: &dyn ShareSite,
    mut each: impl FnMut(ShareKey, ShareMeta) -> Result<(), SiteError>,
) -> Result<(), SiteError> {
    let mut after = None;
    loop {
        let page = site.list_shares(after)?;
        check_page(site, after, &page)?;
        let (entries, next) = page;
        for (k, m) in entries {
            each(k, m)?;
        }
        match next {
            Some(n) => after = Some(n),
            None => return Ok(()),
        }
    }
}

/// Entries per page of [`MemSite`]'s listing (small, so paging is exercised by tests).
const MEM_PAGE: usize = 64;

/// Shares in memory, with switches to simulate a site that is down or returns damaged data.
#[derive(Default)]
pub struct MemSite {
    name: String,
    shares: Mutex<HashMap<ShareKey, (ShareMeta, Vec<u8>)>>,
    down: AtomicBool,
    corrupt: AtomicBool,
    short: AtomicBool,
    /// Milliseconds every put takes first (a slow site).
    put_delay_ms: std::sync::atomic::AtomicU64,
    /// Milliseconds every delete takes first.
    delete_delay_ms: std::sync::atomic::AtomicU64,
    /// Most shares held (0: no limit), as a volume's size would bound them.
    capacity: std::sync::atomic::AtomicUsize,
}

/// Sleep for the milliseconds `ms` holds, if any (a [`MemSite`]'s slowness).
fn pause(ms: &std::sync::atomic::AtomicU64) {
    let ms = ms.load(Ordering::SeqCst);
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
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

    /// Serve every share a byte short (a site that answers with the wrong length).
    pub fn set_short(&self, short: bool) {
        self.short.store(short, Ordering::SeqCst);
    }

    /// Make every put take `delay` first (a slow site or link).
    pub fn set_put_delay(&self, delay: std::time::Duration) {
        self.put_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Make every delete take `delay` first.
    pub fn set_delete_delay(&self, delay: std::time::Duration) {
        self.delete_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Hold at most `shares` shares (0: no limit); a put of a new key past it fails as a
    /// full volume does.
    pub fn set_capacity(&self, shares: usize) {
        self.capacity.store(shares, Ordering::SeqCst);
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
        pause(&self.put_delay_ms);
        let mut shares = self.shares.lock().expect("memsite");
        let cap = self.capacity.load(Ordering::SeqCst);
        if cap > 0 && shares.len() >= cap && !shares.contains_key(key) {
            return Err(SiteError::Full {
                site: self.name.clone(),
                reason: format!("no room for {key}: {cap} shares held (simulated)"),
            });
        }
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
        if self.short.load(Ordering::SeqCst) {
            data.pop();
        }
        Ok(data)
    }

    /// A nominal 1 TiB, less the bytes held (and, with [`MemSite::set_capacity`], nothing
    /// free once the capacity is reached).
    fn space(&self) -> Option<(u64, u64)> {
        self.up().ok()?;
        const NOMINAL: u64 = 1 << 40;
        let shares = self.shares.lock().expect("memsite");
        let held: u64 = shares.values().map(|(_, d)| d.len() as u64).sum();
        let cap = self.capacity.load(Ordering::SeqCst);
        let full = cap != 0 && shares.len() >= cap;
        Some((NOMINAL, if full { 0 } else { NOMINAL - held }))
    }

    fn delete(&self, key: &ShareKey) -> Result<(), SiteError> {
        self.up()?;
        pause(&self.delete_delay_ms);
        self.shares.lock().expect("memsite").remove(key);
        Ok(())
    }

    fn list_shares(&self, after: Option<ShareKey>) -> Result<SharePage, SiteError> {
        self.up()?;
        let shares = self.shares.lock().expect("memsite");
        let mut keys: Vec<(ShareKey, ShareMeta)> = shares
            .iter()
            .filter(|(k, _)| after.is_none_or(|a| **k > a))
            .map(|(k, (m, _))| (*k, *m))
            .collect();
        keys.sort_by_key(|(k, _)| *k);
        let next = (keys.len() > MEM_PAGE).then(|| keys[MEM_PAGE - 1].0);
        keys.truncate(MEM_PAGE);
        Ok((keys, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site whose listing pages go round (next alternating between two keys), or skip
    /// back: an error naming the site, not a walk for ever.
    #[test]
    fn a_listing_that_goes_round_is_a_protocol_error() {
        struct Round(std::sync::atomic::AtomicU64, bool);
        impl ShareSite for Round {
            fn name(&self) -> &str {
                "round"
            }
            fn put(&self, _: &ShareKey, _: &ShareMeta, _: &[u8]) -> Result<(), SiteError> {
                unreachable!()
            }
            fn get(&self, _: &ShareKey) -> Result<Vec<u8>, SiteError> {
                unreachable!()
            }
            fn delete(&self, _: &ShareKey) -> Result<(), SiteError> {
                unreachable!()
            }
            fn list_shares(&self, _: Option<ShareKey>) -> Result<SharePage, SiteError> {
                let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let k = |chunk| ShareKey {
                    file: [7; 16],
                    chunk,
                    share: 0,
                };
                let m = ShareMeta {
                    k: 2,
                    n: 3,
                    secret_len: 1,
                };
                let c = if self.1 { n % 2 } else { 5 };
                Ok((vec![(k(c), m)], Some(k(c))))
            }
        }
        for alternate in [true, false] {
            let site = Round(Default::default(), alternate);
            let mut seen = 0;
            let e = list_all(&site, |_, _| {
                seen += 1;
                Ok(())
            })
            .expect_err("went round");
            assert!(e.to_string().contains("round"), "{e}");
            assert!(seen <= 2, "{seen} entries taken");
        }
    }

    #[test]
    fn mem_listing_pages_through_every_share_in_key_order() {
        let site = MemSite::new("s");
        let meta = ShareMeta {
            k: 2,
            n: 3,
            secret_len: 1,
        };
        let mut want = Vec::new();
        for f in 0..3u8 {
            for chunk in [0, 1, 70, u64::MAX] {
                for share in 0..50u8 {
                    let key = ShareKey {
                        file: [f; 16],
                        chunk,
                        share,
                    };
                    site.put(&key, &meta, &[1]).unwrap();
                    want.push(key);
                }
            }
        }
        want.sort();
        let mut got = Vec::new();
        list_all(&site, |k, m| {
            assert_eq!(m, meta);
            got.push(k);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, want);
        site.set_down(true);
        assert!(matches!(
            list_all(&site, |_, _| Ok(())),
            Err(SiteError::Unreachable { .. })
        ));
    }
}
