//! Harness for tests that run real `qgenome-mountd serve` processes: sites with provisioned
//! links, a readiness wait through $NOTIFY_SOCKET, log capture, loop devices.
#![allow(dead_code)]

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qgenome::keys::End;
use qgenome::link::StreamOptions;
use qgenome::sites::{LinkKeys, MountdSite};
use qgenome_mountd::store::{FormatOptions, Store};
use qgenome_mountd::volume::{create_file_volume, UringOptions, UringVolume};

/// Small key windows so restarts waste little key in tests.
pub const WINDOW: u64 = 1 << 20;

/// A site directory: volume, state, server key dir, client key dirs, config.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub keys: tempfile::TempDir,
    pub name: String,
    pub volume: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub links: Vec<String>,
}

pub enum Vol<'a> {
    File(u64),
    Device(&'a Path),
}

impl Site {
    /// Format a volume and provision `links` (each `key_bytes` per direction; the server holds
    /// end b in `keys/server`, clients end a in `keys/client`). Only links in `served` are
    /// configured in the daemon.
    pub fn new(name: &str, vol: Vol<'_>, links: &[&str], served: &[&str], key_bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keys = tempfile::tempdir_in("/dev/shm").unwrap();
        let volume = match vol {
            Vol::File(size) => {
                let p = dir.path().join("shares.vol");
                create_file_volume(&p, size, false).unwrap();
                p
            }
            Vol::Device(p) => p.to_path_buf(),
        };
        let dev = UringVolume::open(&volume, &UringOptions::default()).unwrap();
        Store::format(&dev, name, &FormatOptions::default()).unwrap();
        drop(dev);
        let (server_keys, client_keys) = (keys.path().join("server"), keys.path().join("client"));
        std::fs::create_dir_all(&server_keys).unwrap();
        std::fs::create_dir_all(&client_keys).unwrap();
        for l in links {
            qgenome::keys::pool::provision(l, key_bytes, &client_keys, &server_keys).unwrap();
        }
        let state = dir.path().join("state");
        let socket = dir.path().join("mountd.sock");
        let mut cfg = format!(
            "site = {name:?}\nvolume = {:?}\nstate_dir = {:?}\nunix_socket = {:?}\nlisten = \"127.0.0.1:0\"\n",
            volume, state, socket
        );
        for l in served {
            cfg += &format!(
                "[[link]]\nname = {l:?}\nkey_dir = {server_keys:?}\nend = \"b\"\nwindow = {WINDOW}\n"
            );
        }
        cfg += "[limits]\nmax_connections = 32\nmax_share_bytes = 16777216\n";
        let config = dir.path().join("site.toml");
        std::fs::write(&config, cfg).unwrap();
        Self {
            dir,
            keys,
            name: name.to_string(),
            volume,
            state,
            config,
            socket,
            links: links.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn client_keys(&self, link: &str) -> LinkKeys {
        LinkKeys {
            dir: self.keys.path().join("client"),
            link: link.to_string(),
            end: End::A,
            options: StreamOptions { window: WINDOW },
        }
    }

    /// Listen on a fixed free port (so a restarted daemon is found at the same address).
    pub fn fix_port(&self) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(
            &self.config,
            c.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
        )
        .unwrap();
    }

    /// Set `[limits] key = value` in the config (the table is the file's last).
    pub fn set_limit(&self, key: &str, value: &str) {
        let c = std::fs::read_to_string(&self.config).unwrap();
        let line = format!("{key} = {value}");
        let c = match c.lines().find(|l| l.starts_with(&format!("{key} = "))) {
            Some(old) => c.replace(old, &line),
            None => format!("{c}{line}\n"),
        };
        std::fs::write(&self.config, c).unwrap();
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(self)
    }
}

/// A running `qgenome-mountd serve`; killed on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub tcp: String,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(site: &Site) -> Self {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let log = site.dir.path().join(format!("mountd-{n}.log"));
        let notify_path = site.dir.path().join(format!("notify-{n}.sock"));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qgenome-mountd"))
            .args(["serve", "--config"])
            .arg(&site.config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 64];
        // A receive timeout makes recv(2) fail with EINTR, not restart, whenever this process
        // is stopped and continued (a frozen CI job); only the 120 s deadline ends the wait.
        let deadline = Instant::now() + Duration::from_secs(120);
        let n = loop {
            match notify.recv(&mut buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted && Instant::now() < deadline => {}
                r => {
                    break r.unwrap_or_else(|e| {
                        panic!(
                            "daemon not ready: {e}\n{}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        )
                    })
                }
            }
        };
        assert_eq!(&buf[..n], b"READY=1");
        let text = std::fs::read_to_string(&log).unwrap();
        let tcp = text
            .lines()
            .find_map(|l| l.split("listening on tcp ").nth(1))
            .expect("tcp address in log")
            .trim()
            .to_string();
        Self {
            child: Some(child),
            log,
            tcp,
            socket: site.socket.clone(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log contains `needle` (the daemon logs asynchronously).
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_n(needle, 1)
    }

    /// Wait until the log contains `needle` at least `n` times.
    pub fn wait_log_n(&self, needle: &str, n: usize) -> String {
        for _ in 0..600 {
            let t = self.log_text();
            if t.matches(needle).count() >= n {
                return t;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "log never contained {needle:?} {n} times:\n{}",
            self.log_text()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, without waiting.
    pub fn sigterm(&self) {
        let c = self.child.as_ref().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// Wait for the daemon to exit (after [`Daemon::sigterm`]); returns the exit status.
    pub fn terminate_wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().unwrap()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.terminate_wait()
    }

    pub fn unix_client(&self, site: &str) -> MountdSite {
        MountdSite::unix(site, &self.socket)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A loop device over a file, detached on drop even when the test panics.
pub struct LoopDevice {
    pub dev: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Self { dev }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let ok = Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status()
            .map(|s| s.success());
        if !matches!(ok, Ok(true)) {
            eprintln!("warning: could not detach {}", self.dev.display());
        }
    }
}

/// Deterministic share bytes for (seed, key).
pub fn share_bytes(seed: u64, key: &qgenome::sites::ShareKey, len: usize) -> Vec<u8> {
    let k = qgenome_mountd::layout::ShareKey {
        file_id: key.file,
        chunk: key.chunk,
        share: key.share,
    };
    let mut v = vec![0u8; len];
    qgenome_mountd::bench::pattern(seed, &k, &mut v);
    v
}
