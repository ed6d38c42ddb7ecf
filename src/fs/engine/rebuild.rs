//! Rebuilding a lost catalog from the sites: listings (which site holds which share of which
//! chunk) plus each version's secret-shared manifest (everything else). See `docs/design.md`,
//! "Catalog rebuild".
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use zeroize::Zeroizing;

use super::{Engine, EngineError};
use crate::catalog::manifest::{self, Manifest, MANIFEST_CHUNK};
use crate::catalog::merkle::hex;
use crate::catalog::{CatalogError, FileId, ShareLocation};
use crate::sharing::k_subsets;
use crate::sites::{list_all, ShareKey, ShareMeta, SiteError};

/// At most this many manifest shares of one version are tried in combination.
const MAX_MANIFEST_SHARES: usize = 16;

/// Most entries one site's listing may give one file id: a site holds one share of each
/// chunk of a version (share i on site i), so at most every chunk a manifest can list, and
/// the manifest (the bound `shares_of` puts on a version's listing).
const MAX_LISTED_PER_FILE: u64 = manifest::MAX_CHUNKS + 1;

/// Most entries the rebuild takes from one site's listing, whatever the site says of its
/// volume. The listing is held in memory (~40 bytes a share), so without a bound one site
/// that pages for ever, every page well formed (made-up keys, each file id under
/// [`MAX_LISTED_PER_FILE`]), runs the rebuild out of memory. 2^26 shares is ~2.7 GB here; at
/// one share per chunk per version it is 64 Mi chunks at a site (64 TiB of genomes at
/// 1 MiB chunks). A site holding more is refused by name, as one that lies is.
const MAX_LISTED_PER_SITE: u64 = 1 << 26;

/// Fewest volume bytes one share takes at a site: its extent is a header block and its bytes
/// (never none) padded to a block, and a block is at least 512 bytes. A site's listing longer
/// than its volume's size over this lists shares it cannot hold.
const MIN_SHARE_EXTENT: u64 = 2 * 512;

/// What [`Engine::rebuild_catalog`] found at the sites and put in the catalog.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RebuildReport {
    /// Patients re-created (those with at least one restored file).
    pub patients: Vec<String>,
    pub restored: Vec<RestoredFile>,
    /// Versions with a valid manifest whose name a later-written version claims (a replaced
    /// or renamed-over version whose shares were not deleted).
    pub superseded: Vec<OrphanVersion>,
    /// Versions with data shares but no manifest: writes never committed (or whose
    /// deletion was interrupted). Not restored.
    pub uncommitted: Vec<OrphanVersion>,
    /// Versions whose manifest no k shares rebuild, or with a chunk held by fewer than k sites.
    pub unreadable: Vec<OrphanVersion>,
    /// Sites whose listing failed ("site: reason"); shares there are not in the catalog.
    pub unreachable_sites: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoredFile {
    /// File id, hex.
    pub id: String,
    pub patient: String,
    pub name: String,
    pub size: u64,
    pub chunks: u64,
    /// Chunks with fewer than n shares found (readable, but with less redundancy).
    pub degraded_chunks: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrphanVersion {
    /// File id, hex.
    pub id: String,
    /// `patient/name`, when a manifest said so.
    pub file: Option<String>,
    /// Shares of this version found at the sites.
    pub shares: usize,
    pub reason: String,
    /// (site index, share key) of every share found, manifest shares first.
    #[serde(skip)]
    pub keys: Vec<(usize, ShareKey)>,
}

/// One share seen in a listing.
#[derive(Debug, Clone, Copy)]
struct Found {
    site: usize,
    share: u8,
    meta: ShareMeta,
}

type Listing = HashMap<FileId, BTreeMap<u64, Vec<Found>>>;

/// How many of `found` each site listed.
fn listed_per_site<'a>(found: impl IntoIterator<Item = &'a Found>) -> BTreeMap<usize, usize> {
    let mut per_site = BTreeMap::new();
    for f in found {
        *per_site.entry(f.site).or_default() += 1;
    }
    per_site
}

fn orphan(
    id: &FileId,
    chunks: &BTreeMap<u64, Vec<Found>>,
    file: Option<String>,
    reason: String,
) -> OrphanVersion {
    let mut keys: Vec<(usize, ShareKey)> = chunks
        .iter()
        .flat_map(|(&chunk, found)| {
            found.iter().map(move |f| {
                (
                    f.site,
                    ShareKey {
                        file: *id,
                        chunk,
                        share: f.share,
                    },
                )
            })
        })
        .collect();
    // Manifest first, so deleting in this order never leaves a manifest without its data.
    keys.sort_by_key(|(_, k)| std::cmp::Reverse(k.chunk == MANIFEST_CHUNK));
    OrphanVersion {
        id: hex(id),
        file,
        shares: keys.len(),
        reason,
        keys,
    }
}

impl Engine {
    /// Fill this engine's (empty) catalog from what the sites hold: every version with a valid
    /// manifest becomes a committed file again (same file id, chunk records with the share
    /// locations found), the latest-written manifest winning a name. Nothing at the sites is
    /// changed; see [`Engine::delete_orphans`].
    pub fn rebuild_catalog(&self) -> Result<RebuildReport, EngineError> {
        if !self.catalog.is_empty() {
            return Err(EngineError::CatalogNotEmpty {
                path: self.catalog.path().display().to_string(),
            });
        }
        self.catalog.set_rebuilding(true)?;
        let mut report = RebuildReport::default();
        let listing = self.list_sites(&mut report);

        let mut valid: Vec<Manifest> = Vec::new();
        let mut ids: Vec<&FileId> = listing.keys().collect();
        ids.sort();
        for id in ids {
            let chunks = &listing[id];
            let Some(found) = chunks.get(&MANIFEST_CHUNK) else {
                report.uncommitted.push(orphan(
                    id,
                    chunks,
                    None,
                    "data shares without a manifest (never committed)".into(),
                ));
                continue;
            };
            let m = match self.read_manifest(id, found) {
                Ok(m) => m,
                Err(reason) => {
                    report.unreadable.push(orphan(id, chunks, None, reason));
                    continue;
                }
            };
            let file = Some(format!("{}/{}", m.patient, m.name));
            // A version is rebuilt with its own (k,n) (`read_manifest` took only shares of
            // the (k,n) the manifest names, and at least the configured k).
            let k = usize::from(m.k);
            let short = m.chunks.iter().enumerate().find_map(|(i, c)| {
                let got = self.locations(chunks.get(&(i as u64)), c.len, &m).len();
                (got < k).then(|| format!("chunk {i}: {got} shares found, {k} needed"))
            });
            if let Some(reason) = short {
                report.unreadable.push(orphan(id, chunks, file, reason));
                continue;
            }
            valid.push(m);
        }

        // Manifests written from now on, by this engine or a mount of this catalog, must sort
        // after every one found: kept first, so a rebuild cut short keeps it too.
        let max_seq = valid.iter().map(|m| m.seq).max().unwrap_or(0);
        self.seq
            .fetch_max(max_seq, std::sync::atomic::Ordering::SeqCst);
        self.catalog.raise_manifest_seq(max_seq)?;
        self.catalog.flush()?;
        let (winners, superseded) = manifest::resolve(valid);
        for m in superseded {
            let reason = "a later-written version has the same name".to_string();
            let file = Some(format!("{}/{}", m.patient, m.name));
            report
                .superseded
                .push(orphan(&m.id, &listing[&m.id], file, reason));
        }
        let patients: BTreeSet<&str> = winners.iter().map(|m| m.patient.as_str()).collect();
        for p in &patients {
            // Manifests carry neither owners nor folder modes: a rebuilt folder is the mount
            // user's and closed to others (0700) until an administrator opens it again, rather
            // than open to every local user (0755) whatever it was before.
            match self.catalog.add_patient_owned(p, None, Some(0o700)) {
                Ok(()) | Err(CatalogError::PatientExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        report.patients = patients.iter().map(|p| p.to_string()).collect();
        for m in &winners {
            let chunks = &listing[&m.id];
            let records =
                m.chunk_records(|i| self.locations(chunks.get(&i), m.chunks[i as usize].len, m));
            let n = usize::from(m.n);
            let degraded = records.iter().filter(|c| c.shares.len() < n).count() as u64;
            self.catalog.restore(&m.file_record(), &records)?;
            self.catalog.audit(
                "rebuild-restore",
                Some(&m.patient),
                Some(&m.name),
                &format!(
                    "file {}, {} bytes, {} chunks ({degraded} degraded)",
                    hex(&m.id),
                    m.size,
                    records.len()
                ),
            );
            report.restored.push(RestoredFile {
                id: hex(&m.id),
                patient: m.patient.clone(),
                name: m.name.clone(),
                size: m.size,
                chunks: records.len() as u64,
                degraded_chunks: degraded,
            });
        }
        self.catalog.audit(
            "rebuild",
            None,
            None,
            &format!(
                "{} files restored, {} superseded, {} uncommitted, {} unreadable, {} sites unreachable",
                report.restored.len(),
                report.superseded.len(),
                report.uncommitted.len(),
                report.unreadable.len(),
                report.unreachable_sites.len()
            ),
        );
        self.catalog.set_rebuilding(false)?;
        Ok(report)
    }

    /// Delete every share of the given versions (manifest first) from the sites that hold
    /// them. Returns how many shares were deleted; failures are logged.
    pub fn delete_orphans(&self, orphans: &[OrphanVersion]) -> usize {
        let mut deleted = 0;
        for o in orphans {
            for (site, key) in &o.keys {
                match self.core.sites[*site].delete(key) {
                    Ok(()) => deleted += 1,
                    Err(e) => tracing::warn!("orphan version {}: deleting {key}: {e}", o.id),
                }
            }
        }
        deleted
    }

    /// Every site's listing, by file id and chunk index. A site whose listing fails, or
    /// passes what it could hold ([`MAX_LISTED_PER_FILE`] entries of one file id, or
    /// [`MAX_LISTED_PER_SITE`] or its volume's worth in all), is reported unreachable and
    /// none of its entries kept: what it listed before is no more to be trusted than the rest.
    fn list_sites(&self, report: &mut RebuildReport) -> Listing {
        let mut listing = Listing::new();
        for (i, site) in self.core.sites.iter().enumerate() {
            let name = site.name();
            let too_many = |reason: String| SiteError::Protocol {
                site: name.to_string(),
                reason,
            };
            // Asked once the site lists something, so that a site down is not waited for twice.
            let bound = || match site.space() {
                Some((size, _)) if size / MIN_SHARE_EXTENT < MAX_LISTED_PER_SITE => (
                    size / MIN_SHARE_EXTENT,
                    format!("its volume of {size} bytes can hold"),
                ),
                _ => (MAX_LISTED_PER_SITE, "a rebuild takes from one site".into()),
            };
            let mut most: Option<(u64, String)> = None;
            let mut seen = 0u64;
            // Keys come in order, so one file id's entries come together: how many so far.
            let mut run: Option<(FileId, u64)> = None;
            let r = list_all(site.as_ref(), |key, meta| {
                seen += 1;
                let (most, holds) = most.get_or_insert_with(bound);
                if seen > *most {
                    return Err(too_many(format!(
                        "lists more than {most} shares, more than {holds}"
                    )));
                }
                match &mut run {
                    Some((file, n)) if *file == key.file => *n += 1,
                    _ => run = Some((key.file, 1)),
                }
                if run.is_some_and(|(_, n)| n > MAX_LISTED_PER_FILE) {
                    return Err(too_many(format!(
                        "lists more than {MAX_LISTED_PER_FILE} shares of file {} (a \
                         manifest and {} chunks at most)",
                        hex(&key.file),
                        manifest::MAX_CHUNKS
                    )));
                }
                listing
                    .entry(key.file)
                    .or_default()
                    .entry(key.chunk)
                    .or_default()
                    .push(Found {
                        site: i,
                        share: key.share,
                        meta,
                    });
                Ok(())
            });
            match r {
                Ok(()) => tracing::info!(site = name, shares = seen, "listed"),
                Err(e) => {
                    tracing::warn!("rebuild: listing {name} failed: {e}");
                    report.unreachable_sites.push(format!("{name}: {e}"));
                    listing.retain(|_, chunks| {
                        chunks.retain(|_, found| {
                            found.retain(|f| f.site != i);
                            !found.is_empty()
                        });
                        !chunks.is_empty()
                    });
                }
            }
        }
        listing
    }

    /// Where the shares of a chunk of `len` bytes of version `m` live: one location per
    /// distinct share index, matching the version's (k,n) and the length, by share index.
    ///
    /// A site listing two or more shares of one chunk is passed over for that chunk: the
    /// placement never puts two shares of a chunk on one site (k-1 sites would then hold k),
    /// so such a listing is a site forging a version on its own, whose chunks it could
    /// otherwise rebuild alone with hashes of its choosing.
    fn locations(&self, found: Option<&Vec<Found>>, len: u32, m: &Manifest) -> Vec<ShareLocation> {
        let (k, n) = (usize::from(m.k), usize::from(m.n));
        let found: Vec<&Found> = found.into_iter().flatten().collect();
        let per_site = listed_per_site(found.iter().copied());
        // Where two sites claim one share index, the one the placement puts it on (site i
        // holds share i) wins: a site claiming another's index must not push the real one
        // out, leaving a location whose share fails every read's hash.
        let mut by_share: BTreeMap<u8, (bool, usize)> = BTreeMap::new();
        for f in found {
            if per_site[&f.site] == 1
                && f.meta.secret_len == len
                && (usize::from(f.meta.k), usize::from(f.meta.n)) == (k, n)
                && usize::from(f.share) < n
            {
                let placed = usize::from(f.share) == f.site;
                let e = by_share.entry(f.share).or_insert((placed, f.site));
                if placed && !e.0 {
                    *e = (true, f.site);
                }
            }
        }
        by_share
            .into_iter()
            .map(|(share, (_, site))| ShareLocation {
                share,
                site: self.core.sites[site].name().to_string(),
            })
            .collect()
    }

    /// Fetch the manifest shares of a version and find the latest-written manifest any k of
    /// them rebuild (a rewrite interrupted across sites leaves shares of two writes).
    ///
    /// A version written under another (k,n) than the configured one (before a site was
    /// added, say) is read with its own, as long as its k is at least the configured k: the
    /// shares combined must come from k distinct sites, so a version of a lower k would let
    /// fewer sites than the configured threshold forge a file into the catalog.
    fn read_manifest(&self, id: &FileId, found: &[Found]) -> Result<Manifest, String> {
        let least_k = self.core.scheme.k();
        let mut failures = Vec::new();
        // Shares grouped by the (k,n) and secret length their site recorded: only equal ones
        // combine. Each keeps its site: the k shares combined must come from k sites (see
        // `locations`).
        type Group = Vec<(usize, usize, Vec<u8>)>;
        let mut groups: BTreeMap<(u8, u8, u32), Group> = BTreeMap::new();
        // Each site holds one manifest share of a version (share i at site i, rewritten in
        // place): a site listing more is forging, and is passed over before the cap, so that
        // its extra listings cannot crowd out the shares of honest sites.
        let per_site = listed_per_site(found);
        for (site, listed) in &per_site {
            if *listed > 1 {
                failures.push(format!(
                    "site {} lists {listed} manifest shares of one version",
                    self.core.sites[*site].name()
                ));
            }
        }
        let honest = found.iter().filter(|f| per_site[&f.site] == 1);
        for f in honest.take(MAX_MANIFEST_SHARES) {
            let (k, n) = (f.meta.k, f.meta.n);
            if usize::from(k) < least_k {
                failures.push(format!(
                    "share {}: (k,n) = ({k},{n}), below the configured k = {least_k}",
                    f.share
                ));
                continue;
            }
            let scheme = match self.core.scheme_for(k, n) {
                Ok(s) if f.share < n => s,
                Ok(_) => {
                    failures.push(format!("share {} of (k,n) = ({k},{n})", f.share));
                    continue;
                }
                Err(e) => {
                    failures.push(format!("share {}: {e}", f.share));
                    continue;
                }
            };
            let key = ShareKey {
                file: *id,
                chunk: MANIFEST_CHUNK,
                share: f.share,
            };
            match self.core.sites[f.site].get(&key) {
                Ok(d) if d.len() == scheme.share_len(f.meta.secret_len as usize) => {
                    groups.entry((k, n, f.meta.secret_len)).or_default().push((
                        usize::from(f.share),
                        f.site,
                        d,
                    ));
                }
                Ok(d) => failures.push(format!("{key}: {} bytes, wrong length", d.len())),
                Err(e) => failures.push(e.to_string()),
            }
        }
        let mut best: Option<Manifest> = None;
        for (&(k, n, len), shares) in &groups {
            let scheme = self.core.scheme_for(k, n).map_err(|e| e.to_string())?;
            let k = usize::from(k);
            for subset in k_subsets(shares.len(), k) {
                let given: Vec<(usize, &[u8])> = subset
                    .iter()
                    .map(|&i| (shares[i].0, shares[i].2.as_slice()))
                    .collect();
                let distinct: BTreeSet<usize> = given.iter().map(|g| g.0).collect();
                let sites: BTreeSet<usize> = subset.iter().map(|&i| shares[i].1).collect();
                if distinct.len() < k || sites.len() < k {
                    continue;
                }
                let mut out = Zeroizing::new(vec![0u8; len as usize]);
                if let Err(e) = scheme.combine(&given, len as usize, &mut out) {
                    failures.push(e.to_string());
                    continue;
                }
                match Manifest::decode(id, &out) {
                    // The version is rebuilt with the (k,n) its manifest names: the shares
                    // that made the manifest must be of that (k,n).
                    Ok(m) if (usize::from(m.k), usize::from(m.n)) != (k, scheme.n()) => {
                        failures.push(format!(
                            "a manifest of (k,n) = ({},{}) from shares of ({k},{})",
                            m.k,
                            m.n,
                            scheme.n()
                        ));
                    }
                    Ok(m) if best.as_ref().is_none_or(|b| m.seq > b.seq) => best = Some(m),
                    Ok(_) => {}
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
        best.ok_or_else(|| {
            failures.dedup();
            format!(
                "no k of the {} manifest shares rebuild a valid manifest ({})",
                found.len(),
                failures.join("; ")
            )
        })
    }
}
