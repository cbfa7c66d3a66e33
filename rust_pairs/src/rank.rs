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
//! groups are small (K responses), so the dense K×K system is cheap.

/// Dense matrix of weighted wins: `wins[i][j]` = how much i beat j.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparisons {
    pub n: usize,
    wins: Vec<f64>,
}

impl Comparisons {
    pub fn new(n: usize) -> Self {
        Comparisons { n, wins: vec![0.0; n * n] }
    }
    pub fn win(&mut self, winner: usize, loser: usize, weight: f64) {
        self.wins[winner * self.n + loser] += weight;
    }
    pub fn tie(&mut self, a: usize, b: usize, weight: f64) {
        self.win(a, b, weight / 2.0);
        self.win(b, a, weight / 2.0);
    }
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.wins[i * self.n + j]
    }
    pub fn total(&self) -> f64 {
        self.wins.iter().sum()
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

fn objective(c: &Comparisons, theta: &[f64], alpha: f64) -> f64 {
    let n = c.n;
    let mut ll = 0.0;
    for i in 0..n {
        for j in 0..n {
            let w = c.get(i, j);
            if w != 0.0 {
                ll += w * log_sigmoid(theta[i] - theta[j]);
            }
        }
    }
    ll - 0.5 * alpha * theta.iter().map(|t| t * t).sum::<f64>()
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
    assert!(alpha > 0.0, "the Bradley-Terry prior must be positive");
    let n = c.n;
    let mut theta = vec![0.0; n];
    if n < 2 {
        return theta;
    }
    let mut f = objective(c, &theta, alpha);
    for _ in 0..100 {
        // Gradient g and negative Hessian h (graph Laplacian of p(1-p)-weighted counts + αI).
        let mut g = vec![0.0; n];
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            g[i] -= alpha * theta[i];
            h[i * n + i] += alpha;
            for j in 0..n {
                if i == j {
                    continue;
                }
                let nij = c.get(i, j) + c.get(j, i);
                if nij == 0.0 {
                    continue;
                }
                let p = sigmoid(theta[i] - theta[j]);
                g[i] += c.get(i, j) - nij * p;
                let curv = nij * p * (1.0 - p);
                h[i * n + i] += curv;
                h[i * n + j] -= curv;
            }
        }
        let gmax = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        if gmax < 1e-10 {
            break;
        }
        let mut step = g.clone();
        if !cholesky_solve(&mut h, &mut step, n) {
            step = g.clone(); // cannot happen for α > 0; fall back to gradient ascent
        }
        let slope: f64 = step.iter().zip(&g).map(|(s, gi)| s * gi).sum();
        if slope < 1e-8 {
            // Inside the quadratic-convergence region the objective's rounding noise would
            // stall the line search; take the full Newton step.
            for (th, s) in theta.iter_mut().zip(&step) {
                *th += s;
            }
            f = objective(c, &theta, alpha);
            continue;
        }
        let mut t = 1.0;
        loop {
            let cand: Vec<f64> = theta.iter().zip(&step).map(|(th, s)| th + t * s).collect();
            let fc = objective(c, &cand, alpha);
            if fc >= f + 1e-4 * t * slope || t < 1e-12 {
                theta = cand;
                f = fc;
                break;
            }
            t *= 0.5;
        }
    }
    // Quantise to 1e-9: strengths that are equal in exact arithmetic (cyclic or symmetric ties)
    // come out exactly equal, so tie-breaking by index is the same on every platform.
    theta.iter().map(|t| (t * 1e9).round() / 1e9).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
