//! The site configuration file (TOML).
//!
//! ```toml
//! site = "sendai-1"
//! volume = "/srv/qgenome/shares.vol"
//! state_dir = "/var/lib/qgenome-mountd/sendai-1"  # the share index (under systemd: below
//!                                              # /var/lib/qgenome-mountd, the unit's writable paths)
//! unix_socket = "/run/qgenome/sendai-1.sock"   # the home mount's local socket (no pad)
//! listen = "0.0.0.0:7601"                       # sealed TCP: the home's [[site]] address
//! [[link]]
//! name = "home-sendai-1"         # as given to `qgenome keys provision --link`
//! key_dir = "/var/lib/qgenome-mountd/keys"
//! end = "b"                       # which end of the link this site holds
//! [limits]
//! max_share_bytes = 67108864
//! queue_depth = 32
//! fixed_buffers = 16
//! durability = "rwf-dsync"             # or "fdatasync" (a disk whose flush is dear), "o-dsync"
//! write_depth = 4                      # share writes at the volume at once (the rest wait)
//! ```

use std::path::{Path, PathBuf};

use crate::store::StoreOptions;
use crate::volume::{Durability, UringOptions};

/// Errors loading a configuration; each names the file, and the key when one is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// One site's mountd settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The site name written into the volume's superblock.
    pub site: String,
    /// The share volume: a block device or a preallocated file.
    pub volume: PathBuf,
    /// Where the share index lives.
    pub state_dir: PathBuf,
    /// Unix socket for the home site's own mount (plain frames, protected by file mode).
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// TCP address for sealed link connections, e.g. "0.0.0.0:7474".
    #[serde(default)]
    pub listen: Option<String>,
    /// The links this site accepts connections on.
    #[serde(default, rename = "link")]
    pub links: Vec<LinkConfig>,
    #[serde(default)]
    pub limits: Limits,
}

/// Which end of a link a key directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkEnd {
    A,
    B,
}

impl LinkEnd {
    pub fn end(self) -> qgenome::keys::End {
        match self {
            LinkEnd::A => qgenome::keys::End::A,
            LinkEnd::B => qgenome::keys::End::B,
        }
    }
}

/// One `[[link]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// The link name given to `qgenome keys provision --link`.
    pub name: String,
    /// The directory holding this end's pools and ledgers.
    pub key_dir: PathBuf,
    /// The end this site holds.
    pub end: LinkEnd,
    /// Key reserved per ledger write (a crash wastes at most this much); must match the
    /// other end's `key_window`. A size as the home config writes it (`"64M"`) or bytes.
    /// Default 64 MiB.
    #[serde(default = "default_window", deserialize_with = "size_or_bytes")]
    pub window: u64,
}

fn default_window() -> u64 {
    qgenome::link::StreamOptions::default().window
}

/// A size written as the home config writes sizes (`"64M"`), or a number of bytes.
fn size_or_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Size;
    impl serde::de::Visitor<'_> for Size {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size such as \"64M\", or a number of bytes")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("{v}: a size cannot be negative")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Size)
}

/// The smallest key window a link takes, as at the home end (a bare number meant as MiB,
/// `window = 64`, is caught).
pub const MIN_WINDOW: u64 = qgenome::config::MIN_KEY_WINDOW;

/// Limits and tuning.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The largest share accepted, in bytes.
    pub max_share_bytes: u64,
    /// io_uring submission queue entries (>= 16).
    pub queue_depth: u32,
    /// Registered buffers of the io_uring thread.
    pub fixed_buffers: u16,
    /// How writes are made durable before a put is acknowledged.
    pub durability: Durability,
    /// Connections served at once (more wait in the listen queue).
    pub max_connections: u32,
    /// TCP connections from one IP address (an IPv6 /64) whose HELLO has not been welcomed
    /// yet, at once (default: half of `max_connections`; capped at it); more from that
    /// address are closed as they come. So a keyless client on one address cannot hold every
    /// slot the remote sites' home needs.
    pub max_unwelcomed_per_address: Option<u32>,
    /// Bytes of frames being received, processed or answered at once.
    pub max_inflight_bytes: u64,
    /// Share writes at the volume at once (1..=256), whatever the number of connections
    /// putting: a put past it waits, its share received, verified and its header made, in
    /// the order the puts came (the store's `write_depth`). Tombstones and reads are not
    /// counted.
    pub write_depth: u32,
    /// Seconds a started frame may take to arrive completely; also how long a new
    /// connection may take to deliver its first frame (a TCP connection's HELLO), and how
    /// long a reply may take to be taken by its peer.
    pub frame_timeout_secs: u64,
    /// Seconds a connection may stay idle between frames before the server closes it.
    pub idle_timeout_secs: u64,
}

/// The longest `frame_timeout_secs` accepted (an hour).
pub const MAX_FRAME_TIMEOUT_SECS: u64 = 3600;
/// The longest `idle_timeout_secs` accepted (a day).
pub const MAX_IDLE_TIMEOUT_SECS: u64 = 86_400;

impl Limits {
    /// `max_unwelcomed_per_address` as it applies: half of `max_connections` unless set,
    /// never more than `max_connections`, at least 1.
    pub fn unwelcomed_per_address(&self) -> u32 {
        self.max_unwelcomed_per_address
            .unwrap_or(self.max_connections / 2)
            .clamp(1, self.max_connections.max(1))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_share_bytes: StoreOptions::default().max_share_len,
            queue_depth: 32,
            fixed_buffers: 16,
            durability: Durability::default(),
            max_connections: 64,
            max_unwelcomed_per_address: None,
            max_inflight_bytes: 256 << 20,
            write_depth: crate::store::DEFAULT_WRITE_DEPTH as u32,
            frame_timeout_secs: 30,
            idle_timeout_secs: 300,
        }
    }
}

impl SiteConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        // toml's message names the unknown or mistyped key and its line.
        let mut c: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // Relative paths are the config file's neighbours, wherever the daemon starts.
        let base = qgenome::config::config_dir(path);
        for p in [
            Some(&mut c.volume),
            Some(&mut c.state_dir),
            c.unix_socket.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            *p = base.join(&*p);
        }
        for l in &mut c.links {
            l.key_dir = base.join(&l.key_dir);
        }
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if c.site.is_empty() || c.site.len() > crate::layout::MAX_SITE_LEN {
            return Err(bad(
                "site",
                format!("must be 1..={} bytes", crate::layout::MAX_SITE_LEN),
            ));
        }
        // A number outside `allowed`, named by its key with the range.
        let within = |key: &str, v: u64, allowed: std::ops::RangeInclusive<u64>| {
            if allowed.contains(&v) {
                return Ok(());
            }
            let (lo, hi) = allowed.into_inner();
            Err(bad(key, format!("{v} (allowed {lo}..={hi})")))
        };
        within("limits.queue_depth", c.limits.queue_depth.into(), 16..=4096)?;
        within(
            "limits.max_share_bytes",
            c.limits.max_share_bytes,
            1..=1 << 30,
        )?;
        if c.limits.max_connections == 0 {
            return Err(bad("limits.max_connections", "must be at least 1".into()));
        }
        if c.limits.max_unwelcomed_per_address == Some(0) {
            return Err(bad(
                "limits.max_unwelcomed_per_address",
                "must be at least 1".into(),
            ));
        }
        // Each registered buffer pins a share's worth of memory at start (~1 MiB): a typo
        // must not lock gigabytes.
        within(
            "limits.fixed_buffers",
            c.limits.fixed_buffers.into(),
            0..=1024,
        )?;
        within("limits.write_depth", c.limits.write_depth.into(), 1..=256)?;
        let min_inflight = (qgenome::wire::msg::MAX_MSG as u64) * 2;
        if c.limits.max_inflight_bytes < min_inflight {
            return Err(bad(
                "limits.max_inflight_bytes",
                format!(
                    "{} (at least {min_inflight}: two largest frames)",
                    c.limits.max_inflight_bytes
                ),
            ));
        }
        // Bounded above too: deadlines are `now + timeout`, which a huge value overflows
        // (a panic on every connection).
        within(
            "limits.frame_timeout_secs",
            c.limits.frame_timeout_secs,
            1..=MAX_FRAME_TIMEOUT_SECS,
        )?;
        within(
            "limits.idle_timeout_secs",
            c.limits.idle_timeout_secs,
            1..=MAX_IDLE_TIMEOUT_SECS,
        )?;
        if let Some(l) = &c.listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad("listen", format!("{l:?} is not an address:port")));
            }
            if c.links.is_empty() {
                return Err(bad(
                    "listen",
                    "TCP needs at least one [[link]] (every remote frame is sealed)".into(),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, l) in c.links.iter().enumerate() {
            if let Err(e) = qgenome::keys::pool::check_link_name(&l.name) {
                return Err(bad(&format!("link[{i}].name"), e.to_string()));
            }
            if !seen.insert(l.name.clone()) {
                return Err(bad(
                    &format!("link[{i}].name"),
                    format!("link {:?} appears twice", l.name),
                ));
            }
            if l.window < MIN_WINDOW {
                return Err(bad(
                    &format!("link[{i}].window"),
                    format!(
                        "{} bytes is below the least window, 1M (a size such as \"64M\" is what was meant?)",
                        l.window
                    ),
                ));
            }
        }
        Ok(c)
    }

    pub fn uring_options(&self) -> UringOptions {
        UringOptions {
            queue_depth: self.limits.queue_depth,
            durability: self.limits.durability,
            fixed_buffers: self.limits.fixed_buffers,
            ..UringOptions::default()
        }
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_share_len: self.limits.max_share_bytes,
            write_depth: self.limits.write_depth as usize,
            ..StoreOptions::default()
        }
    }
}

/// Sizes such as `2G`, `512MiB`, `4096` (binary units): the one parser the project uses.
pub use qgenome::cli::parse_size;

#[cfg(test)]
mod tests {
    /// The example configurations the README points to (and `make install` installs) parse,
    /// and fit together: the home's Unix-socket site is `site-home.toml`'s socket, and each
    /// remote site with an example is reached at its `listen` port over its one link, with
    /// the other end and the same window.
    #[test]
    fn the_installed_examples_parse_and_fit_together() {
        let home = qgenome::config::HomeConfig::parse(
            include_str!("../../examples/qgenome.toml"),
            Path::new("examples/qgenome.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let sites: Vec<SiteConfig> = [
            (
                "site-home.toml",
                include_str!("../../examples/site-home.toml"),
            ),
            (
                "site-sendai-1.toml",
                include_str!("../../examples/site-sendai-1.toml"),
            ),
        ]
        .iter()
        .map(|(name, text)| {
            SiteConfig::parse(text, &Path::new("examples").join(name))
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
        assert_eq!(home.sites.len(), home.scheme.n);
        for s in &sites {
            let h = home
                .sites
                .iter()
                .find(|h| h.name == s.site)
                .unwrap_or_else(|| panic!("site {} is not in examples/qgenome.toml", s.site));
            match (&h.socket, &s.listen) {
                (Some(sock), None) => {
                    assert_eq!(Some(sock), s.unix_socket.as_ref(), "site {}", s.site);
                    assert!(s.links.is_empty());
                }
                (None, Some(listen)) => {
                    let port = |a: &str| a.rsplit(':').next().unwrap().to_string();
                    assert_eq!(port(h.address.as_deref().unwrap()), port(listen));
                    let [l] = &s.links[..] else {
                        panic!("site {}: one [[link]]", s.site)
                    };
                    assert_eq!(Some(&l.name), h.link.as_ref());
                    assert_eq!(h.end.as_deref(), Some("a"));
                    assert_eq!(l.end.end(), qgenome::keys::End::B);
                    assert_eq!(Ok(l.window), h.window_bytes());
                }
                other => panic!("site {}: {other:?}", s.site),
            }
        }
    }

    /// The example at the top of this file is a configuration the parser takes.
    #[test]
    fn the_documented_example_parses() {
        let text = qgenome::config::toml_example(include_str!("config.rs"));
        assert!(text.contains("[[link]]"), "example found: {text}");
        let cfg = SiteConfig::parse(&text, Path::new("mountd/src/config.rs"))
            .unwrap_or_else(|e| panic!("the example in mountd/src/config.rs: {e}"));
        assert_eq!(cfg.links.len(), 1);
    }

    use super::*;

    const GOOD: &str = r#"
site = "sendai-1"
volume = "/srv/q/shares.vol"
state_dir = "/var/lib/q"
[limits]
queue_depth = 64
durability = "fdatasync"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = SiteConfig::parse(GOOD, Path::new("site.toml")).unwrap();
        assert_eq!(c.site, "sendai-1");
        assert_eq!(c.limits.queue_depth, 64);
        assert_eq!(c.limits.durability, Durability::Fdatasync);
        assert_eq!(c.limits.fixed_buffers, 16);
        assert_eq!(
            c.store_options().write_depth,
            crate::store::DEFAULT_WRITE_DEPTH
        );
        assert_eq!(c.uring_options().queue_depth, 64);
        let c = SiteConfig::parse(&format!("{GOOD}write_depth = 16\n"), Path::new("s.toml"));
        assert_eq!(c.unwrap().store_options().write_depth, 16);
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_files_directory() {
        let text = format!(
            "{}unix_socket = \"run/q.sock\"\n[[link]]\nname = \"l\"\nkey_dir = \"keys\"\nend = \"b\"\n",
            GOOD.replace("/srv/q/shares.vol", "shares.vol")
                .replace("[limits]\nqueue_depth = 64\ndurability = \"fdatasync\"\n", "")
        );
        let c = SiteConfig::parse(&text, Path::new("/etc/q/site.toml")).unwrap();
        assert_eq!(c.volume, Path::new("/etc/q/shares.vol"));
        assert_eq!(c.state_dir, Path::new("/var/lib/q"));
        assert_eq!(
            c.unix_socket.as_deref(),
            Some(Path::new("/etc/q/run/q.sock"))
        );
        assert_eq!(c.links[0].key_dir, Path::new("/etc/q/keys"));
    }

    #[test]
    fn unknown_keys_name_the_key_and_file() {
        let e = SiteConfig::parse(
            &format!("{GOOD}\nqueue_dpth = 3\n"),
            Path::new("/etc/q/site.toml"),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("/etc/q/site.toml") && m.contains("queue_dpth"),
            "{m}"
        );
        let e =
            SiteConfig::parse("site = \"a\"\nvolume = \"/v\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("state_dir"), "{e}");
        let e = SiteConfig::parse(&GOOD.replace("64", "8"), Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("limits.queue_depth"), "{e}");
        // A typo that would pin gigabytes of registered buffers at start.
        let e = SiteConfig::parse(
            &format!("{GOOD}fixed_buffers = 8000\n"),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("limits.fixed_buffers") && e.to_string().contains("x.toml"),
            "{e}"
        );
        // No share write at all, or a typo driving the volume thousands deep.
        for depth in [0, 1000] {
            let e = SiteConfig::parse(
                &format!("{GOOD}write_depth = {depth}\n"),
                Path::new("x.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("limits.write_depth") && e.contains("x.toml") && e.contains("1..=256"),
                "{e}"
            );
        }
        let e = SiteConfig::parse(&GOOD.replace("fdatasync", "fsync"), Path::new("x.toml"))
            .unwrap_err();
        assert!(
            e.to_string().contains("durability") || e.to_string().contains("fsync"),
            "{e}"
        );
    }

    #[test]
    fn links_and_listeners() {
        let text = format!(
            "{}\nlisten = \"127.0.0.1:7474\"\nunix_socket = \"/run/q.sock\"\n[[link]]\nname = \"home-sendai\"\nkey_dir = \"/k\"\nend = \"b\"\n",
            GOOD.replace("[limits]\nqueue_depth = 64\ndurability = \"fdatasync\"\n", "")
        );
        let c = SiteConfig::parse(&text, Path::new("s.toml")).unwrap();
        assert_eq!(c.links.len(), 1);
        assert_eq!(c.links[0].end, LinkEnd::B);
        assert_eq!(c.links[0].window, 64 << 20);
        assert_eq!(c.unix_socket.as_deref(), Some(Path::new("/run/q.sock")));
        // The window in the units the home config's key_window uses, or in bytes.
        for (w, bytes) in [("\"16M\"", 16u64 << 20), ("1048576", 1 << 20)] {
            let c =
                SiteConfig::parse(&format!("{text}window = {w}\n"), Path::new("s.toml")).unwrap();
            assert_eq!(c.links[0].window, bytes, "{w}");
        }
        for bad in ["\"lots\"", "-1", "true", "64"] {
            let e = SiteConfig::parse(&format!("{text}window = {bad}\n"), Path::new("s.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("window") && e.contains("s.toml"), "{bad}: {e}");
        }
        let e = SiteConfig::parse(&format!("{text}window = true\n"), Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a size such as"), "{e}");
        let e = SiteConfig::parse(
            &text.replace("end = ", "colour = \"red\"\nend = "),
            Path::new("s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("s.toml") && e.contains("colour"), "{e}");
        let e = SiteConfig::parse(&text.replace("\"b\"", "\"c\""), Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("s.toml") && e.contains("end"), "{e}");
        let e = SiteConfig::parse(&text.replace("home-sendai", "../x"), Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("link[0].name"), "{e}");
        let two =
            format!("{text}[[link]]\nname = \"home-sendai\"\nkey_dir = \"/k2\"\nend = \"a\"\n");
        let e = SiteConfig::parse(&two, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("link[1].name") && e.contains("twice"), "{e}");
        let nolink = text.split("[[link]]").next().unwrap().to_string();
        let e = SiteConfig::parse(&nolink, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`listen`"), "{e}");
        let e = SiteConfig::parse(
            &text.replace("127.0.0.1:7474", "nowhere"),
            Path::new("s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`listen`"), "{e}");
    }

    #[test]
    fn unwelcomed_connections_per_address_default_to_half_the_slots_and_zero_is_named() {
        let c = SiteConfig::parse(GOOD, Path::new("site.toml")).unwrap();
        assert_eq!(c.limits.max_unwelcomed_per_address, None);
        assert_eq!(c.limits.unwelcomed_per_address(), 32);
        let c = SiteConfig::parse(
            &format!("{GOOD}max_connections = 9\nmax_unwelcomed_per_address = 20\n"),
            Path::new("site.toml"),
        )
        .unwrap();
        assert_eq!(c.limits.unwelcomed_per_address(), 9);
        let c = SiteConfig::parse(&format!("{GOOD}max_connections = 1\n"), Path::new("s.toml"))
            .unwrap();
        assert_eq!(c.limits.unwelcomed_per_address(), 1);
        let e = SiteConfig::parse(
            &format!("{GOOD}max_unwelcomed_per_address = 0\n"),
            Path::new("/etc/q/site.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/q/site.toml") && e.contains("limits.max_unwelcomed_per_address"),
            "{e}"
        );
    }

    #[test]
    fn timeouts_have_defaults_and_bounds_naming_the_key_and_file() {
        let c = SiteConfig::parse(GOOD, Path::new("site.toml")).unwrap();
        assert_eq!(c.limits.idle_timeout_secs, 300);
        // i64::MAX seconds parsed fine once and overflowed `Instant + Duration` later.
        for (key, top, bounds) in [
            ("idle_timeout_secs", 86_400, "1..=86400"),
            ("frame_timeout_secs", 3600, "1..=3600"),
        ] {
            let c = SiteConfig::parse(&format!("{GOOD}{key} = {top}\n"), Path::new("site.toml"))
                .unwrap();
            let got = match key {
                "idle_timeout_secs" => c.limits.idle_timeout_secs,
                _ => c.limits.frame_timeout_secs,
            };
            assert_eq!(got, top);
            for bad in ["0".to_string(), (top + 1).to_string(), i64::MAX.to_string()] {
                let e = SiteConfig::parse(
                    &format!("{GOOD}{key} = {bad}\n"),
                    Path::new("/etc/q/site.toml"),
                )
                .unwrap_err()
                .to_string();
                assert!(
                    e.contains("/etc/q/site.toml")
                        && e.contains(&format!("limits.{key}"))
                        && e.contains(bounds),
                    "{key} = {bad}: {e}"
                );
            }
        }
        let e = SiteConfig::parse(
            &format!("{GOOD}idle_timeout = 60\n"),
            Path::new("/etc/q/site.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/q/site.toml") && e.contains("idle_timeout"),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
