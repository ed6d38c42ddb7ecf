//! Share control: where shares go, and which ones a read asks for first (pure).
//!
//! Writes place share i on site i of the configured list, whose first entry is the home site,
//! so the home site always keeps one share (like "Share A" at ToMMo). Reads ask for the home
//! share first (no link, no key spent), then the sites whose links have the most key left, and
//! sites that failed recently last.
use crate::catalog::ShareLocation;

/// Read order for a chunk's shares. `key_left(site)` is `None` for a site behind no link
/// (the home site's own mountd); `failing(site)` marks sites that failed recently.
pub fn read_order(
    shares: &[ShareLocation],
    home: &str,
    key_left: impl Fn(&str) -> Option<u64>,
    failing: impl Fn(&str) -> bool,
) -> Vec<ShareLocation> {
    let mut v = shares.to_vec();
    v.sort_by_key(|s| {
        (
            failing(&s.site),
            s.site != home,
            std::cmp::Reverse(key_left(&s.site).unwrap_or(u64::MAX)),
            s.share,
        )
    });
    v
}

/// What one site tells of its room: its volume's `(size, free bytes)` (`None`: it did not
/// answer), and the key left on its link for what the home sends (`None`: no link).
pub type SiteRoom = (Option<(u64, u64)>, Option<u64>);

/// What `statfs` reports for the mount: plaintext bytes in all, and still free to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    pub free: u64,
}

impl Space {
    /// From each site's [`SiteRoom`]. Every chunk puts a share the size of the chunk on
    /// every site, so the mount holds as much as its smallest volume and can still take the
    /// least of the sites' free space (the shares' headers not counted) and of what their
    /// links' key left carries: each chunk's PUT spends `key_per_chunk` bytes of key (whole
    /// key blocks, [`crate::wire::frame::key_len_for`]) for `chunk` bytes of plaintext. A
    /// site that does not answer leaves no room: a write now would fail there.
    pub fn of(sites: &[SiteRoom], chunk: u64, key_per_chunk: u64) -> Space {
        let mut total = None::<u64>;
        let mut free = u64::MAX;
        for (space, key) in sites {
            match space {
                Some((size, left)) => {
                    total = Some(total.map_or(*size, |t| t.min(*size)));
                    free = free.min(*left);
                }
                None => free = 0,
            }
            if let Some(k) = key {
                free = free.min((k / key_per_chunk.max(1)).saturating_mul(chunk));
            }
        }
        let total = total.unwrap_or(0);
        Space {
            total,
            free: free.min(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_space_is_the_least_of_the_volumes_free_space_and_key_left() {
        let gib = 1u64 << 30;
        // Home (no link) and two remote sites.
        let sites = [
            (Some((10 * gib, 6 * gib)), None),
            (Some((8 * gib, 7 * gib)), Some(5 * gib)),
            (Some((12 * gib, 4 * gib)), Some(9 * gib)),
        ];
        let of = |sites: &[SiteRoom]| Space::of(sites, 1, 1);
        let s = of(&sites);
        assert_eq!(s.total, 8 * gib, "the smallest volume");
        assert_eq!(s.free, 4 * gib, "the least free volume");
        let mut low_key = sites;
        low_key[2].1 = Some(gib);
        assert_eq!(of(&low_key).free, gib, "a link short of key");
        // 1 MiB chunks whose PUT frames take 259 key blocks (1,060,864 bytes) each.
        assert_eq!(
            Space::of(&low_key, 1 << 20, 1_060_864).free,
            (gib / 1_060_864) << 20,
            "key left counted in whole chunks' frames"
        );
        let mut down = sites;
        down[1].0 = None;
        assert_eq!(
            of(&down),
            Space {
                total: 10 * gib,
                free: 0
            },
            "a site down leaves no room"
        );
        assert_eq!(of(&[]).total, 0);
        assert_eq!(of(&[(None, None)]), Space { total: 0, free: 0 });
    }

    fn loc(share: u8, site: &str) -> ShareLocation {
        ShareLocation {
            share,
            site: site.into(),
        }
    }

    #[test]
    fn home_first_then_most_key_then_failing_last() {
        let shares = [loc(0, "home"), loc(1, "a"), loc(2, "b"), loc(3, "c")];
        let key = |s: &str| match s {
            "a" => Some(10),
            "b" => Some(1000),
            "c" => Some(500),
            _ => None,
        };
        let order = read_order(&shares, "home", key, |_| false);
        let sites: Vec<&str> = order.iter().map(|s| s.site.as_str()).collect();
        assert_eq!(sites, ["home", "b", "c", "a"]);
        let order = read_order(&shares, "home", key, |s| s == "home" || s == "b");
        let sites: Vec<&str> = order.iter().map(|s| s.site.as_str()).collect();
        assert_eq!(sites, ["c", "a", "home", "b"]);
    }
}
