//! `qgenome consent ...` and `qgenome status`: requests to a running mount's control socket.
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::config::HomeConfig;
use crate::control;

/// Where the running mount listens: `--control SOCKET`, or the one in `--config FILE`.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The mount's config file (its state_dir holds the control socket).
    #[arg(long, default_value = "/etc/qgenome/qgenome.toml")]
    pub config: PathBuf,
    /// The control socket itself, overriding --config.
    #[arg(long)]
    pub control: Option<PathBuf>,
}

impl ControlArgs {
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        match &self.control {
            Some(p) => Ok(p.clone()),
            None => Ok(HomeConfig::load(&self.config)?.control_socket()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ConsentCommand {
    /// Open a consent session for a patient (admin override; the card is the normal way).
    Grant {
        patient: String,
        /// How long the session lasts (at most 10080, 7 days).
        #[arg(long, default_value_t = 15,
              value_parser = clap::value_parser!(u64).range(1..=crate::consent::MAX_GRANT_MINUTES))]
        minutes: u64,
        #[command(flatten)]
        ctl: ControlArgs,
    },
    /// End a patient's consent session now (cached plaintext is wiped).
    Revoke {
        patient: String,
        #[command(flatten)]
        ctl: ControlArgs,
    },
    /// List active consent sessions.
    List {
        #[command(flatten)]
        ctl: ControlArgs,
    },
}

impl ConsentCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            ConsentCommand::Grant {
                patient,
                minutes,
                ctl,
            } => {
                control::request(
                    &ctl.socket()?,
                    &json!({"cmd": "consent-grant", "patient": patient, "minutes": minutes}),
                )?;
                println!("consent granted for {patient} for {minutes} min");
            }
            ConsentCommand::Revoke { patient, ctl } => {
                let r = control::request(
                    &ctl.socket()?,
                    &json!({"cmd": "consent-revoke", "patient": patient}),
                )?;
                if r["ended"] == json!(true) {
                    println!("consent for {patient} ended");
                } else {
                    println!("{patient} had no active consent");
                }
            }
            ConsentCommand::List { ctl } => {
                let r = control::request(&ctl.socket()?, &json!({"cmd": "consent-list"}))?;
                for g in r["grants"].as_array().into_iter().flatten() {
                    let left = match g["remaining_secs"].as_u64() {
                        Some(s) => format!("{s} s left"),
                        None => "until the card is removed".into(),
                    };
                    println!(
                        "{}\t{}\t{left}",
                        g["patient"].as_str().unwrap_or("?"),
                        g["source"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        Ok(())
    }
}

/// `qgenome status`: each site's room and the key left on its link, and the counters.
pub fn status(ctl: &ControlArgs, as_json: bool) -> anyhow::Result<()> {
    let r = control::request(&ctl.socket()?, &json!({"cmd": "status"}))?;
    if as_json {
        println!("{r}");
        return Ok(());
    }
    for s in r["sites"].as_array().into_iter().flatten() {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let key = match (
            s["key_remaining"].as_u64(),
            s["reply_key_remaining"].as_u64(),
        ) {
            (Some(to), Some(back)) => format!(
                "{:.1} MiB of key left to the site, {:.1} MiB for its replies",
                mib(to),
                mib(back)
            ),
            _ => "local (no link)".into(),
        };
        let u = &s["usage"];
        let usage = match (u["capacity"].as_u64(), u["free"].as_u64()) {
            (Some(cap), Some(free)) => format!(
                "{:.1} of {:.1} MiB free, {} shares, {}",
                mib(free),
                mib(cap),
                u["shares"],
                u["health"].as_str().unwrap_or("?")
            ),
            _ => "usage unknown (the site did not answer)".into(),
        };
        println!(
            "site {:<12} {usage}; {key}",
            s["name"].as_str().unwrap_or("?")
        );
    }
    for (k, v) in r["stats"].as_object().into_iter().flatten() {
        println!("{k:<16} {v}");
    }
    println!("{:<16} {}", "open_for_reading", r["open_for_reading"]);
    Ok(())
}
