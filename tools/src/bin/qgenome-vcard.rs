//! `qgenome-vcard`: a virtual PIV card that plugs into pcscd through vsmartcard's vpcd driver.
//!
//! For development and tests only: vpcd listens on all interfaces, never install it on a
//! production host.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use qgenome::consent::apdu::Algorithm;
use qgenome::consent::piv::ManagementKey;
use qgenome_tools::vcard::{hex, CardIdentity, CardOptions, VirtualCard};
use qgenome_tools::vpcd::{self, LinkOptions, Observer, SessionEnd};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MgmtAlg {
    #[value(name = "3des")]
    TripleDes,
    Aes128,
    Aes192,
    Aes256,
}

#[derive(Parser, Debug)]
#[command(about = "A virtual PIV card for vpcd/pcscd (development and tests only)")]
struct Args {
    /// vpcd host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// vpcd port (35963 is reader "Virtual PCD 00 00").
    #[arg(long, default_value_t = vpcd::VPCD_PORT)]
    port: u16,
    /// State file (GUID, keys, data objects); created if missing, so enrollment survives
    /// restarts. Without it the card is new on every start.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Application PIN (6 to 8 ASCII characters).
    #[arg(long, default_value = "123456")]
    pin: String,
    /// Management key algorithm.
    #[arg(long, value_enum, default_value = "3des")]
    mgmt_alg: MgmtAlg,
    /// Management key in hex (default: the YubiKey factory key 0102030405060708 x3).
    #[arg(long)]
    mgmt_key: Option<String>,
    /// Sign with a key other than the one in the certificate.
    #[arg(long)]
    wrong_key: bool,
    /// Corrupt every signature.
    #[arg(long)]
    bad_signature: bool,
    /// Wait this many milliseconds before every answer.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Drop the connection (card pulled out) instead of answering APDU number N+1, then exit.
    #[arg(long)]
    remove_after: Option<usize>,
    /// Answer GENERAL AUTHENTICATE (9E/9A) with the response recorded in FILE.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Record the last GENERAL AUTHENTICATE response (9E/9A) to FILE.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Print the card's GUID (hex) on stdout once ready.
    #[arg(long)]
    print_guid: bool,
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, mode 0600,
/// fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

/// vpcd (in pcscd) writes each message as two sends (length, then payload) with Nagle on: the
/// payload waits for our ACK of the length, which delayed ACK holds back ~40 ms. TCP_QUICKACK
/// after every read acknowledges at once (the kernel clears it again, so it is re-armed each
/// time); TCP_NODELAY alone (our side) does not help that direction.
struct QuickAck(TcpStream);

impl QuickAck {
    fn arm(&self) {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a valid pointer to an int of that size.
        unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl Read for QuickAck {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm();
        let n = self.0.read(buf)?;
        self.arm();
        Ok(n)
    }
}

impl Write for QuickAck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

struct Persist {
    state: Option<PathBuf>,
    record: Option<PathBuf>,
}

impl Observer for Persist {
    fn after_apdu(&mut self, card: &mut VirtualCard) {
        if card.take_dirty() {
            if let Some(path) = &self.state {
                if let Err(e) = write_atomic(path, &card.identity().to_bytes()) {
                    eprintln!("qgenome-vcard: saving state {}: {e:#}", path.display());
                }
            }
        }
        if let (Some(path), Some(resp)) = (&self.record, card.last_auth_response()) {
            if let Err(e) = write_atomic(path, resp) {
                eprintln!("qgenome-vcard: recording to {}: {e:#}", path.display());
            }
        }
    }
}

fn parse_hex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("management key hex has odd length");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("management key is not hex"))
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let identity = match &args.state {
        Some(path) if path.exists() => {
            let bytes = zeroize::Zeroizing::new(
                std::fs::read(path).with_context(|| format!("read {}", path.display()))?,
            );
            CardIdentity::from_bytes(&bytes, &path.display().to_string())?
        }
        Some(path) => {
            let id = CardIdentity::generate()?;
            write_atomic(path, &id.to_bytes())?;
            id
        }
        None => CardIdentity::generate()?,
    };
    let alg = match args.mgmt_alg {
        MgmtAlg::TripleDes => Algorithm::TripleDes,
        MgmtAlg::Aes128 => Algorithm::Aes128,
        MgmtAlg::Aes192 => Algorithm::Aes192,
        MgmtAlg::Aes256 => Algorithm::Aes256,
    };
    let key_bytes = zeroize::Zeroizing::new(match &args.mgmt_key {
        Some(h) => parse_hex(h)?,
        None => {
            let len = alg.key_len().expect("symmetric");
            ManagementKey::DEFAULT_BYTES
                .iter()
                .cycle()
                .take(len)
                .copied()
                .collect()
        }
    });
    if !(6..=8).contains(&args.pin.len()) {
        bail!("--pin must be 6 to 8 characters");
    }
    let replay = match &args.replay {
        Some(p) => {
            Some(std::fs::read(p).with_context(|| format!("read replay file {}", p.display()))?)
        }
        None => None,
    };
    let opts = CardOptions {
        pin: zeroize::Zeroizing::new(args.pin.as_bytes().to_vec()),
        management_key: ManagementKey::new(alg, &key_bytes)?,
        wrong_key: args.wrong_key,
        bad_signature: args.bad_signature,
        replay,
        ..CardOptions::default()
    };
    if args.print_guid {
        println!("{}", hex(&identity.guid));
        std::io::stdout().flush()?;
    }
    let mut card = VirtualCard::new(identity, opts);
    let link = LinkOptions {
        delay: Duration::from_millis(args.delay_ms),
        remove_after: args.remove_after,
    };
    let mut observer = Persist {
        state: args.state.clone(),
        record: args.record.clone(),
    };
    let addr = format!("{}:{}", args.host, args.port);
    let mut answered = 0usize;
    let mut waiting_logged = false;
    // Reconnect forever: pcscd restarts drop the connection and the card should come back.
    loop {
        let stream = match TcpStream::connect(&addr) {
            Ok(s) => s,
            Err(e) => {
                if !waiting_logged {
                    eprintln!("qgenome-vcard: waiting for vpcd at {addr}: {e}");
                    waiting_logged = true;
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        waiting_logged = false;
        stream.set_nodelay(true).ok();
        eprintln!("qgenome-vcard: inserted into vpcd at {addr}");
        card.reset();
        let mut stream = QuickAck(stream);
        match vpcd::serve(&mut stream, &mut card, &link, &mut answered, &mut observer) {
            Ok(SessionEnd::Removed) => {
                eprintln!("qgenome-vcard: removed after {answered} APDUs");
                return Ok(());
            }
            Ok(SessionEnd::Closed) => eprintln!("qgenome-vcard: vpcd closed the connection"),
            Err(e) => eprintln!("qgenome-vcard: vpcd connection failed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
