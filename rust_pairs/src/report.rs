//! Build report: additive statistics (so partitions merge exactly) and what is derived from them:
//! a Bradley-Terry leaderboard of the generating models, aspect-to-aspect Pearson correlations,
//! and histograms of scores, pair margins and pair probabilities.

use crate::rank::{fit, Comparisons};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub const SCORE_BIN: f64 = 0.5;
pub const MARGIN_BIN: f64 = 0.25;
pub const PROBABILITY_BIN: f64 = 0.05;

/// Raw, additive statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// winner model -> loser model -> weighted wins (ties count half to each).
    pub model_wins: BTreeMap<String, BTreeMap<String, f64>>,
    pub model_responses: BTreeMap<String, u64>,
    /// "a\u{1f}b" -> [n, Σx, Σy, Σx², Σy², Σxy] over responses rated on both aspects.
    pub aspect_moments: BTreeMap<String, [f64; 6]>,
    /// aspect -> bin index (value / SCORE_BIN, floored) -> count.
    pub score_hist: BTreeMap<String, BTreeMap<i64, u64>>,
    pub margin_hist: BTreeMap<i64, u64>,
    pub probability_hist: BTreeMap<i64, u64>,
    pub responses_per_group: BTreeMap<u64, u64>,
    pub pairs_per_group: BTreeMap<u64, u64>,
}

fn bin(x: f64, width: f64) -> i64 {
    (x / width + 1e-9).floor() as i64
}

impl Stats {
    pub fn model_comparison(&mut self, winner: &str, loser: &str, weight: f64) {
        // Look up before inserting: this runs for every response pair, and keys rarely are new.
        if let Some(x) = self.model_wins.get_mut(winner).and_then(|row| row.get_mut(loser)) {
            *x += weight;
            return;
        }
        *self.model_wins.entry(winner.to_string()).or_default().entry(loser.to_string()).or_default() += weight;
    }

    pub fn response(&mut self, model: Option<&str>, scores: &BTreeMap<String, f64>) {
        if let Some(m) = model {
            *self.model_responses.entry(m.to_string()).or_default() += 1;
        }
        // Keys are looked up before they are built: this runs for every response.
        for (a, x) in scores {
            let h = match self.score_hist.get_mut(a) {
                Some(h) => h,
                None => self.score_hist.entry(a.clone()).or_default(),
            };
            *h.entry(bin(*x, SCORE_BIN)).or_default() += 1;
        }
        let items: Vec<(&String, &f64)> = scores.iter().collect();
        let mut key = String::new();
        for (i, (a, x)) in items.iter().enumerate() {
            for (b, y) in &items[i + 1..] {
                key.clear();
                key.push_str(a);
                key.push('\u{1f}');
                key.push_str(b);
                if !self.aspect_moments.contains_key(&key) {
                    self.aspect_moments.insert(key.clone(), [0.0; 6]);
                }
                let m = self.aspect_moments.get_mut(&key).unwrap();
                let (x, y) = (**x, **y);
                for (k, v) in [1.0, x, y, x * x, y * y, x * y].into_iter().enumerate() {
                    m[k] += v;
                }
            }
        }
    }

    pub fn pair(&mut self, margin: f64, probability: f64) {
        *self.margin_hist.entry(bin(margin, MARGIN_BIN)).or_default() += 1;
        *self.probability_hist.entry(bin(probability, PROBABILITY_BIN)).or_default() += 1;
    }

    pub fn group(&mut self, responses: usize, pairs: usize) {
        *self.responses_per_group.entry(responses as u64).or_default() += 1;
        *self.pairs_per_group.entry(pairs as u64).or_default() += 1;
    }

    pub fn merge(&mut self, o: &Stats) {
        for (w, row) in &o.model_wins {
            for (l, x) in row {
                self.model_comparison(w, l, *x);
            }
        }
        for (m, n) in &o.model_responses {
            *self.model_responses.entry(m.clone()).or_default() += n;
        }
        for (k, v) in &o.aspect_moments {
            let e = self.aspect_moments.entry(k.clone()).or_insert([0.0; 6]);
            for i in 0..6 {
                e[i] += v[i];
            }
        }
        for (a, h) in &o.score_hist {
            add_hist(self.score_hist.entry(a.clone()).or_default(), h);
        }
        add_hist(&mut self.margin_hist, &o.margin_hist);
        add_hist(&mut self.probability_hist, &o.probability_hist);
        add_hist(&mut self.responses_per_group, &o.responses_per_group);
        add_hist(&mut self.pairs_per_group, &o.pairs_per_group);
    }

    /// Leaderboard: Bradley-Terry over models, from per-group comparisons of their responses.
    pub fn leaderboard(&self, prior: f64) -> Vec<Value> {
        let mut names: Vec<&String> = self.model_responses.keys().collect();
        for (w, row) in &self.model_wins {
            names.push(w);
            names.extend(row.keys());
        }
        names.sort();
        names.dedup();
        let idx: BTreeMap<&String, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut c = Comparisons::new(names.len());
        for (w, row) in &self.model_wins {
            for (l, x) in row {
                c.win(idx[w], idx[l], *x);
            }
        }
        let theta = fit(&c, prior);
        let (all_wins, all_games) = c.totals();
        let mut rows: Vec<Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let (wins, games) = (all_wins[i], all_games[i]);
                json!({
                    "model": n,
                    "strength": theta[i],
                    "wins": wins,
                    "comparisons": games,
                    "win_rate": if games > 0.0 { Some(wins / games) } else { None },
                    "responses": self.model_responses.get(*n).copied().unwrap_or(0),
                })
            })
            .collect();
        rows.sort_by(|a, b| {
            b["strength"].as_f64().unwrap().total_cmp(&a["strength"].as_f64().unwrap()).then_with(|| a["model"].as_str().cmp(&b["model"].as_str()))
        });
        for (rank, r) in rows.iter_mut().enumerate() {
            r["rank"] = json!(rank + 1);
        }
        rows
    }

    pub fn correlations(&self) -> Vec<Value> {
        self.aspect_moments
            .iter()
            .map(|(k, m)| {
                let (a, b) = k.split_once('\u{1f}').unwrap_or((k, ""));
                let [n, sx, sy, sxx, syy, sxy] = *m;
                let cov = n * sxy - sx * sy;
                let vx = n * sxx - sx * sx;
                let vy = n * syy - sy * sy;
                let r = if vx > 0.0 && vy > 0.0 { Some(cov / (vx * vy).sqrt()) } else { None };
                json!({"a": a, "b": b, "n": n as u64, "pearson": r})
            })
            .collect()
    }

    /// The report document: derived views plus the raw statistics they came from.
    pub fn to_report(&self, prior: f64, counts: &Value) -> Value {
        let hist = |h: &BTreeMap<i64, u64>, w: f64| -> Value {
            Value::Array(h.iter().map(|(b, n)| json!({"lo": *b as f64 * w, "hi": (*b + 1) as f64 * w, "count": n})).collect())
        };
        json!({
            "counts": counts,
            "leaderboard": self.leaderboard(prior),
            "aspect_correlations": self.correlations(),
            "histograms": {
                "scores": self.score_hist.iter().map(|(a, h)| (a.clone(), hist(h, SCORE_BIN))).collect::<BTreeMap<_, _>>(),
                "margins": hist(&self.margin_hist, MARGIN_BIN),
                "probabilities": hist(&self.probability_hist, PROBABILITY_BIN),
                "responses_per_group": self.responses_per_group,
                "pairs_per_group": self.pairs_per_group,
            },
            "bt_prior": prior,
            "stats": self,
        })
    }
}

fn add_hist<K: Ord + Clone>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
    for (k, n) in from {
        *into.entry(k.clone()).or_default() += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_and_merge() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        for (i, x) in [1.0, 2.0, 3.0, 4.0].iter().enumerate() {
            let s: BTreeMap<String, f64> = [("h".to_string(), *x), ("v".to_string(), 2.0 * x + 1.0), ("w".to_string(), 5.0 - x)].into();
            if i % 2 == 0 { a.response(Some("m"), &s) } else { b.response(None, &s) }
        }
        a.merge(&b);
        let c = a.correlations();
        let get = |x: &str, y: &str| c.iter().find(|r| r["a"] == x && r["b"] == y).unwrap()["pearson"].as_f64().unwrap();
        assert!((get("h", "v") - 1.0).abs() < 1e-12);
        assert!((get("h", "w") + 1.0).abs() < 1e-12);
        assert_eq!(a.model_responses["m"], 2);
        assert_eq!(a.score_hist["h"].values().sum::<u64>(), 4);
    }

    #[test]
    fn leaderboard_orders_models() {
        let mut s = Stats::default();
        s.model_comparison("strong", "weak", 5.0);
        s.model_comparison("strong", "mid", 3.0);
        s.model_comparison("mid", "weak", 3.0);
        s.model_comparison("weak", "mid", 0.5);
        let lb = s.leaderboard(0.1);
        let order: Vec<&str> = lb.iter().map(|r| r["model"].as_str().unwrap()).collect();
        assert_eq!(order, vec!["strong", "mid", "weak"]);
        assert_eq!(lb[0]["rank"], 1);
    }
}
