//! `qgenome keys ...`: provision and inspect link key pools.
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::keys::{pool, Direction};
use crate::link::stream;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write both ends of a new link (both directions) from the OS CSPRNG.
    Provision {
        /// Link name (letters, digits, '.', '_', '-').
        #[arg(long)]
        link: String,
        /// Key bytes per direction, e.g. 4G.
        #[arg(long, value_parser = crate::cli::parse_size)]
        size: u64,
        /// Key bytes of the b -> a direction instead, when it carries less (say the replies
        /// of a site that mostly stores: end a is the home node).
        #[arg(long, value_parser = crate::cli::parse_size)]
        size_b2a: Option<u64>,
        /// Directory for end a's files.
        #[arg(long)]
        out_a: PathBuf,
        /// Directory for end b's files.
        #[arg(long)]
        out_b: PathBuf,
    },
    /// Show the key left in each stream of a link at this end (reads only).
    Status {
        #[arg(long)]
        link: String,
        /// Directory holding this end's pools and ledgers.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

impl KeysCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            KeysCommand::Provision {
                link,
                size,
                size_b2a,
                out_a,
                out_b,
            } => {
                // The new key passes through this process's buffers.
                crate::harden::harden_process("qgenome keys provision")?;
                let sizes = pool::PoolSizes {
                    a_to_b: size,
                    b_to_a: size_b2a.unwrap_or(size),
                };
                let p = pool::provision_placed(&link, sizes, &out_a, &out_b, None)
                    .with_context(|| format!("provisioning link {link:?}"))?;
                for f in &p.files {
                    println!("{}", f.display());
                }
                Ok(())
            }
            KeysCommand::Status { link, dir, json } => {
                let mut rows = Vec::new();
                for d in Direction::BOTH {
                    let s = stream::status(&dir, &link, d)?;
                    if json {
                        rows.push(serde_json::json!({
                            "link": link, "direction": d.as_str(), "role": s.role,
                            "key_len": s.key_len, "ledger": s.ledger_value, "remaining": s.remaining,
                        }));
                    } else {
                        println!(
                            "{link} {d} ({}): {} of {} key bytes remaining (ledger at {})",
                            s.role, s.remaining, s.key_len, s.ledger_value
                        );
                    }
                }
                if json {
                    println!("{}", serde_json::Value::Array(rows));
                }
                Ok(())
            }
        }
    }
}
