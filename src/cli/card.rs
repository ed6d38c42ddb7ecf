//! `qgenome card ...`: enroll, list, revoke and seal patient cards, and enter a PIN, each one
//! request over the running mount's control socket (the mount holds the catalog and the
//! readers).
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::control;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Policy {
    /// Card Authentication key 9E, no PIN (contactless).
    #[value(name = "9e")]
    CardAuth9E,
    /// PIN, then PIV Authentication key 9A.
    #[value(name = "9a")]
    Pin9A,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MgmtAlg {
    #[value(name = "3des")]
    TripleDes,
    Aes128,
    Aes192,
    Aes256,
}

#[derive(Debug, Subcommand)]
pub enum CardCommand {
    /// Bind the card in the reader to a patient (reads its GUID and certificate).
    Enroll {
        #[arg(long)]
        patient: String,
        /// Reader name (or a part of it no other reader's name has); default: the only
        /// reader holding a card.
        #[arg(long)]
        reader: Option<String>,
        #[arg(long, value_enum, default_value = "9e")]
        policy: Policy,
        /// The mount's control socket.
        #[arg(long)]
        control: PathBuf,
    },
    /// List enrolled cards.
    List {
        #[arg(long)]
        control: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke one card (--guid) or every card of a patient (--patient); ends their sessions.
    Revoke {
        #[arg(long, conflicts_with = "patient", required_unless_present = "patient")]
        guid: Option<String>,
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        control: PathBuf,
    },
    /// Write the patient's manifest digest onto their card (needs the card's management key).
    Seal {
        #[arg(long)]
        patient: String,
        /// Management key in hex (default: the factory key 0102030405060708 x3). Prefer
        /// QGENOME_MGMT_KEY in the environment: arguments are visible in /proc.
        #[arg(long)]
        mgmt_key: Option<String>,
        #[arg(long, value_enum, default_value = "3des")]
        mgmt_alg: MgmtAlg,
        #[arg(long)]
        reader: Option<String>,
        #[arg(long)]
        control: PathBuf,
    },
    /// Enter the PIN (read from stdin) for the next presentation of a PIN-policy card.
    Pin {
        #[arg(long)]
        patient: String,
        #[arg(long)]
        control: PathBuf,
    },
}

fn send(path: &std::path::Path, req: &Value) -> anyhow::Result<Value> {
    control::request(path, req).with_context(|| format!("request {}", req["cmd"]))
}

fn print_card(c: &Value) {
    println!(
        "{} {} {}{}{}",
        c["guid"].as_str().unwrap_or("?"),
        c["patient"].as_str().unwrap_or("?"),
        c["policy"].as_str().unwrap_or("?"),
        c["sealed_digest"]
            .as_str()
            .map(|d| format!(" sealed {d}"))
            .unwrap_or_default(),
        if c["revoked"] == json!(true) {
            " REVOKED"
        } else {
            ""
        },
    );
}

impl CardCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            CardCommand::Enroll {
                patient,
                reader,
                policy,
                control,
            } => {
                let policy = match policy {
                    Policy::CardAuth9E => "card-auth-9e",
                    Policy::Pin9A => "pin-9a",
                };
                let reply = send(
                    &control,
                    &json!({"cmd": "card-enroll", "patient": patient, "reader": reader, "policy": policy}),
                )?;
                print_card(&reply["card"]);
            }
            CardCommand::List { control, json } => {
                let reply = send(&control, &json!({"cmd": "card-list"}))?;
                if json {
                    println!("{}", reply["cards"]);
                } else {
                    for c in reply["cards"].as_array().into_iter().flatten() {
                        print_card(c);
                    }
                }
            }
            CardCommand::Revoke {
                guid,
                patient,
                control,
            } => {
                let req = match (guid, patient) {
                    (Some(g), _) => json!({"cmd": "card-revoke", "guid": g}),
                    (None, Some(p)) => json!({"cmd": "card-revoke", "patient": p}),
                    (None, None) => anyhow::bail!("give --guid or --patient"),
                };
                let reply = send(&control, &req)?;
                for c in reply["revoked"].as_array().into_iter().flatten() {
                    print_card(c);
                }
            }
            CardCommand::Seal {
                patient,
                mgmt_key,
                mgmt_alg,
                reader,
                control,
            } => {
                let alg = match mgmt_alg {
                    MgmtAlg::TripleDes => "3des",
                    MgmtAlg::Aes128 => "aes128",
                    MgmtAlg::Aes192 => "aes192",
                    MgmtAlg::Aes256 => "aes256",
                };
                let key = mgmt_key
                    .or_else(|| std::env::var("QGENOME_MGMT_KEY").ok())
                    .map(Zeroizing::new);
                // A management key given is held while the card is sealed (up to minutes):
                // kept out of swap and core dumps, as the mount keeps its secrets.
                if key.is_some() {
                    crate::harden::harden_process("qgenome card seal")?;
                }
                let mut req = json!({"cmd": "card-seal", "patient": patient, "mgmt_alg": alg, "reader": reader});
                if let Some(k) = &key {
                    req["mgmt_key"] = json!(k.as_str());
                }
                let reply = send(&control, &req)?;
                println!(
                    "sealed card {} with manifest digest {}",
                    reply["guid"].as_str().unwrap_or("?"),
                    reply["digest"].as_str().unwrap_or("?")
                );
            }
            CardCommand::Pin { patient, control } => {
                crate::harden::harden_process("qgenome card pin")?;
                let mut line = Zeroizing::new(String::new());
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("reading the PIN from stdin")?;
                let pin = line.trim_end_matches(['\n', '\r']);
                send(
                    &control,
                    &json!({"cmd": "card-pin", "patient": patient, "pin": pin}),
                )?;
                println!("PIN held for the next presentation of {patient}'s card");
            }
        }
        Ok(())
    }
}
