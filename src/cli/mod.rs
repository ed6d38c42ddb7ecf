//! The `qgenome` command line: parsing and dispatch. Each subcommand lives in its own file.
use clap::{Parser, Subcommand};

pub mod bench;
pub mod card;
pub mod catalog;
pub mod ceiling;
pub mod consent;
pub mod demo;
pub mod keys;
pub mod mount;

/// qgenome: CRAM storage by XOR threshold secret sharing over one-time-pad links.
#[derive(Debug, Parser)]
#[command(name = "qgenome", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure throughput of the pipeline stages.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Enroll, list, revoke and seal patient smart cards; enter a PIN.
    #[command(subcommand)]
    Card(card::CardCommand),
    /// Rebuild the home catalog from the sites.
    #[command(subcommand)]
    Catalog(catalog::CatalogCommand),
    /// Provision and inspect link key pools.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Grant, revoke and list consent sessions on a running mount.
    #[command(subcommand)]
    Consent(consent::ConsentCommand),
    /// Serve /qgenome until SIGTERM or SIGINT.
    Mount(mount::MountArgs),
    /// Run the whole flow on a local three-site deployment (what `make demo` runs).
    Demo(demo::DemoArgs),
    /// Counters and key left per site, from a running mount.
    Status {
        #[command(flatten)]
        ctl: consent::ControlArgs,
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Bench(cmd) => cmd.run(),
            Command::Card(cmd) => cmd.run(),
            Command::Catalog(cmd) => cmd.run(),
            Command::Keys(cmd) => cmd.run(),
            Command::Consent(cmd) => cmd.run(),
            Command::Demo(args) => demo::run(args),
            Command::Mount(args) => mount::run(args),
            Command::Status { ctl, json } => consent::status(&ctl, json),
        }
    }
}

/// Logs go to stderr, filtered by `QGENOME_LOG`, else `RUST_LOG`, else `info`; both binaries
/// (`qgenome` and `qgenome-mountd`) log this way. Colours only on a terminal: under systemd
/// stderr is the journal, where escape codes would be noise in every line.
pub fn init_tracing() {
    use std::io::IsTerminal;
    let filter = ["QGENOME_LOG", "RUST_LOG"]
        .iter()
        .find_map(|var| tracing_subscriber::EnvFilter::try_from_env(var).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parse a byte size such as `4096`, `256M`, `4G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..]
                .trim_end_matches(['i', 'B', 'b'])
                .to_ascii_uppercase();
            let mult = match unit.as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("size {s:?}: unknown unit (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {s:?}: not a number"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
