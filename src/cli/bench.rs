//! `qgenome bench ...`: throughput of the pipeline stages.
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {}

impl BenchCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {}
    }
}
