//! What the mount tests over in-memory sites (fs_mount.rs) and over real daemons (e2e.rs)
//! both run: samtools on Debian's htslib-test CRAM files.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const FIXTURES: &str = "/usr/share/htslib-test/test";

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.env("REF_PATH", "/nonexistent").output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn samtools(args: &[&str]) -> Vec<u8> {
    run(Command::new("samtools").args(args)).stdout
}

/// The htslib-test CRAM files with the reference each was made against.
pub fn fixtures() -> Vec<(PathBuf, PathBuf)> {
    [
        ("auxf#values_java.cram", "auxf.fa"),
        ("ce#5b_java.cram", "ce.fa"),
        ("range.cram", "ce.fa"),
        ("xx#large_aux_java.cram", "xx.fa"),
    ]
    .iter()
    .map(|(c, r)| (Path::new(FIXTURES).join(c), Path::new(FIXTURES).join(r)))
    .collect()
}

/// Every CRAM under the fixtures directory through a mounted patient directory `patient`
/// (whose consent is granted), with `scratch` for local files: copied in and read back
/// byte-identical; written by samtools straight into the mount, byte-identical to its local
/// output, with the same records and references; sorted and indexed in the mount, where a
/// region query gives what it gives on the source sorted and indexed locally.
pub fn every_cram_round_trips(patient: &Path, scratch: &Path) {
    let crams = fixtures();
    // Every CRAM under the fixtures directory, subdirectories included, is one of these.
    let found = run(Command::new("find").args([FIXTURES, "-name", "*.cram"])).stdout;
    let mut found: Vec<PathBuf> = String::from_utf8(found)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    found.sort();
    let mut covered: Vec<PathBuf> = crams.iter().map(|(c, _)| c.clone()).collect();
    covered.sort();
    assert_eq!(found, covered, "a CRAM fixture is not covered");
    for (i, (src, reference)) in crams.iter().enumerate() {
        let reference = reference.to_str().unwrap();
        let src = src.to_str().unwrap();
        // The source as CRAM into `out`; `input` sorted into `out`, and indexed.
        let to_cram = |out: &str| {
            samtools(&["view", "--no-PG", "-T", reference, "-C", "-o", out, src]);
        };
        let sort = |input: &str, out: &str| {
            samtools(&[
                "sort",
                "--no-PG",
                "--reference",
                reference,
                "-O",
                "cram",
                "-o",
                out,
                input,
            ]);
            samtools(&["index", out]);
        };
        // 1. A CRAM made by samtools elsewhere, copied in unchanged, reads back byte-identical.
        let local = scratch.join(format!("local{i}.cram"));
        to_cram(local.to_str().unwrap());
        let copied = patient.join(format!("copy{i}.cram"));
        std::fs::copy(&local, &copied).unwrap();
        assert_eq!(
            std::fs::read(&copied).unwrap(),
            std::fs::read(&local).unwrap(),
            "{src:?}"
        );
        // 2. samtools writing straight into the mount: the same records, index, region queries.
        let mounted = patient.join(format!("direct{i}.cram"));
        let m = mounted.to_str().unwrap();
        to_cram(m);
        // Byte for byte what samtools wrote locally, but for the CRAM file definition's
        // 20-byte file id (bytes 6..26), which htslib fills from the output's path.
        let file_bytes = |f: &Path| {
            let mut b = std::fs::read(f).unwrap();
            b[6..26].fill(0);
            b
        };
        assert!(
            file_bytes(&mounted) == file_bytes(&local),
            "samtools wrote other bytes into the mount for {src:?}"
        );
        // Records read back through the mount are the source's.
        let want = samtools(&["view", "-T", reference, src]);
        assert!(!want.is_empty());
        assert_eq!(
            samtools(&["view", "-T", reference, m]),
            want,
            "records differ for {src:?}"
        );
        let sorted = patient.join(format!("sorted{i}.cram"));
        let s = sorted.to_str().unwrap();
        sort(m, s);
        assert!(patient.join(format!("sorted{i}.cram.crai")).exists());
        // A region holding the first sorted record, queried through the mount's index, gives
        // what the same query gives on the source sorted and indexed locally.
        let local_sorted = scratch.join(format!("sorted{i}.cram"));
        let ls = local_sorted.to_str().unwrap();
        sort(src, ls);
        let first = String::from_utf8(samtools(&["view", "-T", reference, ls])).unwrap();
        let fields: Vec<&str> = first
            .lines()
            .next()
            .expect("a record")
            .split('\t')
            .collect();
        let start: u64 = fields[3].parse().unwrap();
        let region = format!("{}:{start}-{}", fields[2], start + 1000);
        let want = samtools(&["view", "-T", reference, ls, &region]);
        assert!(!want.is_empty(), "region {region} of {src:?} holds records");
        assert_eq!(
            samtools(&["view", "-T", reference, s, &region]),
            want,
            "region {region} differs for {src:?}"
        );
    }
}

/// A CRAM of many chunks (`chunk` bytes each) through a mounted patient directory `patient`
/// (whose consent is granted), with `scratch` for local files: `qgenome-gen-cram` makes a
/// reference and a sorted CRAM of reads on three contigs, which samtools writes straight into
/// the mount with its index (containers smaller than the file, so the index has many). Read
/// back through the mount it holds the source's records, and region queries spread over every
/// contig and the whole file, through the index samtools wrote there, give what they give on
/// the source indexed locally.
pub fn a_multi_chunk_cram_round_trips(patient: &Path, scratch: &Path, chunk: usize) {
    let gen = scratch.join("gen");
    let tool = qgenome::deploy::bin_dir().unwrap().join("qgenome-gen-cram");
    run(Command::new(tool).arg("--out").arg(&gen).args([
        "--size",
        "3M",
        "--contigs",
        "3",
        "--contig-len",
        "300000",
    ]));
    let reference = gen.join("ref.fa");
    let reference = reference.to_str().unwrap();
    let local = gen.join("sample.cram");
    let local = local.to_str().unwrap();
    samtools(&["index", local]);
    let mounted = patient.join("gen.cram");
    let m = mounted.to_str().unwrap();
    samtools(&[
        "view",
        "--no-PG",
        "-C",
        "-T",
        reference,
        "--output-fmt-option",
        "seqs_per_slice=2000",
        "--write-index",
        "-o",
        m,
        local,
    ]);
    let size = std::fs::metadata(&mounted).unwrap().len();
    assert!(
        size > 4 * chunk as u64,
        "{m} is {size} bytes, not many {chunk}-byte chunks"
    );
    // The same records as the source.
    let records = String::from_utf8(samtools(&["view", "-T", reference, local])).unwrap();
    assert!(!records.is_empty());
    assert!(
        samtools(&["view", "-T", reference, m]) == records.as_bytes(),
        "records of {m} differ from the source's"
    );
    // The index samtools wrote into the mount points at containers all through the file.
    let crai = format!("{m}.crai");
    let index = String::from_utf8(run(Command::new("gzip").args(["-dc", &crai])).stdout).unwrap();
    let last_container = index
        .lines()
        .map(|l| l.split('\t').nth(3).unwrap().parse::<u64>().unwrap())
        .max()
        .unwrap_or_else(|| panic!("{crai} lists no container"));
    assert!(
        last_container > 4 * chunk as u64,
        "{crai} indexes nothing past byte {last_container}"
    );
    // Regions at the records at each eighth of the file (the middle of it), over every contig.
    let records: Vec<Vec<&str>> = records.lines().map(|l| l.split('\t').collect()).collect();
    let regions: Vec<(&str, String)> = (0..8)
        .map(|i| {
            let r = &records[(2 * i + 1) * records.len() / 16];
            let start: u64 = r[3].parse().unwrap();
            (r[2], format!("{}:{start}-{}", r[2], start + 2000))
        })
        .collect();
    let mut contigs: Vec<&str> = records.iter().map(|r| r[2]).collect();
    contigs.dedup();
    let mut queried: Vec<&str> = regions.iter().map(|(c, _)| *c).collect();
    queried.dedup();
    assert_eq!(queried, contigs, "the regions miss a contig");
    for (_, region) in &regions {
        let want = samtools(&["view", "-T", reference, local, region]);
        assert!(!want.is_empty(), "region {region} holds records");
        assert!(
            samtools(&["view", "-T", reference, m, region]) == want,
            "region {region} of {m} differs from the source's"
        );
    }
}
