//! `svfit::svd` against its contract on random, rank-deficient, graded and known-spectrum matrices of tall,
//! wide and square shapes: U [m, k] and Vᵀ [k, n] orthonormal (also where σ = 0: the basis is completed),
//! σ descending and ≥ 0, ‖UΣVᵀ − W‖ at f32 precision. Plus an ignored timing run:
//! `cargo test --release -p rime-peft --test svd -- --ignored --nocapture`.

use rime_peft::svfit::svd;

/// splitmix64 → uniform in (−1, 1)
fn rnd(seed: u64, len: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// a × b for row-major a [m, r], b [r, n], in f64.
fn matmul(a: &[f64], b: &[f64], m: usize, r: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for l in 0..r {
            let x = a[i * r + l];
            for j in 0..n {
                c[i * n + j] += x * b[l * n + j];
            }
        }
    }
    c
}

/// An orthonormal basis: rows of the result [k, d] (Gram–Schmidt twice on random rows), k ≤ d.
fn orthonormal_rows(seed: u64, k: usize, d: usize) -> Vec<f64> {
    let raw = rnd(seed, k * d);
    let mut q: Vec<f64> = raw.iter().map(|&x| x as f64).collect();
    for a in 0..k {
        for _ in 0..2 {
            for b in 0..a {
                let p: f64 = (0..d).map(|j| q[a * d + j] * q[b * d + j]).sum();
                for j in 0..d {
                    q[a * d + j] -= p * q[b * d + j];
                }
            }
        }
        let nrm = (0..d).map(|j| q[a * d + j].powi(2)).sum::<f64>().sqrt();
        for j in 0..d {
            q[a * d + j] /= nrm;
        }
    }
    q
}

/// W = Q1ᵀ diag(s) Q2 for orthonormal rows Q1 [k, m], Q2 [k, n]: its singular values are s (sorted).
fn with_spectrum(seed: u64, m: usize, n: usize, s: &[f64]) -> Vec<f32> {
    let k = s.len();
    let q1 = orthonormal_rows(seed, k, m);
    let q2 = orthonormal_rows(seed + 1, k, n);
    let mut w = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            w[i * n + j] = (0..k).map(|a| q1[a * m + i] * s[a] * q2[a * n + j]).sum::<f64>() as f32;
        }
    }
    w
}

/// Checks the contract; returns σ. `tol` bounds the relative reconstruction error and the orthonormality.
fn check(name: &str, w: &[f32], m: usize, n: usize, tol: f64) -> Vec<f32> {
    let (u, s, vt) = svd(w, m, n);
    let k = m.min(n);
    assert_eq!((u.len(), s.len(), vt.len()), (m * k, k, k * n), "{name}: shapes");
    assert!(s.iter().all(|x| x.is_finite() && *x >= 0.0), "{name}: σ not finite and ≥ 0: {s:?}");
    assert!(s.windows(2).all(|p| p[0] >= p[1]), "{name}: σ not descending: {s:?}");
    let u64_: Vec<f64> = u.iter().map(|&x| x as f64).collect();
    let us: Vec<f64> = (0..m * k).map(|i| u64_[i] * s[i % k] as f64).collect();
    let vt64: Vec<f64> = vt.iter().map(|&x| x as f64).collect();
    let rec = matmul(&us, &vt64, m, k, n);
    let wn = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let err = rec.iter().zip(w).map(|(r, &x)| (r - x as f64).powi(2)).sum::<f64>().sqrt();
    assert!(err <= tol * wn.max(1e-30), "{name}: ‖UΣVᵀ − W‖ = {err:e}, ‖W‖ = {wn:e}");
    // UᵀU and VᵀV (rows of Vᵀ) against I
    let mut worst = (0f64, "", 0, 0);
    for a in 0..k {
        for b in 0..=a {
            let e = if a == b { 1.0 } else { 0.0 };
            let uu: f64 = (0..m).map(|i| u64_[i * k + a] * u64_[i * k + b]).sum::<f64>() - e;
            let vv: f64 = (0..n).map(|j| vt64[a * n + j] * vt64[b * n + j]).sum::<f64>() - e;
            if uu.abs() > worst.0 {
                worst = (uu.abs(), "UᵀU", a, b);
            }
            if vv.abs() > worst.0 {
                worst = (vv.abs(), "VᵀV", a, b);
            }
        }
    }
    assert!(worst.0 <= tol, "{name}: {}[{}, {}] off I by {:e}", worst.1, worst.2, worst.3, worst.0);
    s
}

const SHAPES: [(usize, usize); 9] =
    [(37, 13), (13, 37), (24, 24), (1, 9), (9, 1), (1, 1), (2, 3), (160, 96), (96, 161)];

#[test]
fn random_matrices() {
    for (t, &(m, n)) in SHAPES.iter().enumerate() {
        let w = rnd(t as u64, m * n);
        check(&format!("random {m}x{n}"), &w, m, n, 2e-6);
    }
}

#[test]
fn rank_deficient_and_zero_matrices() {
    for (t, &(m, n)) in [(30, 20), (20, 30), (25, 25), (64, 48), (48, 64), (7, 7)].iter().enumerate() {
        for r in [0, 1, 3] {
            let l: Vec<f64> = rnd(100 + t as u64, m * r).iter().map(|&x| x as f64).collect();
            let rr: Vec<f64> = rnd(200 + t as u64, r * n).iter().map(|&x| x as f64).collect();
            let w: Vec<f32> = matmul(&l, &rr, m, r, n).iter().map(|&x| x as f32).collect();
            let s = check(&format!("rank {r} {m}x{n}"), &w, m, n, 2e-6);
            let top = s[0].max(1e-30);
            assert!(s[r..].iter().all(|&x| x <= 1e-5 * top), "rank {r} {m}x{n}: σ past the rank {:?}", &s[r..]);
            assert!(s[..r].iter().all(|&x| x > 1e-3 * top), "rank {r} {m}x{n}: σ {:?}", &s[..r]);
        }
    }
}

#[test]
fn known_spectrum_with_repeats_and_tiny_values() {
    for (t, &(m, n)) in [(40, 16), (16, 40), (20, 20)].iter().enumerate() {
        let k = m.min(n);
        let mut want: Vec<f64> = vec![5.0, 5.0, 5.0, 2.0, 1.0, 1e-3, 1e-6];
        want.extend((want.len()..k).map(|i| if i % 2 == 0 { 0.0 } else { 0.5 / i as f64 }));
        let w = with_spectrum(10 + t as u64, m, n, &want);
        let s = check(&format!("spectrum {m}x{n}"), &w, m, n, 2e-6);
        want.sort_by(|a, b| b.total_cmp(a));
        for (i, (&got, &x)) in s.iter().zip(&want).enumerate() {
            assert!((got as f64 - x).abs() <= 2e-6 * 5.0, "spectrum {m}x{n}: σ[{i}] = {got}, want {x}");
        }
    }
}

#[test]
fn graded_and_scaled_matrices() {
    // rows scaled over 12 decades (σ spans as much), a huge and a tiny matrix (no overflow / underflow to 0)
    let (m, n) = (30, 18);
    let mut w = rnd(7, m * n);
    for i in 0..m {
        let f = 10f32.powf(-(i as f32) * 12.0 / m as f32);
        w[i * n..(i + 1) * n].iter_mut().for_each(|x| *x *= f);
    }
    check("graded rows", &w, m, n, 2e-6);
    let wt: Vec<f32> = (0..n * m).map(|idx| w[(idx % m) * n + idx / m]).collect();
    check("graded columns", &wt, n, m, 2e-6);
    let big: Vec<f32> = rnd(8, 12 * 9).iter().map(|x| x * 1e30).collect();
    let s = check("huge", &big, 12, 9, 2e-6);
    assert!(s[0] > 1e29);
    let small: Vec<f32> = rnd(9, 9 * 12).iter().map(|x| x * 1e-30).collect();
    let s = check("tiny", &small, 9, 12, 2e-6);
    assert!(s[0] > 1e-31 && s[8] > 0.0);
}

#[test]
#[ignore]
fn timing() {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("loadavg before: {}", load.trim());
    let shapes: Vec<(usize, usize)> = match std::env::var("SVD_SHAPES") {
        Ok(s) => s
            .split(',')
            .map(|p| {
                let (a, b) = p.split_once('x').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect(),
        Err(_) => vec![(384, 384), (576, 576), (192, 576), (1536, 384)],
    };
    for (m, n) in shapes {
        let w: Vec<f32> = rnd(42, m * n).iter().map(|x| x * 0.05).collect();
        let t = std::time::Instant::now();
        let (u, s, vt) = svd(&w, m, n);
        let dt = t.elapsed();
        std::hint::black_box((&u, &vt));
        println!("svd {m}x{n}: {:.3} s (σ0 {:.4}, σk {:.3e})", dt.as_secs_f64(), s[0], s[s.len() - 1]);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("loadavg after: {}", load.trim());
}
