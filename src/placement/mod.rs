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

#[cfg(test)]
mod tests {
    use super::*;

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
