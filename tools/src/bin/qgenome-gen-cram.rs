//! `qgenome-gen-cram`: make a realistic test CRAM without downloading anything.
//!
//! Writes a random reference (`ref.fa` + `.fai`) and streams coordinate-sorted simulated
//! 150 bp reads (about 1% substitutions, varied base qualities, both strands) as SAM into
//! `samtools view -C`, so the result is a real CRAM that samtools can index and query.
//! The size is approximate: reads are generated until the estimate for `--size` is reached.
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use clap::Parser;
use qgenome::sharing::{Drbg, RandomSource};

#[derive(Parser)]
#[command(about = "Generate a random reference and a CRAM of simulated reads against it")]
struct Args {
    /// Directory for ref.fa, ref.fa.fai and the CRAM.
    #[arg(long)]
    out: PathBuf,
    /// Approximate CRAM size (K, M, G suffixes).
    #[arg(long, default_value = "64M", value_parser = qgenome::cli::parse_size)]
    size: u64,
    /// Name of the CRAM file in --out.
    #[arg(long, default_value = "sample.cram")]
    name: String,
    #[arg(long, default_value_t = 8)]
    contigs: usize,
    #[arg(long, default_value_t = 1_000_000)]
    contig_len: usize,
}

const READ_LEN: usize = 150;
/// CRAM bytes per read observed with these settings (qualities dominate), for the estimate.
const BYTES_PER_READ: u64 = 68;

/// Random bytes in bulk, consumed a little at a time.
struct Bytes {
    rng: Drbg,
    buf: Vec<u8>,
    pos: usize,
}

impl Bytes {
    fn next(&mut self) -> u8 {
        if self.pos == self.buf.len() {
            self.rng.fill(&mut self.buf).expect("DRBG");
            self.pos = 0;
        }
        self.pos += 1;
        self.buf[self.pos - 1]
    }

    fn below(&mut self, n: u32) -> u32 {
        let x = u32::from_le_bytes([self.next(), self.next(), self.next(), self.next()]);
        ((u64::from(x) * u64::from(n)) >> 32) as u32
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut rnd = Bytes {
        rng: Drbg::from_os()?,
        buf: vec![0; 1 << 16],
        pos: 1 << 16,
    };
    let bases = *b"ACGT";
    let reference: Vec<Vec<u8>> = (0..args.contigs)
        .map(|_| {
            (0..args.contig_len)
                .map(|_| bases[(rnd.next() & 3) as usize])
                .collect()
        })
        .collect();
    let fa = args.out.join("ref.fa");
    {
        let mut w = BufWriter::new(std::fs::File::create(&fa)?);
        for (i, seq) in reference.iter().enumerate() {
            writeln!(w, ">chr{}", i + 1)?;
            for line in seq.chunks(60) {
                w.write_all(line)?;
                w.write_all(b"\n")?;
            }
        }
        w.flush()?;
    }
    let status = Command::new("samtools")
        .arg("faidx")
        .arg(&fa)
        .status()
        .context("running samtools faidx")?;
    if !status.success() {
        bail!("samtools faidx {} failed: {status}", fa.display());
    }

    let cram = args.out.join(&args.name);
    let mut child = Command::new("samtools")
        .args(["view", "--no-PG", "-C", "-@", "2", "-T"])
        .arg(&fa)
        .arg("-o")
        .arg(&cram)
        .arg("-")
        .env("REF_PATH", "/nonexistent")
        .stdin(Stdio::piped())
        .spawn()
        .context("running samtools view -C")?;
    let reads = (args.size / BYTES_PER_READ).max(1);
    let per_contig = reads.div_ceil(args.contigs as u64);
    let span = (args.contig_len - READ_LEN) as u64;
    {
        let mut w = BufWriter::with_capacity(1 << 20, child.stdin.take().expect("piped"));
        writeln!(w, "@HD\tVN:1.6\tSO:coordinate")?;
        for i in 0..args.contigs {
            writeln!(w, "@SQ\tSN:chr{}\tLN:{}", i + 1, args.contig_len)?;
        }
        writeln!(w, "@RG\tID:sim\tSM:synthetic\tPL:ILLUMINA")?;
        let mut seq = vec![0u8; READ_LEN];
        let mut qual = vec![0u8; READ_LEN];
        let mut n = 0u64;
        for (c, contig) in reference.iter().enumerate() {
            for r in 0..per_contig {
                let pos = (r * span / per_contig) as usize;
                seq.copy_from_slice(&contig[pos..pos + READ_LEN]);
                for (b, q) in seq.iter_mut().zip(qual.iter_mut()) {
                    if rnd.below(100) == 0 {
                        *b = bases[(rnd.next() & 3) as usize];
                    }
                    // Mostly high qualities with a tail, as sequencers report them.
                    *q = if rnd.below(4) == 0 {
                        b'#' + rnd.below(30) as u8
                    } else {
                        b'F' + rnd.below(5) as u8
                    };
                }
                let flag = if rnd.next() & 1 == 0 { 0 } else { 16 };
                n += 1;
                w.write_all(
                    format!(
                        "r{n}\t{flag}\tchr{}\t{}\t60\t{READ_LEN}M\t*\t0\t0\t",
                        c + 1,
                        pos + 1
                    )
                    .as_bytes(),
                )?;
                w.write_all(&seq)?;
                w.write_all(b"\t")?;
                w.write_all(&qual)?;
                w.write_all(b"\tRG:Z:sim\n")?;
            }
        }
        w.flush()?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("samtools view -C failed: {status}");
    }
    let size = std::fs::metadata(&cram)?.len();
    println!(
        "{} ({} reads, {:.1} MiB) against {}",
        cram.display(),
        per_contig * args.contigs as u64,
        size as f64 / (1 << 20) as f64,
        fa.display()
    );
    Ok(())
}
