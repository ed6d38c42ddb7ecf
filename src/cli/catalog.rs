//! `qgenome catalog rebuild`: the home catalog rebuilt from the sites' listings and the
//! secret-shared manifests (when the catalog was lost or is damaged beyond repair).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::catalog::Catalog;
use crate::config::HomeConfig;
use crate::fs::engine::{OrphanVersion, RebuildReport};

#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Rebuild the catalog from what the sites hold. Refuses while the mount runs, and into a
    /// catalog that is not empty.
    Rebuild(RebuildArgs),
}

#[derive(Debug, Args)]
pub struct RebuildArgs {
    #[arg(long, default_value = "/etc/qgenome/qgenome.toml")]
    pub config: PathBuf,
    /// Build the catalog in this new (or empty) directory instead of the config's state_dir;
    /// move it into place (`<state_dir>/catalog`) to use it.
    #[arg(long)]
    pub into: Option<PathBuf>,
    /// Also delete the shares of versions that are not restored because a later version
    /// has their name (superseded) or because no site holds their manifest (uncommitted).
    /// Refused unless every site was listed. Unreadable versions are always kept: a site
    /// that comes back, or a site index rebuilt, may make them readable. Without this flag
    /// orphans are only reported.
    #[arg(long)]
    pub delete_orphans: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl CatalogCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            CatalogCommand::Rebuild(args) => rebuild(args),
        }
    }
}

fn dir_is_empty(p: &Path) -> anyhow::Result<bool> {
    Ok(std::fs::read_dir(p)
        .with_context(|| format!("reading {}", p.display()))?
        .next()
        .is_none())
}

pub fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let cfg = HomeConfig::load(&args.config)?;
    let control = cfg.control_socket();
    if std::os::unix::net::UnixStream::connect(&control).is_ok() {
        bail!(
            "the mount is running (its control socket {} answers): stop it before rebuilding the catalog",
            control.display()
        );
    }
    let target = match &args.into {
        Some(dir) => {
            if dir.exists() && !dir_is_empty(dir)? {
                bail!(
                    "--into {}: the directory exists and is not empty; give a new directory",
                    dir.display()
                );
            }
            dir.clone()
        }
        None => {
            std::fs::create_dir_all(&cfg.state_dir)
                .with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
            cfg.catalog_path()
        }
    };
    let catalog = Arc::new(
        Catalog::open(&target).with_context(|| format!("opening catalog {}", target.display()))?,
    );
    crate::fs::mount::refuse_unfinished_rebuild(&catalog)?;
    if !catalog.is_empty() {
        bail!(
            "catalog {} is not empty: refusing to rebuild over it (move it away, or use --into a new directory)",
            target.display()
        );
    }
    // Pads, one-time MAC keys and rebuilt manifests are about to be held in memory.
    crate::harden::harden_process("qgenome catalog rebuild")?;
    let sites = crate::cli::mount::build_sites(&cfg)?;
    let engine = crate::fs::mount::engine_for(&cfg, catalog, sites)?;
    let report = engine
        .rebuild_catalog()
        .with_context(|| format!("rebuilding catalog {}", target.display()))?;
    // Only with every site listed: a version whose other shares sit on a site that could not
    // be listed looks unreadable or uncommitted, and deleting the shares that were seen
    // would lose it for good when that site comes back.
    let complete = report.unreachable_sites.is_empty();
    let deleted = if args.delete_orphans && complete {
        let all: Vec<OrphanVersion> = report
            .superseded
            .iter()
            .chain(&report.uncommitted)
            .cloned()
            .collect();
        Some(engine.delete_orphans(&all))
    } else {
        None
    };
    // The key the listings and deletions used, destroyed before this process exits.
    let unflushed = engine.flush_links();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["catalog"] = target.display().to_string().into();
        v["orphan_shares_deleted"] = deleted.into();
        // Cards are bound to patients in the catalog alone (nothing of them is at the sites).
        v["card_enrolments_restored"] = false.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_report(&report, &target, deleted);
    }
    if !unflushed.is_empty() {
        bail!(
            "the destruction of used link key did not complete: {}",
            unflushed.join("; ")
        );
    }
    if !complete {
        let sites: Vec<&str> = report
            .unreachable_sites
            .iter()
            .map(|s| s.split(':').next().unwrap_or(s))
            .collect();
        bail!(
            "site(s) {} could not be listed: the catalog at {} holds only what the other sites hold{}; when they are back, move it away and rebuild again",
            sites.join(", "),
            target.display(),
            if args.delete_orphans {
                ", and no orphan share was deleted"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn print_report(r: &RebuildReport, target: &Path, deleted: Option<usize>) {
    println!("catalog rebuilt at {}", target.display());
    println!("patients: {}", r.patients.join(" "));
    for f in &r.restored {
        let degraded = if f.degraded_chunks > 0 {
            format!(", {} chunks with fewer than n shares", f.degraded_chunks)
        } else {
            String::new()
        };
        println!(
            "restored {}/{}: {} bytes, {} chunks (file {}){degraded}",
            f.patient, f.name, f.size, f.chunks, f.id
        );
    }
    for (what, list) in [
        ("superseded", &r.superseded),
        ("uncommitted", &r.uncommitted),
        ("unreadable", &r.unreadable),
    ] {
        for o in list {
            println!(
                "orphan ({what}) file {}{}: {} shares: {}",
                o.id,
                o.file
                    .as_deref()
                    .map(|f| format!(" {f}"))
                    .unwrap_or_default(),
                o.shares,
                o.reason
            );
        }
    }
    for s in &r.unreachable_sites {
        println!("unreachable site {s}");
    }
    println!(
        "{} files restored, {} orphan versions{}",
        r.restored.len(),
        r.superseded.len() + r.uncommitted.len() + r.unreadable.len(),
        match deleted {
            Some(n) => format!(
                " ({n} orphan shares deleted; {} unreadable versions kept)",
                r.unreadable.len()
            ),
            None =>
                " (kept at the sites; --delete-orphans deletes the superseded and uncommitted ones)"
                    .into(),
        }
    );
    println!(
        "card enrolments are kept in the catalog alone, not at the sites: under [card], enroll \
         each patient's card again (qgenome card enroll) before their files can be read"
    );
}
