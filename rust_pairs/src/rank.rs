//! Bradley-Terry ranking with a Gaussian prior.
//!
//! Item i has log-strength θ_i and beats j with probability σ(θ_i − θ_j). Comparisons are
//! weighted win counts `w[i][j]` (a tie adds half a win to each side; each aspect adds its
//! weight). We maximise the penalised log-likelihood
//!
//!   Σ_{i≠j} w_ij · log σ(θ_i − θ_j) − (α/2) · Σ_i θ_i²
//!
//! which is strictly concave for α > 0, so the maximum exists and is unique even for a strict
//! ranking (where the plain maximum-likelihood estimate diverges). It is the objective of
//! `choix.opt_pairwise(..., alpha=α/2)` (choix penalises α·Σθ²). Newton's method with a
//! backtracking line search solves it;
//! comparisons are stored sparsely (one entry per compared pair), so memory is linear in the
//! comparisons present, not quadratic in the items. The Newton system is solved densely by
//! Cholesky for small problems (a group's K responses) and by preconditioned conjugate gradients
//! on the sparse Hessian otherwise.

use std::collections::BTreeMap;

/// Weighted wins, sparse: for each compared pair `a < b`, how much a beat b and b beat a.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparisons {
    pub n: usize,
    pairs: BTreeMap<(usize, usize), (f64, f64)>,
}

impl Comparisons {
    pub fn new(n: usize) -> Self {
        Comparisons { n, pairs: BTreeMap::new() }
    }
    pub fn win(&mut self, winner: usize, loser: usize, weight: f64) {
        assert!(winner < self.n && loser < self.n && winner != loser, "comparison ({winner}, {loser}) of {} items", self.n);
        let e = self.pairs.entry((winner.min(loser), winner.max(loser))).or_insert((0.0, 0.0));
        if winner < loser {
            e.0 += weight;
        } else {
            e.1 += weight;
        }
    }
    pub fn tie(&mut self, a: usize, b: usize, weight: f64) {
        self.win(a, b, weight / 2.0);
        self.win(b, a, weight / 2.0);
    }
    pub fn get(&self, i: usize, j: usize) -> f64 {
        match self.pairs.get(&(i.min(j), i.max(j))) {
            Some(&(lo, _)) if i < j => lo,
            Some(&(_, hi)) if i > j => hi,
            _ => 0.0,
        }
    }
    pub fn total(&self) -> f64 {
        self.pairs.values().map(|(a, b)| a + b).sum()
    }
    /// Per item: total weighted wins and total weighted games.
    pub fn totals(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut wins, mut games) = (vec![0.0; self.n], vec![0.0; self.n]);
        for (&(a, b), &(ab, ba)) in &self.pairs {
            wins[a] += ab;
            wins[b] += ba;
            games[a] += ab + ba;
            games[b] += ab + ba;
        }
        (wins, games)
    }
    /// Compared pairs `(a, b, w_ab, w_ba)` with some weight.
    fn edges(&self) -> Vec<(usize, usize, f64, f64)> {
        self.pairs.iter().filter(|(_, (x, y))| x + y != 0.0).map(|(&(a, b), &(x, y))| (a, b, x, y)).collect()
    }
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log σ(x), stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn objective(edges: &[(usize, usize, f64, f64)], theta: &[f64], alpha: f64) -> f64 {
    let mut ll = 0.0;
    for &(a, b, wab, wba) in edges {
        let d = theta[a] - theta[b];
        if wab != 0.0 {
            ll += wab * log_sigmoid(d);
        }
        if wba != 0.0 {
            ll += wba * log_sigmoid(-d);
        }
    }
    ll - 0.5 * alpha * theta.iter().map(|t| t * t).sum::<f64>()
}

/// Up to this many items the Newton system is solved densely (n² memory); beyond, by conjugate
/// gradients on the sparse Hessian.
const DENSE_MAX: usize = 64;

/// Solve `(αI + L) x = g` by Jacobi-preconditioned conjugate gradients, where L is the graph
/// Laplacian with edge curvatures `curv` (SPD for α > 0). Memory linear in items + edges.
fn cg_solve(edges: &[(usize, usize, f64, f64)], curv: &[f64], diag: &[f64], alpha: f64, g: &[f64]) -> Vec<f64> {
    let n = g.len();
    let matvec = |x: &[f64], out: &mut [f64]| {
        for (o, xi) in out.iter_mut().zip(x) {
            *o = alpha * xi;
        }
        for (&(a, b, _, _), c) in edges.iter().zip(curv) {
            let d = c * (x[a] - x[b]);
            out[a] += d;
            out[b] -= d;
        }
    };
    let mut x = vec![0.0; n];
    let mut r = g.to_vec();
    let mut z: Vec<f64> = r.iter().zip(diag).map(|(r, d)| r / d).collect();
    let mut p = z.clone();
    let mut rz: f64 = r.iter().zip(&z).map(|(a, b)| a * b).sum();
    let tol = 1e-28 * g.iter().map(|v| v * v).sum::<f64>();
    let mut ap = vec![0.0; n];
    for _ in 0..(10 * n + 100) {
        if r.iter().map(|v| v * v).sum::<f64>() <= tol {
            break;
        }
        matvec(&p, &mut ap);
        let pap: f64 = p.iter().zip(&ap).map(|(a, b)| a * b).sum();
        if !(pap > 0.0) {
            break;
        }
        let step = rz / pap;
        for i in 0..n {
            x[i] += step * p[i];
            r[i] -= step * ap[i];
        }
        for i in 0..n {
            z[i] = r[i] / diag[i];
        }
        let rz_new: f64 = r.iter().zip(&z).map(|(a, b)| a * b).sum();
        let beta = rz_new / rz;
        rz = rz_new;
        for i in 0..n {
            p[i] = z[i] + beta * p[i];
        }
    }
    x
}

/// Solve `a x = b` for symmetric positive-definite `a` (row-major n×n) by Cholesky.
fn cholesky_solve(a: &mut [f64], b: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if !(d > 0.0) {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in (j + 1)..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * n + k] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in (i + 1)..n {
            s -= a[k * n + i] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    true
}

/// Fit log-strengths (mean zero at the optimum) by penalised maximum likelihood.
pub fn fit(c: &Comparisons, alpha: f64) -> Vec<f64> {
    fit_with(c, alpha, c.n <= DENSE_MAX)
}

fn fit_with(c: &Comparisons, alpha: f64, dense: bool) -> Vec<f64> {
    assert!(alpha > 0.0, "the Bradley-Terry prior must be positive");
    let n = c.n;
    let mut theta = vec![0.0; n];
    if n < 2 {
        return theta;
    }
    let edges = c.edges();
    let mut f = objective(&edges, &theta, alpha);
    for _ in 0..100 {
        // Gradient g and negative Hessian (graph Laplacian of p(1-p)-weighted counts + αI).
        let mut g: Vec<f64> = theta.iter().map(|t| -alpha * t).collect();
        let mut diag = vec![alpha; n];
        let mut curv = Vec::with_capacity(edges.len());
        for &(a, b, wab, wba) in &edges {
            let nab = wab + wba;
            let p = sigmoid(theta[a] - theta[b]);
            let ga = wab - nab * p;
            g[a] += ga;
            g[b] -= ga;
            let cv = nab * p * (1.0 - p);
            diag[a] += cv;
            diag[b] += cv;
            curv.push(cv);
        }
        let gmax = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        if gmax < 1e-10 {
            break;
        }
        let step = if dense {
            let mut h = vec![0.0; n * n];
            for i in 0..n {
                h[i * n + i] = diag[i];
            }
            for (&(a, b, _, _), cv) in edges.iter().zip(&curv) {
                h[a * n + b] -= cv;
                h[b * n + a] -= cv;
            }
            let mut step = g.clone();
            if !cholesky_solve(&mut h, &mut step, n) {
                step = g.clone(); // cannot happen for α > 0; fall back to gradient ascent
            }
            step
        } else {
            cg_solve(&edges, &curv, &diag, alpha, &g)
        };
        let slope: f64 = step.iter().zip(&g).map(|(s, gi)| s * gi).sum();
        if slope < 1e-8 {
            // Inside the quadratic-convergence region the objective's rounding noise would
            // stall the line search; take the full Newton step.
            for (th, s) in theta.iter_mut().zip(&step) {
                *th += s;
            }
            f = objective(&edges, &theta, alpha);
            continue;
        }
        let mut t = 1.0;
        loop {
            let cand: Vec<f64> = theta.iter().zip(&step).map(|(th, s)| th + t * s).collect();
            let fc = objective(&edges, &cand, alpha);
            if fc >= f + 1e-4 * t * slope || t < 1e-12 {
                theta = cand;
                f = fc;
                break;
            }
            t *= 0.5;
        }
    }
    // Quantise to 1e-9: strengths that are equal in exact arithmetic (cyclic or symmetric ties)
    // come out exactly equal, so tie-breaking by index is the same on every platform. `+ 0.0`
    // turns -0.0 (a tie at zero whose noise was negative) into 0.0: the ranking sorts with
    // `total_cmp`, which would put 0.0 above -0.0 and order a tie by the sign of its noise.
    theta.iter().map(|&t| quantise(t)).collect()
}

fn quantise(t: f64) -> f64 {
    (t * 1e9).round() / 1e9 + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tie_at_zero_is_positive_zero() {
        assert_eq!(quantise(-1e-17).to_bits(), 0f64.to_bits());
        assert_eq!(quantise(1e-17).to_bits(), 0f64.to_bits());
        assert_eq!(quantise(-0.1234567894), -0.123456789);
    }

    fn gradient_norm(c: &Comparisons, th: &[f64], alpha: f64) -> f64 {
        let n = c.n;
        (0..n)
            .map(|i| {
                let mut g = -alpha * th[i];
                for j in 0..n {
                    if i != j {
                        let p = sigmoid(th[i] - th[j]);
                        g += c.get(i, j) - (c.get(i, j) + c.get(j, i)) * p;
                    }
                }
                g.abs()
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn two_items_closed_form() {
        // One win of 0 over 1: stationarity gives 1 - σ(2t) = α t with θ = (t, -t).
        let mut c = Comparisons::new(2);
        c.win(0, 1, 1.0);
        let alpha = 0.5;
        let th = fit(&c, alpha);
        let t = th[0];
        assert!((th[0] + th[1]).abs() < 1e-12);
        assert!((1.0 - sigmoid(2.0 * t) - alpha * t).abs() < 1e-8); // quantised to 1e-9
    }

    #[test]
    fn strict_ranking_is_finite_and_ordered() {
        let mut c = Comparisons::new(4);
        for i in 0..4 {
            for j in (i + 1)..4 {
                c.win(i, j, 3.0);
            }
        }
        let th = fit(&c, 0.01);
        assert!(th.iter().all(|t| t.is_finite()));
        assert!(th[0] > th[1] && th[1] > th[2] && th[2] > th[3]);
        assert!(gradient_norm(&c, &th, 0.01) < 1e-8);
        assert!(th.iter().sum::<f64>().abs() < 1e-9);
    }

    #[test]
    fn ties_give_equal_strength() {
        let mut c = Comparisons::new(3);
        c.tie(0, 1, 1.0);
        c.win(0, 2, 1.0);
        c.win(1, 2, 1.0);
        let th = fit(&c, 0.1);
        assert!((th[0] - th[1]).abs() < 1e-9);
        assert!(th[0] > th[2]);
    }

    #[test]
    fn disconnected_items_stay_at_prior_mean() {
        let mut c = Comparisons::new(3);
        c.win(0, 1, 2.0);
        let th = fit(&c, 0.2);
        assert!(th[2].abs() < 1e-12);
    }

    #[test]
    fn conjugate_gradients_equal_the_dense_solve() {
        // A random-ish connected problem with ties and weights, solved both ways.
        let n = 40;
        let mut c = Comparisons::new(n);
        let mut x: u64 = 12345;
        for _ in 0..400 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (a, b) = ((x >> 33) as usize % n, (x >> 13) as usize % n);
            if a == b {
                continue;
            }
            if x % 5 == 0 { c.tie(a, b, 1.0) } else { c.win(a, b, 1.0 + (x % 3) as f64) }
        }
        let (d, s) = (fit_with(&c, 0.1, true), fit_with(&c, 0.1, false));
        for (a, b) in d.iter().zip(&s) {
            assert!((a - b).abs() < 1e-8, "{a} vs {b}");
        }
        assert!(gradient_norm(&c, &s, 0.1) < 1e-7);
    }

    #[test]
    fn memory_is_linear_in_the_comparisons_present() {
        // A dense matrix for 10⁵ items would need 80 GB; sparse, it is a few entries.
        let n = 100_000;
        let mut c = Comparisons::new(n);
        for i in 0..20 {
            c.win(i * 7, i * 7 + 3, 1.0);
            c.win(i * 7 + 3, 99_999 - i, 2.0);
        }
        let th = fit(&c, 0.1);
        assert_eq!(th.len(), n);
        assert!(th[0] > 0.0 && th[3] < th[0] && th[50_000] == 0.0);
        let (wins, games) = c.totals();
        assert_eq!((wins[3], games[3]), (2.0, 3.0));
    }
}
