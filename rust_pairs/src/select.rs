//! Pair selection strategies: a table of named selectors, not an if/else chain.
//!
//! A selector sees one ranked group (weighted mean scores and Bradley-Terry log-strengths of its
//! scored responses) and returns (chosen, rejected) index pairs, counting what it skipped.
//! Explicit pairs from pairwise inputs are not the selectors' business: they are kept as given
//! (see [`crate::build`]) and only the probability filter of `min-probability` applies to them.

use crate::rank::sigmoid;

/// What a selector sees of a group.
pub struct GroupView<'a> {
    /// Weighted mean score per response; `None` for responses without aspect scores.
    pub mean: &'a [Option<f64>],
    /// Bradley-Terry log-strength per response.
    pub theta: &'a [f64],
    /// Deterministic per-group random value (seed and group key), for `best-vs-random`.
    pub random: u64,
    /// Whether each response may be chosen (`--exclude-chosen-model` clears it).
    pub choosable: &'a [bool],
}

pub struct Params {
    pub min_margin: f64,
    pub min_probability: f64,
}

/// Candidate pairs a selector chose not to emit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub ties: u64,
    pub margin: u64,
    pub probability: u64,
    /// Pairs whose better side may not be chosen.
    pub excluded: u64,
}

type Selector = fn(&GroupView, &Params, &mut Dropped) -> Vec<(usize, usize)>;

pub struct Strategy {
    pub name: &'static str,
    /// `--min-margin` when the flag is not given.
    pub default_margin: f64,
    /// Whether explicit (pairwise-input) pairs must also pass `--min-probability`.
    pub filters_probability: bool,
    pub select: Selector,
    pub help: &'static str,
}

pub static STRATEGIES: &[Strategy] = &[
    Strategy {
        name: "all-pairs",
        default_margin: 0.0,
        filters_probability: false,
        select: all_pairs,
        help: "Silkie: every pair whose weighted mean score differs (ties skipped), higher mean chosen",
    },
    Strategy {
        name: "best-vs-rest",
        default_margin: 2.0,
        filters_probability: false,
        select: best_vs_rest,
        help: "MM-DPO: the top response against every response at least --min-margin (default 2) lower",
    },
    Strategy {
        name: "best-vs-worst",
        default_margin: 0.0,
        filters_probability: false,
        select: best_vs_worst,
        help: "the top response against the bottom one",
    },
    Strategy {
        name: "best-vs-random",
        default_margin: 0.0,
        filters_probability: false,
        select: best_vs_random,
        help: "UltraFeedback binarisation: the top response against a random lower-scored one (seeded)",
    },
    Strategy {
        name: "min-probability",
        default_margin: 0.0,
        filters_probability: true,
        select: min_probability,
        help: "every pair whose Bradley-Terry probability of chosen beating rejected is >= --min-probability",
    },
];

pub fn strategy(name: &str) -> Option<&'static Strategy> {
    STRATEGIES.iter().find(|s| s.name == name)
}

pub fn strategy_names() -> Vec<&'static str> {
    STRATEGIES.iter().map(|s| s.name).collect()
}

fn scored(v: &GroupView) -> Vec<(usize, f64)> {
    v.mean.iter().enumerate().filter_map(|(i, m)| m.map(|m| (i, m))).collect()
}

/// The scored responses that may be chosen.
fn choosable(v: &GroupView, s: &[(usize, f64)]) -> Vec<(usize, f64)> {
    s.iter().copied().filter(|x| v.choosable[x.0]).collect()
}

/// Order: higher mean, then higher strength, then lower index (a total, deterministic order).
fn better(v: &GroupView, a: (usize, f64), b: (usize, f64)) -> bool {
    a.1 > b.1 || (a.1 == b.1 && (v.theta[a.0] > v.theta[b.0] || (v.theta[a.0] == v.theta[b.0] && a.0 < b.0)))
}

fn best(v: &GroupView, items: &[(usize, f64)]) -> Option<(usize, f64)> {
    items.iter().copied().reduce(|x, y| if better(v, y, x) { y } else { x })
}

/// Keep `(hi, lo)` if the mean-score gap is positive and at least the margin; count the rest.
fn gate(hi: (usize, f64), lo: (usize, f64), p: &Params, d: &mut Dropped) -> Option<(usize, usize)> {
    let gap = hi.1 - lo.1;
    if gap <= 0.0 {
        d.ties += 1;
        None
    } else if gap < p.min_margin {
        d.margin += 1;
        None
    } else {
        Some((hi.0, lo.0))
    }
}

fn all_pairs(v: &GroupView, p: &Params, d: &mut Dropped) -> Vec<(usize, usize)> {
    let s = scored(v);
    let mut out = Vec::new();
    for (x, &a) in s.iter().enumerate() {
        for &b in &s[x + 1..] {
            let (hi, lo) = if better(v, b, a) { (b, a) } else { (a, b) };
            if hi.1 > lo.1 && !v.choosable[hi.0] {
                d.excluded += 1;
                continue;
            }
            out.extend(gate(hi, lo, p, d));
        }
    }
    out
}

fn best_vs_rest(v: &GroupView, p: &Params, d: &mut Dropped) -> Vec<(usize, usize)> {
    let s = scored(v);
    let Some(top) = best(v, &choosable(v, &s)) else { return vec![] };
    s.iter().filter(|x| x.0 != top.0).filter_map(|&lo| gate(top, lo, p, d)).collect()
}

fn best_vs_worst(v: &GroupView, p: &Params, d: &mut Dropped) -> Vec<(usize, usize)> {
    let s = scored(v);
    if s.len() < 2 {
        return vec![];
    }
    let Some(top) = best(v, &choosable(v, &s)) else { return vec![] };
    let worst = s.iter().copied().reduce(|x, y| if better(v, x, y) { y } else { x }).unwrap();
    gate(top, worst, p, d).into_iter().collect()
}

fn best_vs_random(v: &GroupView, p: &Params, d: &mut Dropped) -> Vec<(usize, usize)> {
    let s = scored(v);
    let Some(top) = best(v, &choosable(v, &s)) else { return vec![] };
    let mut local = Dropped::default();
    let candidates: Vec<(usize, usize)> = s.iter().filter(|x| x.0 != top.0).filter_map(|&lo| gate(top, lo, p, &mut local)).collect();
    if candidates.is_empty() {
        // Count the group's failure once, by its cause, rather than every non-pick.
        if local.ties > 0 {
            d.ties += 1;
        } else if local.margin > 0 {
            d.margin += 1;
        }
        return vec![];
    }
    vec![candidates[(v.random % candidates.len() as u64) as usize]]
}

fn min_probability(v: &GroupView, p: &Params, d: &mut Dropped) -> Vec<(usize, usize)> {
    let s = scored(v);
    let mut out = Vec::new();
    for (x, &a) in s.iter().enumerate() {
        for &b in &s[x + 1..] {
            let (hi, lo) = if v.theta[b.0] > v.theta[a.0] { (b, a) } else { (a, b) };
            if v.theta[hi.0] == v.theta[lo.0] && hi.1 == lo.1 {
                d.ties += 1;
            } else if !v.choosable[hi.0] {
                d.excluded += 1;
            } else if sigmoid(v.theta[hi.0] - v.theta[lo.0]) < p.min_probability {
                d.probability += 1;
            } else if hi.1 - lo.1 < p.min_margin {
                d.margin += 1;
            } else {
                out.push((hi.0, lo.0));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, mean: &[Option<f64>], theta: &[f64], margin: Option<f64>, minp: f64, random: u64) -> (Vec<(usize, usize)>, Dropped) {
        let s = strategy(name).unwrap();
        let p = Params { min_margin: margin.unwrap_or(s.default_margin), min_probability: minp };
        let mut d = Dropped::default();
        let choosable = vec![true; mean.len()];
        let v = GroupView { mean, theta, random, choosable: &choosable };
        ((s.select)(&v, &p, &mut d), d)
    }

    // Means 4, 2, 4, 1.5 with strengths that agree (and break the 0/2 tie in favour of 0).
    const MEAN: [Option<f64>; 4] = [Some(4.0), Some(2.0), Some(4.0), Some(1.5)];
    const THETA: [f64; 4] = [1.0, -0.5, 0.9, -1.4];

    #[test]
    fn all_pairs_skips_ties() {
        let (pairs, d) = run("all-pairs", &MEAN, &THETA, None, 0.75, 0);
        assert_eq!(pairs, vec![(0, 1), (0, 3), (2, 1), (1, 3), (2, 3)]);
        assert_eq!(d, Dropped { ties: 1, ..Default::default() });
    }

    #[test]
    fn best_vs_rest_respects_margin() {
        let (pairs, d) = run("best-vs-rest", &MEAN, &THETA, None, 0.75, 0);
        assert_eq!(pairs, vec![(0, 1), (0, 3)]);
        assert_eq!(d, Dropped { ties: 1, ..Default::default() });
        let (pairs, d) = run("best-vs-rest", &MEAN, &THETA, Some(2.5), 0.75, 0);
        assert_eq!(pairs, vec![(0, 3)]);
        assert_eq!(d.margin, 1);
    }

    #[test]
    fn best_vs_worst_and_random() {
        assert_eq!(run("best-vs-worst", &MEAN, &THETA, None, 0.75, 0).0, vec![(0, 3)]);
        // Candidates below the best (0): 1 and 3 (2 ties it).
        assert_eq!(run("best-vs-random", &MEAN, &THETA, None, 0.75, 0).0, vec![(0, 1)]);
        assert_eq!(run("best-vs-random", &MEAN, &THETA, None, 0.75, 1).0, vec![(0, 3)]);
        let all_tie = [Some(3.0), Some(3.0)];
        let (p, d) = run("best-vs-random", &all_tie, &[0.0, 0.0], None, 0.75, 5);
        assert!(p.is_empty());
        assert_eq!(d.ties, 1);
    }

    #[test]
    fn min_probability_uses_strengths() {
        // σ(1.0-0.9)=0.525 (0 vs 2) is below 0.75; 0 vs 1: σ(1.5)=0.82 passes; 1 vs 3: σ(0.9)=0.71 fails.
        let (pairs, d) = run("min-probability", &MEAN, &THETA, None, 0.75, 0);
        assert_eq!(pairs, vec![(0, 1), (0, 3), (2, 1), (2, 3)]);
        assert_eq!(d.probability, 2);
    }

    #[test]
    fn unscored_responses_are_ignored() {
        let mean = [None, Some(1.0), None];
        assert!(run("all-pairs", &mean, &[0.0; 3], None, 0.75, 0).0.is_empty());
    }

    #[test]
    fn excluded_models_are_never_chosen() {
        // Response 0 (the best) is the gold answer that may not be chosen.
        let choosable = [false, true, true, true];
        let run_ex = |name: &str, margin: Option<f64>| {
            let s = strategy(name).unwrap();
            let p = Params { min_margin: margin.unwrap_or(s.default_margin), min_probability: 0.75 };
            let mut d = Dropped::default();
            let v = GroupView { mean: &MEAN, theta: &THETA, random: 0, choosable: &choosable };
            ((s.select)(&v, &p, &mut d), d)
        };
        let (pairs, d) = run_ex("all-pairs", None);
        assert_eq!(pairs, vec![(2, 1), (1, 3), (2, 3)]);
        assert_eq!(d.excluded, 2);
        // The top choosable response is 2 (mean 4): against 1 (2.0) and 3 (1.5) with margin 2.
        assert_eq!(run_ex("best-vs-rest", None).0, vec![(2, 1), (2, 3)]);
        assert_eq!(run_ex("best-vs-worst", Some(2.0)).0, vec![(2, 3)]);
    }
}
