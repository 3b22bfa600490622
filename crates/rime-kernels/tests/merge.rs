mod common;
use common::*;
use rime_kernels::{ops::merge::*, reference::merge as r, DType, Device, Tensor};

fn up(d: &Device, x: &[f32], shape: &[usize]) -> Tensor {
    d.upload_f32(x, shape).unwrap()
}

/// Run a launcher that writes `out` of `numel` elements and download it.
fn run_out(d: &Device, numel: usize, f: impl FnOnce(&Tensor) -> Vec<rime_kernels::Dispatch>) -> Vec<f32> {
    let out = d.empty(&[numel], DType::F32).unwrap();
    d.run(&f(&out)).unwrap();
    d.download_f32(&out).unwrap()
}

/// Random task vectors with some exact zeros (as trimmed / masked vectors have).
fn task_vectors(seed: u64, n: usize) -> Vec<f32> {
    let mut x = randn(seed, n, 1.0);
    for v in x.iter_mut().step_by(7) {
        *v = 0.0;
    }
    x
}

#[test]
fn merge_weighted_sum_matches_reference() {
    let d = dev();
    for &(n, l) in &[(1usize, 1usize), (3, 3), (2, 17), (3, 127), (4, 1000)] {
        let xs = task_vectors(l as u64, n * l);
        let w = randn(9, n, 1.0);
        let got = run_out(d, l, |o| merge_weighted_sum_forward(d, o, &up(d, &xs, &[n, l]), &w).unwrap());
        let mut want = vec![0.0; l];
        r::merge_weighted_sum_forward(&mut want, &xs, &w);
        assert_close("weighted sum", &got, &want, 1e-6, 1e-6);
    }
}

#[test]
fn merge_magnitude_mask_matches_reference() {
    let d = dev();
    // 300_000 > 4096 partial counts * 64: each counting invocation strides over several elements.
    for &(n, l) in &[(1usize, 1usize), (2, 3), (3, 17), (2, 127), (3, 3072), (2, 300_000)] {
        let xs = task_vectors(l as u64 + 1, n * l);
        let g = up(d, &xs, &[n, l]);
        for &density in &[0.0f64, 0.05, 0.3, 0.4, 0.5, 0.999, 1.0] {
            let got = run_out(d, n * l, |o| merge_magnitude_mask_forward(d, o, &g, density).unwrap());
            let mut want = vec![0.0; n * l];
            r::merge_magnitude_mask_forward(&mut want, &xs, n, density);
            assert_eq!(got, want, "magnitude mask n={n} l={l} density={density}");
        }
    }
}

#[test]
fn merge_magnitude_mask_keeps_exactly_k_on_ties() {
    // Many equal magnitudes (and both zeros): the threshold value is shared by several elements and exactly
    // k = int(density * L) must survive, the lower indices first.
    let d = dev();
    let pool = [1.0f32, -1.0, 0.5, -0.5, 2.0, 0.0, -0.0, 0.25];
    let l = 203;
    let xs: Vec<f32> = (0..2 * l).map(|i| pool[(i * 5 + i / 3) % pool.len()]).collect();
    let g = up(d, &xs, &[2, l]);
    for &density in &[0.1f64, 0.33, 0.6, 0.9] {
        let k = (density * l as f64) as usize;
        let got = run_out(d, 2 * l, |o| merge_magnitude_mask_forward(d, o, &g, density).unwrap());
        let mut want = vec![0.0; 2 * l];
        r::merge_magnitude_mask_forward(&mut want, &xs, 2, density);
        assert_eq!(got, want, "tie rule, density {density}");
        for row in 0..2 {
            let kept_nonzero = got[row * l..(row + 1) * l].iter().filter(|v| **v != 0.0).count();
            let nonzero = xs[row * l..(row + 1) * l].iter().filter(|v| **v != 0.0).count();
            assert_eq!(kept_nonzero, k.min(nonzero), "row {row} density {density}");
        }
    }
}

#[test]
fn merge_ties_matches_reference() {
    let d = dev();
    for &(n, l) in &[(1usize, 1usize), (2, 3), (3, 17), (4, 127), (5, 1000)] {
        let xs = task_vectors(l as u64 + 2, n * l);
        let w = randn(3, n, 1.0);
        for &total in &[true, false] {
            for &weighted in &[false, true] {
                let got =
                    run_out(d, l, |o| merge_ties_forward(d, o, &up(d, &xs, &[n, l]), &w, total, weighted).unwrap());
                let mut want = vec![0.0; l];
                r::merge_ties_forward(&mut want, &xs, &w, total, weighted);
                assert_close("ties", &got, &want, 1e-6, 1e-6);
            }
        }
    }
    // Hand value, column [1, -2, 3] with unit weights: total = 2 > 0 elects +, mean of {1, 3} = 2;
    // frequency = +1 elects +, same. Column [1, -2, -3]: total -4 elects -, mean -2.5; frequency -1, same.
    // Column [0, 0, 0]: no row agrees with +, so 0.
    let xs = [1.0, 1.0, 0.0, -2.0, -2.0, 0.0, 3.0, -3.0, 0.0];
    for &total in &[true, false] {
        let got = run_out(d, 3, |o| merge_ties_forward(d, o, &up(d, &xs, &[3, 3]), &[1.0; 3], total, false).unwrap());
        assert_close("ties hand", &got, &[2.0, -2.5, 0.0], 1e-7, 0.0);
    }
    // Column [5, -1, -1]: total elects + (mean 5), frequency elects - (mean -1).
    let xs = [5.0, -1.0, -1.0];
    let got = run_out(d, 1, |o| merge_ties_forward(d, o, &up(d, &xs, &[3, 1]), &[1.0; 3], true, false).unwrap());
    assert_eq!(got, [5.0]);
    let got = run_out(d, 1, |o| merge_ties_forward(d, o, &up(d, &xs, &[3, 1]), &[1.0; 3], false, false).unwrap());
    assert_eq!(got, [-1.0]);
    // Column [1, -2] with weights [3, 1]: the unweighted sum -1 elects - (result 1 * -2 = -2); the weighted sum
    // 3 - 2 = 1 elects + (result 3 * 1 = 3).
    let xs = up(d, &[1.0, -2.0], &[2, 1]);
    let got = run_out(d, 1, |o| merge_ties_forward(d, o, &xs, &[3.0, 1.0], true, false).unwrap());
    assert_eq!(got, [-2.0]);
    let got = run_out(d, 1, |o| merge_ties_forward(d, o, &xs, &[3.0, 1.0], true, true).unwrap());
    assert_eq!(got, [3.0]);
}

#[test]
fn merge_magnitude_mask_inplace_matches_reference() {
    let d = dev();
    for &(n, l) in &[(1usize, 1usize), (2, 17), (3, 3072), (1, 300_000)] {
        let xs = task_vectors(l as u64 + 11, n * l);
        for &density in &[0.0f64, 0.3, 0.5, 1.0] {
            let g = up(d, &xs, &[n, l]);
            d.run(&merge_magnitude_mask_inplace_forward(d, &g, density).unwrap()).unwrap();
            let mut want = xs.clone();
            r::merge_magnitude_mask_inplace_forward(&mut want, n, density);
            assert_eq!(d.download_f32(&g).unwrap(), want, "in-place mask n={n} l={l} density={density}");
            let mut out_of_place = vec![0.0; n * l];
            r::merge_magnitude_mask_forward(&mut out_of_place, &xs, n, density);
            assert_eq!(want, out_of_place);
        }
    }
}

#[test]
fn merge_ties_mergekit_matches_reference() {
    let d = dev();
    for &(n, l) in &[(1usize, 1usize), (2, 3), (3, 17), (4, 127), (5, 1000)] {
        let xs = task_vectors(l as u64 + 7, n * l);
        // Unequal weights, one negative: the divisor (sum of agreeing weights) differs from the count.
        let mut w = randn(5, n, 1.0);
        w[0] = -0.4;
        for &normalize in &[true, false] {
            let got =
                run_out(d, l, |o| merge_ties_mergekit_forward(d, o, &up(d, &xs, &[n, l]), &w, normalize).unwrap());
            let mut want = vec![0.0; l];
            r::merge_ties_mergekit_forward(&mut want, &xs, &w, normalize);
            assert_close("ties mergekit", &got, &want, 1e-6, 1e-6);
        }
    }
    // Hand values, weights [0.5, 0.3, 0.2], columns [1, 2, -4], [1, -1, 0], [0, 0, 0], [2, 0, 0]:
    // y = [0.5, 0.6, -0.8]: sum 0.3 elects +, agreeing 0.5 + 0.6 = 1.1 over weights 0.8 -> 1.375;
    // y = [0.5, -0.3, 0]: + elected, 0.5 / 0.5 = 1 (the zero never agrees); all zeros: 0 / (divisor 1) = 0;
    // y = [1, 0, 0]: 1 / 0.5 = 2. peft (count) would give 0.55, 0.5, 0, 1.
    let xs = [1.0, 1.0, 0.0, 2.0, 2.0, -1.0, 0.0, 0.0, -4.0, 0.0, 0.0, 0.0];
    let w = [0.5, 0.3, 0.2];
    let got = run_out(d, 4, |o| merge_ties_mergekit_forward(d, o, &up(d, &xs, &[3, 4]), &w, true).unwrap());
    assert_close("ties mergekit hand", &got, &[1.375, 1.0, 0.0, 2.0], 1e-6, 0.0);
    let got = run_out(d, 4, |o| merge_ties_mergekit_forward(d, o, &up(d, &xs, &[3, 4]), &w, false).unwrap());
    assert_close("ties mergekit hand, no normalize", &got, &[1.1, 0.5, 0.0, 1.0], 1e-6, 0.0);
    let got = run_out(d, 4, |o| merge_ties_forward(d, o, &up(d, &xs, &[3, 4]), &w, true, true).unwrap());
    assert_close("ties peft hand", &got, &[0.55, 0.5, 0.0, 1.0], 1e-6, 0.0);
}

#[test]
fn merge_dare_matches_reference() {
    let d = dev();
    for &(n, l) in &[(1usize, 1usize), (2, 3), (3, 17), (2, 127), (3, 1000)] {
        let xs = task_vectors(l as u64 + 3, n * l);
        let mask: Vec<f32> = randn(l as u64 + 4, n * l, 1.0).iter().map(|&u| if u < 0.2 { 1.0 } else { 0.0 }).collect();
        let got =
            run_out(d, n * l, |o| merge_dare_forward(d, o, &up(d, &xs, &[n, l]), &up(d, &mask, &[n, l]), 0.6).unwrap());
        let mut want = vec![0.0; n * l];
        r::merge_dare_forward(&mut want, &xs, &mask, 0.6);
        assert_close("dare", &got, &want, 0.0, 0.0);
    }
}

#[test]
fn merge_slerp_matches_reference() {
    let d = dev();
    for &l in &[1usize, 3, 17, 127, 5000, 300_000] {
        let a = randn(l as u64 + 5, l, 1.0);
        let b_indep = randn(l as u64 + 6, l, 2.0);
        // Nearly colinear: |cos| > 0.9995 takes mergekit's lerp branch.
        let b_colin: Vec<f32> = a.iter().zip(&b_indep).map(|(&x, &y)| 3.0 * x + 1e-3 * y).collect();
        for b in [&b_indep, &b_colin] {
            for &t in &[0.0f32, 0.3, 1.0] {
                let got = run_out(d, l, |o| merge_slerp_forward(d, o, &up(d, &a, &[l]), &up(d, b, &[l]), t).unwrap());
                let mut want = vec![0.0; l];
                r::merge_slerp_forward(&mut want, &a, b, t);
                assert_close("slerp", &got, &want, 1e-5, 1e-4);
            }
        }
    }
    // Hand value: orthogonal a = [2, 0], b = [0, 3], t = 0.5: theta = pi/2, s0 = s1 = sin(pi/4), applied to the
    // original (unnormalised) vectors.
    let got = run_out(d, 2, |o| {
        merge_slerp_forward(d, o, &up(d, &[2.0, 0.0], &[2]), &up(d, &[0.0, 3.0], &[2]), 0.5).unwrap()
    });
    let s = std::f32::consts::FRAC_1_SQRT_2;
    assert_close("slerp hand", &got, &[2.0 * s, 3.0 * s], 1e-6, 1e-6);
}

/// peft 0.21.2 results in shared/golden/merge_reference.safetensors (see its README), within 1e-6. The file's
/// `ties_d0.4_*` elect the sign on the unweighted trimmed vectors (peft's `ties`), while its
/// `dare_ties_d0.6_total` elects on the weighted rescaled vectors; each is checked with the matching mode.
#[test]
fn merge_matches_peft_golden() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/merge_reference.safetensors");
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("golden file {path}: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let get = |name: &str| -> (Vec<f32>, Vec<usize>) {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name} in {path}: {e}"));
        (bytemuck_f32(t.data()), t.shape().to_vec())
    };
    let d = dev();
    let (tv, shape) = get("task_vectors");
    let (w, _) = get("weights");
    let (n, l) = (shape[0], tv.len() / shape[0]);
    let xs = up(d, &tv, &shape);
    let (mask, _) = get("dare_mask_keep0.6");
    let mask = up(d, &mask, &shape);
    let scratch = d.empty(&shape, DType::F32).unwrap();
    let check = |name: &str, ds: Vec<rime_kernels::Dispatch>, out: &Tensor| {
        d.run(&ds).unwrap();
        let (want, _) = get(name);
        assert_close(name, &d.download_f32(out).unwrap(), &want, 1e-6, 0.0);
    };
    let out = d.empty(&[l], DType::F32).unwrap();

    check("task_arithmetic", merge_weighted_sum_forward(d, &out, &xs, &w).unwrap(), &out);

    let mut ds = merge_magnitude_mask_forward(d, &scratch, &xs, 0.3).unwrap();
    ds.extend(merge_weighted_sum_forward(d, &out, &scratch, &w).unwrap());
    check("magnitude_prune_d0.3", ds, &out);

    for (name, total) in [("ties_d0.4_total", true), ("ties_d0.4_frequency", false)] {
        let mut ds = merge_magnitude_mask_forward(d, &scratch, &xs, 0.4).unwrap();
        ds.extend(merge_ties_forward(d, &out, &scratch, &w, total, false).unwrap());
        check(name, ds, &out);
    }

    let mut ds = merge_dare_forward(d, &scratch, &xs, &mask, 0.6).unwrap();
    ds.extend(merge_weighted_sum_forward(d, &out, &scratch, &w).unwrap());
    check("dare_linear_d0.6", ds, &out);

    let mut ds = merge_dare_forward(d, &scratch, &xs, &mask, 0.6).unwrap();
    ds.extend(merge_ties_forward(d, &out, &scratch, &w, true, true).unwrap());
    check("dare_ties_d0.6_total", ds, &out);
    assert_eq!(n, w.len());
}

fn bytemuck_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn merge_rejects_bad_shapes() {
    let d = dev();
    let xs = d.empty(&[3, 10], DType::F32).unwrap();
    let o10 = d.empty(&[10], DType::F32).unwrap();
    let o30 = d.empty(&[3, 10], DType::F32).unwrap();
    let o9 = d.empty(&[9], DType::F32).unwrap();
    let e = merge_weighted_sum_forward(d, &o9, &xs, &[1.0; 3]).err().unwrap().to_string();
    assert!(e.contains("merge_weighted_sum_forward") && e.contains("[9]") && e.contains("[3, 10]"), "{e}");
    let e = merge_weighted_sum_forward(d, &o10, &xs, &[1.0; 2]).err().unwrap().to_string();
    assert!(e.contains("2 weights"), "{e}");
    assert!(merge_weighted_sum_forward(d, &o10, &o10, &[1.0]).is_err(), "rank-1 xs is not stacked");
    assert!(merge_magnitude_mask_forward(d, &o10, &xs, 0.5).is_err());
    assert!(merge_magnitude_mask_forward(d, &o30, &xs, -0.1).is_err());
    assert!(merge_ties_forward(d, &o30, &xs, &[1.0; 3], true, false).is_err());
    assert!(merge_dare_forward(d, &o30, &xs, &o10, 0.5).is_err());
    assert!(merge_dare_forward(d, &o30, &xs, &o30.clone(), 0.0).is_err());
    assert!(merge_slerp_forward(d, &o10, &o10.clone(), &o9, 0.5).is_err());
    let f16 = d.empty(&[3, 10], DType::F16).unwrap();
    assert!(merge_weighted_sum_forward(d, &o10, &f16, &[1.0; 3]).is_err());
}
