//! The home node's configuration file (`qgenome.toml`).
//!
//! ```toml
//! mountpoint = "/qgenome"
//! state_dir = "/var/lib/qgenome"     # catalog, control socket
//! chunk_size = "1M"                   # 4K..16M; a file holds at most 130 560 chunks
//! consent_wait_secs = 300             # 1..86400: a read without consent fails with EACCES after this
//! cache = "256M"                      # plaintext cache, wiped when a consent ends
//! allow_other = false                 # let users other than the mounting one use the mount
//!
//! [scheme]
//! k = 2
//! n = 3
//!
//! [[site]]                            # share 0: the home site's own mountd, no pad
//! name = "home"
//! socket = "/run/qgenome/home.sock"
//!
//! [[site]]                            # share 1: a remote site over a one-time-pad link
//! name = "lsa"
//! address = "192.0.2.10:7601"
//! link = "home-lsa"
//! keys = "/var/lib/qgenome/keys"      # directory with this end's pool and ledger files
//! end = "a"
//! key_window = "64M"                  # key reserved per ledger write (a crash wastes at most
//!                                     # this much); must equal the site's [[link]] window
//!
//! [[site]]                            # share 2: another remote site (one [[site]] per share)
//! name = "sendai-1"
//! address = "192.0.2.20:7601"
//! link = "home-sendai-1"
//! keys = "/var/lib/qgenome/keys"
//! end = "a"
//!
//! [card]                              # optional: consent by the patient's PIV card
//! mode = "until-removed"              # or "expiry", which needs `minutes`:
//! # minutes = 15                      # 1..10080 (7 days); only with mode = "expiry"
//! reader = "Virtual PCD"              # optional: only readers whose name contains this
//! admin_grant = false                 # optional: allow `qgenome consent grant` beside cards
//! ```
//!
//! Unknown keys are refused; every error names the key and the file.
use std::path::{Path, PathBuf};

/// The TOML example in the `//!` comment at the top of a source file (for the tests that
/// check the documented examples parse).
#[doc(hidden)]
pub fn toml_example(source: &str) -> String {
    source
        .lines()
        .map_while(|l| l.strip_prefix("//!"))
        .skip_while(|l| l.trim() != "```toml")
        .skip(1)
        .take_while(|l| l.trim() != "```")
        .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
        .collect()
}

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeConfig {
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    #[serde(default = "default_chunk")]
    pub chunk_size: String,
    #[serde(default = "default_wait")]
    pub consent_wait_secs: u64,
    #[serde(default = "default_cache")]
    pub cache: String,
    #[serde(default)]
    pub allow_other: bool,
    pub scheme: SchemeConfig,
    #[serde(rename = "site")]
    pub sites: Vec<SiteConfig>,
    /// Card consent; without it only `qgenome consent grant` opens sessions.
    #[serde(default)]
    pub card: Option<CardConfig>,
    /// Where this file was read from (for messages).
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemeConfig {
    pub k: usize,
    pub n: usize,
}

/// A site: either the home site's mountd over a Unix socket, or a remote one over a link.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    pub socket: Option<PathBuf>,
    pub address: Option<String>,
    pub link: Option<String>,
    pub keys: Option<PathBuf>,
    pub end: Option<String>,
    /// Key reserved per ledger write on this link (both ends must agree).
    pub key_window: Option<String>,
}

impl SiteConfig {
    /// The link's ledger window in bytes (default 64 MiB).
    pub fn window_bytes(&self) -> Result<u64, String> {
        match &self.key_window {
            None => Ok(crate::link::StreamOptions::default().window),
            Some(w) => match crate::cli::parse_size(w)? {
                v if v < MIN_KEY_WINDOW => Err(format!(
                    "{v} bytes is below the least window, 1M (\"64M\" is what was meant?)"
                )),
                v => Ok(v),
            },
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardConfig {
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Only with `mode = "expiry"` (default 15): see [`CardConfig::minutes`].
    minutes: Option<u64>,
    pub reader: Option<String>,
    /// Whether `qgenome consent grant` (a session without the card, audited with its caller)
    /// is allowed beside the cards. Off unless set: with cards, a consent comes from the card.
    #[serde(default)]
    pub admin_grant: bool,
}

impl CardConfig {
    /// How long a consent given by presenting the card lasts, in `expiry` mode.
    pub fn minutes(&self) -> u64 {
        self.minutes.unwrap_or_else(default_minutes)
    }
}

fn default_mode() -> String {
    "until-removed".into()
}
fn default_minutes() -> u64 {
    15
}

fn default_chunk() -> String {
    "1M".into()
}
fn default_wait() -> u64 {
    300
}
/// `p` made absolute, with `.` and `..` taken out and each prefix that exists resolved
/// through its symlinks (the parts that do not exist yet kept as written).
fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => {
                out.push(c);
                if let Ok(r) = out.canonicalize() {
                    out = r;
                }
            }
        }
    }
    out
}

/// Bytes of memory this machine has (0 if the system will not say).
fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64)
}

fn default_cache() -> String {
    "256M".into()
}

/// The smallest key window a link takes (both ends: the site's `window` too): below it a
/// ledger `fdatasync` would come at nearly every frame.
pub const MIN_KEY_WINDOW: u64 = 1 << 20;

/// The directory relative paths in the config at `path` are taken from: the file's own.
pub fn config_dir(path: &Path) -> PathBuf {
    std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
}

/// A remote site's `address`: `host:port` (a name, an IPv4 address, or an IPv6 one in
/// brackets), with a port from 1 to 65535. Names are resolved when the mount connects.
fn check_address(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?} is not host:port"));
    };
    if host.is_empty() || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']'))) {
        return Err(format!(
            "{address:?} is not host:port (an IPv6 address goes in brackets: [::1]:7601)"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "{address:?}: the port must be a number from 1 to 65535"
        )),
    }
}

impl HomeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: HomeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.path = path.to_path_buf();
        // Relative paths are the config file's neighbours, wherever the mount or a
        // `qgenome status` is started from.
        let base = config_dir(path);
        for p in [&mut cfg.mountpoint, &mut cfg.state_dir] {
            *p = base.join(&*p);
        }
        for s in &mut cfg.sites {
            for p in [s.socket.as_mut(), s.keys.as_mut()].into_iter().flatten() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let SchemeConfig { k, n } = self.scheme;
        if !(2..=16).contains(&n) || !(2..=n).contains(&k) {
            return Err(self.invalid(
                "scheme",
                format!("({k},{n}) unsupported: need 2 <= k <= n <= 16"),
            ));
        }
        if self.sites.len() != n {
            return Err(self.invalid(
                "site",
                format!(
                    "{} sites listed, the scheme issues n = {n} shares (one per site)",
                    self.sites.len()
                ),
            ));
        }
        if !(1..=86_400).contains(&self.consent_wait_secs) {
            return Err(self.invalid("consent_wait_secs", "must be between 1 and 86400 (a day)"));
        }
        let chunk = self.chunk_bytes()?;
        let share = crate::sharing::Scheme::new(k, n)
            .map_err(|e| self.invalid("scheme", e.to_string()))?
            .share_len(chunk);
        if share > crate::wire::msg::MAX_DATA {
            return Err(self.invalid(
                "chunk_size",
                format!(
                    "under ({k},{n}) a chunk of {chunk} bytes makes shares of {share} bytes, more than the {} a site accepts; use at most 15M",
                    crate::wire::msg::MAX_DATA
                ),
            ));
        }
        self.cache_bytes()?;
        for (i, s) in self.sites.iter().enumerate() {
            let key = |f: &str| format!("site[{i}].{f}");
            if s.name.is_empty() || s.name.contains(['/', '\0', ' ']) {
                return Err(self.invalid(
                    &key("name"),
                    format!("{:?} is not a usable site name", s.name),
                ));
            }
            if self.sites[..i].iter().any(|o| o.name == s.name) {
                return Err(self.invalid(&key("name"), format!("site {} is listed twice", s.name)));
            }
            match (&s.socket, &s.address) {
                (Some(_), None) => {
                    if i > 0 {
                        // Only the home site's own mountd is reached without a link; a second
                        // socket site puts two shares of every chunk on one machine.
                        return Err(self.invalid(
                            &key("socket"),
                            "only the home site (site[0]) is reached over a Unix socket; give this site an address, link and keys",
                        ));
                    }
                    for (f, v) in [
                        ("link", s.link.is_some()),
                        ("keys", s.keys.is_some()),
                        ("end", s.end.is_some()),
                        ("key_window", s.key_window.is_some()),
                    ] {
                        if v {
                            return Err(self.invalid(
                                &key(f),
                                "a socket site has no link, keys, end or key_window",
                            ));
                        }
                    }
                }
                (None, Some(address)) => {
                    // Two entries reaching one mountd would put two shares of every chunk
                    // on it, and one link's key stream would serve both.
                    for (f, same) in [
                        (
                            "address",
                            self.sites[..i]
                                .iter()
                                .position(|o| o.address.as_ref() == Some(address)),
                        ),
                        (
                            "link",
                            self.sites[..i]
                                .iter()
                                .position(|o| o.link.is_some() && o.link == s.link),
                        ),
                    ] {
                        if let Some(j) = same {
                            return Err(self.invalid(
                                &key(f),
                                format!("site {} has the same {f} as site[{j}] ({}): each site needs a mountd and a link of its own", s.name, self.sites[j].name),
                            ));
                        }
                    }
                    for (f, v) in [
                        ("link", s.link.is_some()),
                        ("keys", s.keys.is_some()),
                        ("end", s.end.is_some()),
                    ] {
                        if !v {
                            return Err(
                                self.invalid(&key(f), "required for a remote (address) site")
                            );
                        }
                    }
                    if !matches!(s.end.as_deref(), Some("a" | "b")) {
                        return Err(self.invalid(&key("end"), "must be \"a\" or \"b\""));
                    }
                    check_address(address).map_err(|e| self.invalid(&key("address"), e))?;
                    if let Some(link) = &s.link {
                        crate::keys::pool::check_link_name(link)
                            .map_err(|e| self.invalid(&key("link"), e.to_string()))?;
                    }
                    s.window_bytes()
                        .map_err(|e| self.invalid(&key("key_window"), e))?;
                }
                _ => {
                    return Err(self.invalid(
                        &key("socket"),
                        "give exactly one of `socket` (home site) or `address` (remote site)",
                    ));
                }
            }
        }
        if let Some(card) = &self.card {
            if !matches!(card.mode.as_str(), "until-removed" | "expiry") {
                return Err(self.invalid("card.mode", "must be \"until-removed\" or \"expiry\""));
            }
            if card.mode != "expiry" && card.minutes.is_some() {
                return Err(self.invalid(
                    "card.minutes",
                    "applies only with mode = \"expiry\" (an until-removed consent ends when the card is removed)",
                ));
            }
            if card.mode == "expiry"
                && !(1..=crate::consent::MAX_GRANT_MINUTES).contains(&card.minutes())
            {
                return Err(self.invalid(
                    "card.minutes",
                    format!(
                        "must be between 1 and {} (7 days)",
                        crate::consent::MAX_GRANT_MINUTES
                    ),
                ));
            }
        }
        if self.sites[0].socket.is_none() {
            return Err(self.invalid(
                "site[0].socket",
                "the first site holds share 0 and must be the home site's mountd",
            ));
        }
        Ok(())
    }

    pub fn chunk_bytes(&self) -> Result<usize, ConfigError> {
        let v =
            crate::cli::parse_size(&self.chunk_size).map_err(|e| self.invalid("chunk_size", e))?;
        if !(4096..=16 << 20).contains(&v) {
            return Err(self.invalid("chunk_size", "must be between 4K and 16M"));
        }
        Ok(v as usize)
    }

    /// What only the mount checks (the other commands read the file on other machines, or
    /// with the mountpoint given on the command line): `state_dir` (the catalog and the
    /// control socket) not under `mountpoint`, where the mount would hide the control socket
    /// from every admin command and the next start find the mountpoint not empty; and a
    /// `cache` (locked in memory) of at most half this machine's memory, more being a slip
    /// ("256G" for "256M") that would end in the OOM killer mid-read. Paths are compared
    /// resolved ([`resolved`]: symlinks and `..` of the parts that exist).
    pub fn check_for_mount(&self, mountpoint: &Path) -> Result<(), ConfigError> {
        let cache = self.cache_bytes()?;
        let memory = physical_memory();
        if memory > 0 && cache as u64 > memory / 2 {
            return Err(self.invalid(
                "cache",
                format!(
                    "{cache} bytes is more than half this machine's memory ({memory} bytes); the cache is locked in memory (\"256M\" meant?)"
                ),
            ));
        }
        if resolved(&self.state_dir).starts_with(resolved(mountpoint)) {
            return Err(self.invalid(
                "state_dir",
                format!(
                    "{} is under the mountpoint {}: the mount would hide the control socket and catalog",
                    self.state_dir.display(),
                    mountpoint.display()
                ),
            ));
        }
        Ok(())
    }

    pub fn cache_bytes(&self) -> Result<usize, ConfigError> {
        crate::cli::parse_size(&self.cache)
            .map(|v| v as usize)
            .map_err(|e| self.invalid("cache", e))
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.state_dir.join("catalog")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }
}

#[cfg(test)]
mod tests {
    /// The example at the top of this file is a configuration the parser takes.
    #[test]
    fn the_documented_example_parses() {
        let text = toml_example(include_str!("config.rs"));
        assert!(text.contains("[[site]]"), "example found: {text}");
        let cfg = HomeConfig::parse(&text, Path::new("src/config.rs"))
            .unwrap_or_else(|e| panic!("the example in src/config.rs: {e}"));
        assert_eq!(cfg.sites.len(), cfg.scheme.n);
    }

    use super::*;

    const GOOD: &str = r#"
mountpoint = "/qgenome"
state_dir = "/tmp/q"
[scheme]
k = 2
n = 3
[[site]]
name = "home"
socket = "/run/h.sock"
[[site]]
name = "a"
address = "127.0.0.1:1"
link = "home-a"
keys = "/k"
end = "a"
[[site]]
name = "b"
address = "127.0.0.1:2"
link = "home-b"
keys = "/k"
end = "a"
"#;

    fn err(text: &str) -> String {
        HomeConfig::parse(text, Path::new("/etc/q.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = HomeConfig::parse(GOOD, Path::new("/etc/q.toml")).unwrap();
        assert_eq!(c.chunk_bytes().unwrap(), 1 << 20);
        assert_eq!(c.consent_wait_secs, 300);
        assert_eq!(c.control_socket(), Path::new("/tmp/q/control.sock"));
    }

    /// Two entries that reach one mountd would put two shares of every chunk on one machine
    /// (k = 2: that machine alone rebuilds every chunk), so the config refuses them.
    #[test]
    fn two_entries_reaching_one_mountd_are_refused() {
        let e = err(&GOOD.replacen(
            "address = \"127.0.0.1:1\"\nlink = \"home-a\"\nkeys = \"/k\"\nend = \"a\"",
            "socket = \"/run/h.sock\"",
            1,
        ));
        assert!(
            e.contains("site[1].socket") && e.contains("only the home site"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:2", "127.0.0.1:1"));
        assert!(
            e.contains("site[2].address") && e.contains("same address as site[1] (a)"),
            "{e}"
        );
        let e = err(&GOOD.replace("home-b", "home-a"));
        assert!(
            e.contains("site[2].link") && e.contains("same link as site[1] (a)"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "socket = \"/run/h.sock\"",
            "socket = \"/run/h.sock\"\nkey_window = \"junk\"",
        ));
        assert!(e.contains("site[0].key_window"), "{e}");
    }

    /// Slips that parse but would hurt the mount: a state directory it hides, a cache larger
    /// than the machine can lock.
    #[test]
    fn a_state_dir_under_the_mountpoint_and_a_cache_past_memory_are_refused() {
        let mount_err = |text: &str| {
            let c = HomeConfig::parse(text, Path::new("/etc/q.toml")).unwrap();
            c.check_for_mount(&c.mountpoint).unwrap_err().to_string()
        };
        let e =
            mount_err(&GOOD.replace("state_dir = \"/tmp/q\"", "state_dir = \"/qgenome/.state\""));
        assert!(
            e.contains("/etc/q.toml")
                && e.contains("key `state_dir`")
                && e.contains("under the mountpoint"),
            "{e}"
        );
        // Only a whole path component counts: /qgenome-state is beside /qgenome.
        let c = HomeConfig::parse(
            &GOOD.replace("state_dir = \"/tmp/q\"", "state_dir = \"/qgenome-state\""),
            Path::new("/etc/q.toml"),
        )
        .unwrap();
        c.check_for_mount(&c.mountpoint).unwrap();
        // A mountpoint given with `..`, or through a symlink, is the same place.
        let dir = tempfile::tempdir().unwrap();
        let (real, link) = (dir.path().join("real"), dir.path().join("link"));
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let under = |state: &Path| {
            let text = GOOD.replace(
                "state_dir = \"/tmp/q\"",
                &format!("state_dir = {:?}", state.to_str().unwrap()),
            );
            HomeConfig::parse(&text, Path::new("/etc/q.toml")).unwrap()
        };
        let c = under(&real.join(".state"));
        for mp in [
            link.clone(),
            dir.path().join("real/../real"),
            link.join("x/.."),
        ] {
            let e = c.check_for_mount(&mp).unwrap_err().to_string();
            assert!(e.contains("under the mountpoint"), "{}: {e}", mp.display());
        }
        under(&dir.path().join("state"))
            .check_for_mount(&link)
            .unwrap();
        // The other commands still read a file with a cache this machine could not lock
        // (the mount runs on another one, say); the mount refuses it.
        let big = GOOD.replacen(
            "mountpoint = \"/qgenome\"",
            "mountpoint = \"/qgenome\"\ncache = \"1024T\"",
            1,
        );
        HomeConfig::parse(&big, Path::new("/etc/q.toml")).unwrap();
        let e = mount_err(&big);
        assert!(e.contains("key `cache`") && e.contains("memory"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let e = err(&GOOD.replace("state_dir", "stat_dir"));
        assert!(e.contains("/etc/q.toml") && e.contains("stat_dir"), "{e}");
        let e = err(&GOOD.replace("k = 2", "k = 4"));
        assert!(e.contains("key `scheme`"), "{e}");
        let e = err(&GOOD.replace("end = \"a\"\n[[site]]", "end = \"c\"\n[[site]]"));
        assert!(e.contains("site[1].end"), "{e}");
        let e = err(&GOOD.replace("name = \"b\"", "name = \"a\""));
        assert!(e.contains("site[2].name") && e.contains("twice"), "{e}");
        let e = err(&GOOD.replacen(
            "mountpoint = \"/qgenome\"",
            "mountpoint = \"/qgenome\"\nchunk_size = \"1K\"",
            1,
        ));
        assert!(e.contains("chunk_size"), "{e}");
        // Under (2,7) a share of a 16M chunk is 6 pieces padded to 64 bytes each: past the
        // 16 MiB a site takes in one message. Under (2,3) it is exactly 16 MiB, and accepted.
        let sites: String = (3..7)
            .map(|i| format!("[[site]]\nname = \"s{i}\"\naddress = \"127.0.0.1:{i}\"\nlink = \"l{i}\"\nkeys = \"/k\"\nend = \"a\"\n"))
            .collect();
        let seven = format!("{GOOD}{sites}").replace("n = 3", "n = 7");
        let big = |text: &str| {
            text.replacen(
                "mountpoint = \"/qgenome\"",
                "mountpoint = \"/qgenome\"\nchunk_size = \"16M\"",
                1,
            )
        };
        HomeConfig::parse(&seven, Path::new("/etc/q.toml")).unwrap();
        HomeConfig::parse(&big(GOOD), Path::new("/etc/q.toml")).unwrap();
        let e = err(&big(&seven));
        assert!(
            e.contains("chunk_size") && e.contains("a site accepts"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}\n[card]\nmode = \"expiry\"\nminutes = 99999999999\n"
        ));
        assert!(e.contains("card.minutes") && e.contains("7 days"), "{e}");
        // Ignored before under the default mode; now refused.
        let e = err(&format!("{GOOD}\n[card]\nminutes = 30\n"));
        assert!(
            e.contains("card.minutes") && e.contains("only with mode"),
            "{e}"
        );
        let e = err(&GOOD.replacen(
            "mountpoint = \"/qgenome\"",
            "mountpoint = \"/qgenome\"\nconsent_wait_secs = 18446744073709551615",
            1,
        ));
        assert!(e.contains("consent_wait_secs"), "{e}");
        let e = err(&GOOD.replace("link = \"home-b\"\n", ""));
        assert!(e.contains("site[2].link") && e.contains("required"), "{e}");
        for bad in [
            "127.0.0.1",
            "nowhere",
            ":7601",
            "host:0",
            "host:http",
            "::1:7601",
        ] {
            let e = err(&GOOD.replace("127.0.0.1:2", bad));
            assert!(
                e.contains("site[2].address") && e.contains(bad),
                "{bad}: {e}"
            );
        }
        for good in ["[::1]:7601", "site-b.example:7601"] {
            HomeConfig::parse(&GOOD.replace("127.0.0.1:2", good), Path::new("/etc/q.toml"))
                .unwrap();
        }
        let e = err(&GOOD.replace("home-b", "../../etc/x"));
        assert!(e.contains("site[2].link"), "{e}");
        let e = err(&GOOD.replace(
            "link = \"home-b\"",
            "link = \"home-b\"\nkey_window = \"64\"",
        ));
        assert!(e.contains("site[2].key_window") && e.contains("1M"), "{e}");
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_files_directory() {
        let text = GOOD
            .replace("\"/tmp/q\"", "\"state\"")
            .replace("\"/run/h.sock\"", "\"run/h.sock\"")
            .replace("keys = \"/k\"", "keys = \"../keys\"");
        let cfg = HomeConfig::parse(&text, Path::new("/etc/qgenome/q.toml")).unwrap();
        assert_eq!(cfg.state_dir, Path::new("/etc/qgenome/state"));
        assert_eq!(
            cfg.control_socket(),
            Path::new("/etc/qgenome/state/control.sock")
        );
        assert_eq!(cfg.mountpoint, Path::new("/qgenome"));
        assert_eq!(
            cfg.sites[0].socket.as_deref(),
            Some(Path::new("/etc/qgenome/run/h.sock"))
        );
        assert_eq!(
            cfg.sites[1].keys.as_deref(),
            Some(Path::new("/etc/qgenome/../keys"))
        );
    }
}
