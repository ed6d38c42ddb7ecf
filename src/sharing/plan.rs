//! The linear algebra of the scheme over GF(2), kept apart from the byte loops.
//!
//! Every share piece is the XOR of at most one secret piece and k-1 random pieces. Treating each
//! piece as an unknown, a set of received shares is a system of linear equations over GF(2).
//! A [`Plan`] says, for each wanted piece (a secret piece, or a piece of a lost share), which
//! received pieces XOR to it. Plans depend only on (k, n, which shares), so they are solved once
//! by Gaussian elimination and cached by [`crate::sharing::Scheme`].

/// Bits for the unknowns: at most 16 secret pieces + (p-1) + (k-2)p <= 253 random pieces.
const VAR_WORDS: usize = 5;
/// Bits for the equations: at most k(p-1) <= 16 * 16 received pieces.
const EQ_WORDS: usize = 4;

type Vars = [u64; VAR_WORDS];
type Eqs = [u64; EQ_WORDS];

/// One term of a share piece: a secret piece (0-based, piece m holds secret bytes
/// `m*piece_len..`) or a random piece (see [`Layout::random_index`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Term {
    Secret(u8),
    Random(u16),
}

/// Shape of a (k, n) scheme: which terms make up every share piece.
#[derive(Clone, Debug)]
pub struct Layout {
    pub k: usize,
    pub n: usize,
    pub p: usize,
    /// `terms[i * (p-1) + j]`: the terms of piece j of share i.
    terms: Vec<Vec<Term>>,
}

impl Layout {
    /// Panics unless 2 <= k <= n <= 16 (checked with a proper error by `Scheme::new`).
    pub fn new(k: usize, n: usize) -> Self {
        assert!((2..=16).contains(&n) && (2..=n).contains(&k));
        let p = (n..).find(|&c| is_prime(c)).expect("a prime exists");
        let mut terms = Vec::with_capacity(n * (p - 1));
        for i in 0..n {
            for j in 0..p - 1 {
                let mut t = Vec::with_capacity(k);
                // s_0 is the zero piece; s_m for m >= 1 is secret piece m-1.
                let m = (j + p - i % p) % p;
                if m != 0 {
                    t.push(Term::Secret((m - 1) as u8));
                }
                for h in 0..k - 1 {
                    t.push(Term::Random(
                        Self::random_index(p, h, (h * i + j) % p) as u16
                    ));
                }
                terms.push(t);
            }
        }
        Self { k, n, p, terms }
    }

    /// Pieces per share, and secret pieces per chunk.
    pub fn pieces(&self) -> usize {
        self.p - 1
    }

    /// Random pieces drawn per chunk: R^0 uses only pieces 0..p-2 (its index h*i+j = j never
    /// reaches p-1), every further R^h all p of them.
    pub fn random_pieces(&self) -> usize {
        (self.p - 1) + (self.k - 2) * self.p
    }

    /// Position of random piece r^h_t in the drawn order.
    fn random_index(p: usize, h: usize, t: usize) -> usize {
        if h == 0 {
            t
        } else {
            (p - 1) + (h - 1) * p + t
        }
    }

    pub fn terms(&self, share: usize, piece: usize) -> &[Term] {
        &self.terms[share * (self.p - 1) + piece]
    }

    fn var_of(&self, term: Term) -> usize {
        match term {
            Term::Secret(m) => m as usize,
            Term::Random(q) => self.pieces() + q as usize,
        }
    }

    fn vars_of(&self, share: usize, piece: usize) -> Vars {
        let mut v = [0; VAR_WORDS];
        for &t in self.terms(share, piece) {
            set(&mut v, self.var_of(t));
        }
        v
    }
}

/// What to rebuild from a set of shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The secret's p-1 pieces.
    Secret,
    /// All pieces of share i (regeneration of a lost share).
    Share(usize),
}

/// For each output piece, the received pieces `(position in the share subset, piece)` whose XOR
/// it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub outputs: Vec<Vec<(u8, u8)>>,
}

/// Solve `target` from the shares in `subset` (distinct share indices; their order is the
/// position numbering used in the plan). `None` if the shares do not determine the target.
pub fn solve(layout: &Layout, subset: &[usize], target: Target) -> Option<Plan> {
    let pieces = layout.pieces();
    // Rows kept fully reduced: each pivot column is set in its own row only.
    let mut rows: Vec<(usize, Vars, Eqs)> = Vec::new();
    for (pos, &share) in subset.iter().enumerate() {
        for piece in 0..pieces {
            let mut vars = layout.vars_of(share, piece);
            let mut eqs = [0; EQ_WORDS];
            set(&mut eqs, pos * pieces + piece);
            for (col, rv, re) in &rows {
                if get(&vars, *col) {
                    xor(&mut vars, rv);
                    xor(&mut eqs, re);
                }
            }
            let Some(col) = lowest(&vars) else { continue };
            for (_, rv, re) in rows.iter_mut() {
                if get(rv, col) {
                    xor(rv, &vars);
                    xor(re, &eqs);
                }
            }
            rows.push((col, vars, eqs));
        }
    }
    let wanted: Vec<Vars> = match target {
        Target::Secret => (0..pieces)
            .map(|m| {
                let mut v = [0; VAR_WORDS];
                set(&mut v, m);
                v
            })
            .collect(),
        Target::Share(i) => (0..pieces).map(|j| layout.vars_of(i, j)).collect(),
    };
    let mut outputs = Vec::with_capacity(pieces);
    for mut want in wanted {
        let mut eqs = [0; EQ_WORDS];
        for (col, rv, re) in &rows {
            if get(&want, *col) {
                xor(&mut want, rv);
                xor(&mut eqs, re);
            }
        }
        if lowest(&want).is_some() {
            return None;
        }
        let sources = (0..subset.len() * pieces)
            .filter(|&e| get(&eqs, e))
            .map(|e| ((e / pieces) as u8, (e % pieces) as u8))
            .collect();
        outputs.push(sources);
    }
    Some(Plan { outputs })
}

fn is_prime(c: usize) -> bool {
    c >= 2
        && (2..c)
            .take_while(|d| d * d <= c)
            .all(|d| !c.is_multiple_of(d))
}

fn set<const W: usize>(v: &mut [u64; W], bit: usize) {
    v[bit / 64] |= 1 << (bit % 64);
}

fn get<const W: usize>(v: &[u64; W], bit: usize) -> bool {
    v[bit / 64] >> (bit % 64) & 1 == 1
}

fn xor<const W: usize>(v: &mut [u64; W], w: &[u64; W]) {
    for (a, b) in v.iter_mut().zip(w) {
        *a ^= b;
    }
}

fn lowest<const W: usize>(v: &[u64; W]) -> Option<usize> {
    v.iter()
        .enumerate()
        .find(|(_, w)| **w != 0)
        .map(|(i, w)| i * 64 + w.trailing_zeros() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_follow_n() {
        let p = |n| Layout::new(2, n).p;
        assert_eq!([p(2), p(3), p(4), p(5), p(6), p(7)], [2, 3, 5, 5, 7, 7]);
        assert_eq!(
            [p(8), p(11), p(12), p(13), p(14), p(16)],
            [11, 11, 13, 13, 17, 17]
        );
    }

    /// The (2,3) example of the design: W0 = (r0, s1^r1), W1 = (s2^r0, r1), W2 = (s1^r0, s2^r1),
    /// with 1-based secret pieces s1, s2 (our Secret(0), Secret(1)).
    #[test]
    fn two_of_three_matches_the_worked_example() {
        use Term::*;
        let l = Layout::new(2, 3);
        assert_eq!(l.terms(0, 0), [Random(0)]);
        assert_eq!(l.terms(0, 1), [Secret(0), Random(1)]);
        assert_eq!(l.terms(1, 0), [Secret(1), Random(0)]);
        assert_eq!(l.terms(1, 1), [Random(1)]);
        assert_eq!(l.terms(2, 0), [Secret(0), Random(0)]);
        assert_eq!(l.terms(2, 1), [Secret(1), Random(1)]);
        assert_eq!(l.random_pieces(), 2);
    }

    #[test]
    fn every_k_subset_solves_and_no_smaller_one_does() {
        for n in 2..=16 {
            for k in 2..=n {
                let l = Layout::new(k, n);
                let k_subset: Vec<usize> = (n - k..n).collect();
                assert!(solve(&l, &k_subset, Target::Secret).is_some(), "({k},{n})");
                assert!(
                    solve(&l, &k_subset, Target::Share(0)).is_some(),
                    "({k},{n})"
                );
                assert!(
                    solve(&l, &k_subset[1..], Target::Secret).is_none(),
                    "({k},{n}): k-1 shares determined the secret"
                );
            }
        }
    }
}
