//! A whole local deployment in one directory: key pools, share volumes, one `qgenome-mountd`
//! per site (the home one on a Unix socket, the others on loopback TCP over one-time-pad
//! links), and `qgenome mount`. Used by `qgenome demo`, `qgenome bench e2e` and the
//! integration tests. Everything it starts is stopped (and the mount unmounted) on drop.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::Value;

use crate::config::HomeConfig;

#[derive(Clone, Debug)]
pub struct DeployOptions {
    /// Everything lives under here (volumes, pools, catalog, mountpoint, logs).
    pub dir: PathBuf,
    pub k: usize,
    pub n: usize,
    pub volume_size: u64,
    /// Key material per link direction.
    pub key_size: u64,
    /// Key material of the direction from the sites to the home (replies, and the shares a
    /// read fetches), when not `key_size`.
    pub reply_key_size: Option<u64>,
    pub chunk_size: String,
    pub consent_wait_secs: u64,
    /// Where `qgenome`, `qgenome-mountd` live (default: beside the running executable).
    pub bin_dir: Option<PathBuf>,
    /// Consent by card (`[card]` in the home config, until-removed mode).
    pub card: bool,
    /// Ledger window of every link, both ends (a crash wastes up to this much key).
    pub key_window: u64,
    /// Where the pools of the direction from the sites to the home (replies, and the shares
    /// a read fetches) are written, when not beside the others: `DIR/home/<link>` and
    /// `DIR/<site>`, symlinked from the usual places (`keys::pool::provision_placed`).
    pub b2a_key_dir: Option<PathBuf>,
    /// Where the pids of the daemons this deployment has running are kept, current as it
    /// starts and reaps them: for a handler on another thread that must stop them whenever
    /// it runs (a demo's Ctrl-C, while the sites are still starting).
    pub running: Option<Running>,
}

/// Pids of running processes, shared with whoever must stop them (see
/// [`DeployOptions::running`]). A process is added under the lock as it is spawned, so a
/// holder of the lock has every one started so far, and none starts while it holds it.
pub type Running = std::sync::Arc<std::sync::Mutex<Vec<u32>>>;

impl DeployOptions {
    /// Key bytes of each direction of every link (the home is end a).
    pub fn pool_sizes(&self) -> crate::keys::pool::PoolSizes {
        crate::keys::pool::PoolSizes {
            a_to_b: self.key_size,
            b_to_a: self.reply_key_size.unwrap_or(self.key_size),
        }
    }

    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            k: 2,
            n: 3,
            volume_size: 1 << 30,
            key_size: 1 << 30,
            reply_key_size: None,
            chunk_size: "1M".into(),
            consent_wait_secs: 300,
            bin_dir: None,
            card: false,
            key_window: 16 << 20,
            b2a_key_dir: None,
            running: None,
        }
    }

    /// Where the deployment mounts `/qgenome`.
    pub fn mountpoint(&self) -> PathBuf {
        self.dir.join("qgenome")
    }
}

pub struct SiteProc {
    pub name: String,
    pub config: PathBuf,
    pub volume: PathBuf,
    pub state_dir: PathBuf,
    pub key_dir: Option<PathBuf>,
    pub link: Option<String>,
    pub log: PathBuf,
    child: Option<Child>,
}

pub struct Deployment {
    pub opts: DeployOptions,
    pub sites: Vec<SiteProc>,
    pub home_config: PathBuf,
    pub cfg: HomeConfig,
    pub mountpoint: PathBuf,
    pub mount_log: PathBuf,
    mount: Option<Child>,
    bin_dir: PathBuf,
}

/// A path as a TOML string, quoted and escaped (a directory name may hold `"` or `\\`).
fn toml_path(p: &Path) -> anyhow::Result<String> {
    let s = p.to_str().with_context(|| {
        format!(
            "{}: not UTF-8, which a TOML config cannot hold",
            p.display()
        )
    })?;
    Ok(toml::Value::String(s.to_string()).to_string())
}

/// Directory of the binaries: `QGENOME_BIN_DIR`, else beside this executable (or its parent,
/// for test binaries under `target/*/deps`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("QGENOME_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        if dir.join("qgenome-mountd").exists() {
            return Ok(dir.to_path_buf());
        }
    }
    bail!(
        "cannot find qgenome-mountd beside {} (build the workspace, or set QGENOME_BIN_DIR)",
        exe.display()
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for(
    what: &str,
    limit: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} not ready after {limit:?}")
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    ))
}

/// Call `f` until it succeeds or `limit` passes (a card or daemon takes a moment to be seen).
pub fn retry<T>(limit: Duration, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= limit => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Whether `path` is a mountpoint of a FUSE filesystem right now.
pub fn is_fuse_mount(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.len() > 4 && Path::new(f[4]) == canon && l.contains(" - fuse")
        })
    })
}

impl Deployment {
    /// Provision pools, format volumes and start every site's daemon.
    pub fn start_sites(opts: DeployOptions) -> anyhow::Result<Self> {
        let bin_dir = match &opts.bin_dir {
            Some(d) => d.clone(),
            None => bin_dir()?,
        };
        let dir = &opts.dir;
        // Volumes side by side, any k of which rebuild the data, and plaintext sources: for
        // this user alone.
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut sites = Vec::new();
        let names: Vec<String> = (0..opts.n)
            .map(|i| {
                if i == 0 {
                    "home".to_string()
                } else {
                    format!("site{i}")
                }
            })
            .collect();
        let mut home_sites = String::new();
        for (i, name) in names.iter().enumerate() {
            let sdir = dir.join(name);
            std::fs::create_dir_all(&sdir)?;
            let volume = sdir.join("volume");
            let state_dir = sdir.join("state");
            let status = Command::new(bin_dir.join("qgenome-mountd"))
                .args([
                    "format",
                    "--site",
                    name,
                    "--size",
                    &opts.volume_size.to_string(),
                    // Small volumes: zero them, so the first write of a block costs no more
                    // than the next (see `qgenome-mountd format --zero`).
                    "--zero",
                    "--volume",
                ])
                .arg(&volume)
                // The index where the daemon will look for it.
                .arg("--state")
                .arg(&state_dir)
                .stdout(Stdio::null())
                .status()
                .context("running qgenome-mountd format")?;
            if !status.success() {
                bail!(
                    "qgenome-mountd format {} failed: {status}",
                    volume.display()
                );
            }
            let mut site_toml = format!(
                "site = \"{name}\"\nvolume = {}\nstate_dir = {}\n",
                toml_path(&volume)?,
                toml_path(&state_dir)?
            );
            let (key_dir, link) = if i == 0 {
                let sock = sdir.join("mountd.sock");
                site_toml += &format!("unix_socket = {}\n", toml_path(&sock)?);
                home_sites += &format!(
                    "[[site]]\nname = \"{name}\"\nsocket = {}\n",
                    toml_path(&sock)?
                );
                (None, None)
            } else {
                let link = format!("home-{name}");
                let (home_end, site_end) = (dir.join("keys").join(&link), sdir.join("keys"));
                std::fs::create_dir_all(&home_end)?;
                std::fs::create_dir_all(&site_end)?;
                let far = match &opts.b2a_key_dir {
                    Some(d) => {
                        let far = (d.join("home").join(&link), d.join(name));
                        std::fs::create_dir_all(&far.0)?;
                        std::fs::create_dir_all(&far.1)?;
                        Some(far)
                    }
                    None => None,
                };
                let apart = far.as_ref().map(|(a, b)| crate::keys::pool::Apart {
                    direction: crate::keys::Direction::BtoA,
                    dir_a: a,
                    dir_b: b,
                });
                crate::keys::pool::provision_placed(
                    &link,
                    opts.pool_sizes(),
                    &home_end,
                    &site_end,
                    apart,
                )
                .with_context(|| format!("provisioning link {link}"))?;
                let port = free_port()?;
                site_toml += &format!(
                    "listen = \"127.0.0.1:{port}\"\n[[link]]\nname = \"{link}\"\nkey_dir = {}\nend = \"b\"\nwindow = {}\n",
                    toml_path(&site_end)?,
                    opts.key_window
                );
                home_sites += &format!(
                    "[[site]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\nlink = \"{link}\"\nkeys = {}\nend = \"a\"\nkey_window = \"{}\"\n",
                    toml_path(&home_end)?,
                    opts.key_window
                );
                (Some(home_end), Some(link))
            };
            let config = sdir.join("site.toml");
            std::fs::write(&config, site_toml)?;
            sites.push(SiteProc {
                name: name.clone(),
                config,
                volume,
                state_dir,
                key_dir,
                link,
                log: sdir.join("mountd.log"),
                child: None,
            });
        }
        let mountpoint = opts.mountpoint();
        std::fs::create_dir_all(&mountpoint)?;
        let home_text = format!(
            "mountpoint = {}\nstate_dir = {}\nchunk_size = \"{}\"\nconsent_wait_secs = {}\n[scheme]\nk = {}\nn = {}\n{home_sites}",
            toml_path(&mountpoint)?,
            toml_path(&dir.join("home-state"))?,
            opts.chunk_size,
            opts.consent_wait_secs,
            opts.k,
            opts.n
        );
        let home_text = if opts.card {
            home_text + "[card]\nmode = \"until-removed\"\n"
        } else {
            home_text
        };
        let home_config = dir.join("qgenome.toml");
        std::fs::write(&home_config, &home_text)?;
        let cfg = HomeConfig::parse(&home_text, &home_config)?;
        let mut d = Deployment {
            mount_log: dir.join("mount.log"),
            opts,
            sites,
            home_config,
            cfg,
            mountpoint,
            mount: None,
            bin_dir,
        };
        for i in 0..d.sites.len() {
            d.start_site(i)?;
        }
        Ok(d)
    }

    /// Start (or restart) site `i`'s daemon and wait until it accepts connections.
    pub fn start_site(&mut self, i: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.sites[i].log)?;
        let child = self
            .spawn(
                Command::new(self.bin_dir.join("qgenome-mountd"))
                    .arg("serve")
                    .arg("--config")
                    .arg(&self.sites[i].config)
                    .stdout(Stdio::from(log.try_clone()?))
                    .stderr(Stdio::from(log)),
            )
            .context("starting qgenome-mountd serve")?;
        self.sites[i].child = Some(child);
        let home = &self.cfg.sites[i];
        let (sock, addr) = (home.socket.clone(), home.address.clone());
        let name = self.sites[i].name.clone();
        wait_for(&format!("site {name}"), Duration::from_secs(20), || {
            if let Some(status) = self.sites[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "qgenome-mountd for site {name} exited: {status} (log: {})",
                    self.sites[i].log.display()
                );
            }
            Ok(match (&sock, &addr) {
                (Some(s), _) => std::os::unix::net::UnixStream::connect(s).is_ok(),
                (_, Some(a)) => std::net::TcpStream::connect(a).is_ok(),
                _ => false,
            })
        })
    }

    /// Stop site `i`'s daemon as systemd would: SIGTERM (it finishes what is in flight), and
    /// SIGKILL if it has not exited after 10 s.
    pub fn stop_site(&mut self, i: usize) {
        if let Some(mut c) = self.sites[i].child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = self.reap(&mut c);
        }
    }

    /// Spawn `cmd`, recording its pid in [`DeployOptions::running`] under the lock.
    fn spawn(&self, cmd: &mut Command) -> std::io::Result<Child> {
        let mut running = self.opts.running.as_ref().map(|r| lock_running(r));
        let child = cmd.spawn()?;
        if let Some(r) = running.as_mut() {
            r.push(child.id());
        }
        Ok(child)
    }

    /// Wait for `c`, which was told to stop, and forget its pid: once it has exited (left a
    /// zombie, so that its pid is no other process's yet), then reap it. An interrupt while it
    /// is still stopping (a clean unmount takes seconds) so still finds it.
    fn reap(&self, c: &mut Child) -> std::io::Result<std::process::ExitStatus> {
        use nix::sys::wait::{waitid, Id, WaitPidFlag};
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
        if let Some(r) = &self.opts.running {
            lock_running(r).retain(|&p| p != c.id());
        }
        c.wait()
    }

    /// The pool files of `direction` of every link, at both ends (the home's, then the
    /// site's), where the daemons open them.
    pub fn pool_paths(&self, direction: crate::keys::Direction) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        for s in &self.sites {
            if let (Some(home_end), Some(link)) = (&s.key_dir, &s.link) {
                let site_end = self.dir().join(&s.name).join("keys");
                for dir in [home_end, &site_end] {
                    paths.push(crate::keys::pool::pool_path(dir, link, direction));
                }
            }
        }
        paths
    }

    /// Move the pools of `direction` (both ends of every link) into `to`: stop the mount and
    /// the sites cleanly, copy each pool there and point a symlink at the copy from where the
    /// daemons open it, delete the old copy, and start everything again. The streams go on
    /// from their ledgers, which stay where they are (each restart skips the rest of one
    /// ledger window per stream, as any restart does). `qgenome bench e2e` moves the restore
    /// direction's pools into RAM this way once a store has freed the room.
    pub fn relocate_pools(
        &mut self,
        direction: crate::keys::Direction,
        to: &Path,
    ) -> anyhow::Result<()> {
        self.stop_mount(false)?;
        for i in 0..self.sites.len() {
            self.stop_site(i);
        }
        for (i, at) in self.pool_paths(direction).iter().enumerate() {
            let from = if at.is_symlink() {
                std::fs::read_link(at).with_context(|| format!("reading link {}", at.display()))?
            } else {
                at.clone()
            };
            let name = at.file_name().context("a pool path has a file name")?;
            // Both ends of a link have the same file name: keep them apart.
            let copy = to.join(format!("{i}-{}", name.to_string_lossy()));
            std::fs::copy(&from, &copy)
                .with_context(|| format!("copying {} to {}", from.display(), copy.display()))?;
            std::fs::remove_file(at).with_context(|| format!("removing {}", at.display()))?;
            std::os::unix::fs::symlink(&copy, at)
                .with_context(|| format!("linking {} to {}", at.display(), copy.display()))?;
            if &from != at {
                std::fs::remove_file(&from)
                    .with_context(|| format!("removing {}", from.display()))?;
            }
        }
        for i in 0..self.sites.len() {
            self.start_site(i)?;
        }
        self.mount()
    }

    /// SIGKILL site `i`'s daemon.
    pub fn kill_site(&mut self, i: usize) {
        if let Some(mut c) = self.sites[i].child.take() {
            let _ = c.kill();
            let _ = self.reap(&mut c);
        }
    }

    /// Start `qgenome mount` and wait for its READY=1 on `$NOTIFY_SOCKET`, as systemd does
    /// (`Type=notify`); by then the mountpoint must be live and the control socket up.
    pub fn mount(&mut self) -> anyhow::Result<()> {
        let notify_path = self.dir().join("mount.notify");
        let _ = std::fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)
            .with_context(|| format!("binding {}", notify_path.display()))?;
        notify.set_nonblocking(true)?;
        let child = self
            .spawn(
                Command::new(self.bin_dir.join("qgenome"))
                    .arg("mount")
                    .arg("--config")
                    .arg(&self.home_config)
                    .env("NOTIFY_SOCKET", &notify_path)
                    .stdout(log_file(&self.dir().join("mount.stdout"))?)
                    .stderr(Stdio::from(
                        std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&self.mount_log)?,
                    )),
            )
            .context("starting qgenome mount")?;
        self.mount = Some(child);
        let mp = self.mountpoint.clone();
        let res = wait_for("the mount (READY=1)", Duration::from_secs(20), || {
            if let Some(status) = self
                .mount
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "qgenome mount exited: {status} (log: {})",
                    self.mount_log.display()
                );
            }
            let mut buf = [0u8; 64];
            match notify.recv(&mut buf) {
                Ok(n) if &buf[..n] == b"READY=1" => {
                    ensure!(
                        is_fuse_mount(&mp) && self.cfg.control_socket().exists(),
                        "qgenome mount said READY=1 before {} was mounted and its control socket up",
                        mp.display()
                    );
                    Ok(true)
                }
                Ok(n) => bail!(
                    "qgenome mount sent {:?} to $NOTIFY_SOCKET before READY=1",
                    String::from_utf8_lossy(&buf[..n])
                ),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
                Err(e) => Err(e).context("reading $NOTIFY_SOCKET"),
            }
        });
        let _ = std::fs::remove_file(&notify_path);
        res
    }

    /// The running mount's process, if any.
    pub fn mount_process(&mut self) -> Option<&mut Child> {
        self.mount.as_mut()
    }

    /// Stop the mount: SIGTERM (clean unmount) or SIGKILL (a crash; the mountpoint is then
    /// detached with fusermount3). A clean stop that exits with a failure (the unmount, the
    /// catalog flush or the destruction of used link key failed) is an error naming its log.
    pub fn stop_mount(&mut self, crash: bool) -> anyhow::Result<()> {
        let mut exited = None;
        if let Some(mut c) = self.mount.take() {
            if crash {
                let _ = c.kill();
            } else {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
            exited = Some(self.reap(&mut c));
        }
        if is_fuse_mount(&self.mountpoint) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .status();
        }
        match exited {
            Some(Ok(st)) if !crash && !st.success() => anyhow::bail!(
                "qgenome mount exited with {st} at a clean stop; see {}",
                self.mount_log.display()
            ),
            Some(Err(e)) => anyhow::bail!("waiting for qgenome mount to exit: {e}"),
            _ => Ok(()),
        }
    }

    /// Process ids of everything this deployment started (for emergency cleanup).
    pub fn pids(&self) -> Vec<u32> {
        self.sites
            .iter()
            .filter_map(|s| s.child.as_ref().map(Child::id))
            .chain(self.mount.as_ref().map(Child::id))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn control(&self, req: &Value) -> anyhow::Result<Value> {
        Ok(crate::control::request(&self.cfg.control_socket(), req)?)
    }

    /// Every file under the deployment directory that holds data at rest: volumes, share
    /// indexes, key pools and ledgers, the catalog. (Not the mountpoint.)
    pub fn files_at_rest(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p == skip {
                    continue;
                }
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&p, skip, out),
                    Ok(t) if t.is_file() => out.push(p),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir(), &self.mountpoint, &mut out);
        out
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.stop_mount(false);
        // All signalled first, so that they stop together.
        for s in &self.sites {
            if let Some(c) = &s.child {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
        for i in 0..self.sites.len() {
            self.stop_site(i);
        }
    }
}

fn lock_running(r: &Running) -> std::sync::MutexGuard<'_, Vec<u32>> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// The aligned `window`-byte slices of some plaintext, for finding any of them in files at
/// rest. A file that held the plaintext (or any aligned stretch of `2 * window` bytes of it)
/// at any offset contains one of these windows.
pub struct Windows<'a> {
    window: usize,
    set: std::collections::HashSet<&'a [u8]>,
    /// One bit per hash of a window's first 8 bytes: a cheap test before the full lookup.
    filter: Vec<u64>,
}

impl<'a> Windows<'a> {
    const FILTER_BITS: u32 = 24;

    pub fn new(plaintext: &'a [u8], window: usize) -> Self {
        assert!(window >= 8);
        let mut filter = vec![0u64; (1 << Self::FILTER_BITS) / 64];
        let set: std::collections::HashSet<&[u8]> = plaintext.chunks_exact(window).collect();
        for w in &set {
            let h = Self::hash(w);
            filter[h / 64] |= 1 << (h % 64);
        }
        Self {
            window,
            set,
            filter,
        }
    }

    fn hash(w: &[u8]) -> usize {
        let x = u64::from_le_bytes(w[..8].try_into().expect("8 bytes"));
        (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - Self::FILTER_BITS)) as usize
    }

    fn found_in(&self, buf: &[u8]) -> bool {
        buf.windows(self.window).any(|w| {
            let h = Self::hash(w);
            self.filter[h / 64] >> (h % 64) & 1 == 1 && self.set.contains(w)
        })
    }

    /// Whether the file at `path` contains any of the windows. Streams the file.
    pub fn in_file(&self, path: &Path) -> anyhow::Result<bool> {
        use std::io::Read;
        if self.set.is_empty() {
            return Ok(false);
        }
        let mut f =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut buf = vec![0u8; 8 << 20];
        let mut carry = 0usize;
        loop {
            let n = f
                .read(&mut buf[carry..])
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                return Ok(false);
            }
            let end = carry + n;
            if self.found_in(&buf[..end]) {
                return Ok(true);
            }
            let keep = (self.window - 1).min(end);
            buf.copy_within(end - keep..end, 0);
            carry = keep;
        }
    }
}

/// The vpcd port pcscd listens on for virtual reader "Virtual PCD 00 00".
pub const VPCD_PORT: u16 = 35963;

fn port_listening(port: u16) -> anyhow::Result<bool> {
    // `ss`, not a connection attempt: connecting would look like a card to vpcd.
    let out = Command::new("ss")
        .args(["-ltnH"])
        .output()
        .context("running ss -ltn (iproute2)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().any(|l| {
        l.split_whitespace()
            .nth(3)
            .is_some_and(|a| a.ends_with(&format!(":{port}")))
    }))
}

/// pcscd with the vpcd driver: started here unless one already listens, stopped on drop.
pub struct Pcscd {
    child: Option<Child>,
}

impl Pcscd {
    pub fn ensure(log: &Path) -> anyhow::Result<Self> {
        if port_listening(VPCD_PORT)? {
            return Ok(Self { child: None });
        }
        let child = Command::new("pcscd")
            .args(["--foreground"])
            .stdin(Stdio::null())
            .stdout(log_file(log)?)
            .stderr(log_file(&log.with_extension("err"))?)
            .spawn()
            .context("starting pcscd --foreground (Debian package pcscd, with vsmartcard-vpcd)")?;
        let mut p = Self { child: Some(child) };
        wait_for("pcscd's virtual reader", Duration::from_secs(15), || {
            if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("pcscd exited: {status} (log: {})", log.display());
            }
            port_listening(VPCD_PORT)
        })?;
        Ok(p)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Pcscd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

/// The virtual PIV card (`qgenome-vcard`) in the virtual reader: present while it runs.
pub struct VirtualCard {
    child: Option<Child>,
}

impl VirtualCard {
    /// Insert the card whose identity (GUID, keys) lives in `state`.
    pub fn insert(bin_dir: &Path, state: &Path, log: &Path) -> anyhow::Result<Self> {
        let child = Command::new(bin_dir.join("qgenome-vcard"))
            .arg("--state")
            .arg(state)
            .stdin(Stdio::null())
            .stdout(log_file(log)?)
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?,
            ))
            .spawn()
            .context("starting qgenome-vcard")?;
        Ok(Self { child: Some(child) })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Take the card out of the reader.
    pub fn remove(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for VirtualCard {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths go into the generated configs quoted and escaped: a `"` or a `\` in a directory
    /// name reads back as itself.
    #[test]
    fn paths_in_generated_configs_read_back_unchanged() {
        for p in [
            "/tmp/plain",
            "/tmp/a \"quoted\" dir",
            "/tmp/back\\slash\\u0041",
            "/tmp/tab\there",
        ] {
            let text = format!("volume = {}\n", toml_path(Path::new(p)).unwrap());
            let v: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(v["volume"].as_str(), Some(p), "{text}");
        }
    }

    #[test]
    fn windows_are_found_at_any_offset_and_only_there() {
        let dir = tempfile::tempdir().unwrap();
        let plain: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let w = Windows::new(&plain, 64);
        let mut hay = vec![7u8; 9 << 20];
        let clean = dir.path().join("clean");
        std::fs::write(&clean, &hay).unwrap();
        assert!(!w.in_file(&clean).unwrap());
        // 200 plaintext bytes at an odd offset straddling the 8 MiB read boundary.
        let at = (8 << 20) - 101;
        hay[at..at + 200].copy_from_slice(&plain[5003..5203]);
        let dirty = dir.path().join("dirty");
        std::fs::write(&dirty, &hay).unwrap();
        assert!(w.in_file(&dirty).unwrap());
    }
}
