//! The quantized-weight kernels (shaders/qmatmul.wgsl) against dequantize-then-multiply in f64: every GGUF
//! block type x both products (x·Wᵀ with bias and accumulate, dY·W with accumulate) x M = 1, 3 (the
//! matrix-vector row tiles), 8, 37 (ragged: blocks of 8 rows, the last one partial) x N not a multiple of the
//! 4-column tile, K of two or three blocks (two 256-value super-blocks for the K-quants); a real Q4_1 tensor of
//! SmolLM2; the reference dequantizer against rime-io's; QTensor's and the launchers' errors.
//!
//! Tolerance: the kernels dequantize with the same f32 operations as ggml (a GPU compiler may fuse `q * d + m`
//! into one fma, one rounding less), then sum K (or N) products in f32 with fma in a fixed order. Recursive
//! summation of n terms has |error| <= n * u * sum |terms| (u = 2^-24, Higham's gamma_n to first order); each
//! dequantized weight adds at most 2u relative, and bias / accumulate one rounding each. So the bound per
//! output is (n + 4) * u * (sum |x_k w_k| + |bias| + |prev|), computed in f64 from the same values.

mod common;
use common::*;
use rime_kernels::ops::qmatmul::{
    qdequantize, qmatmul_backward_input, qmatmul_backward_input_scratch, qmatmul_forward, qmatmul_forward_scratch,
    QGEMV_MAX_M, QSCRATCH_MIN_M_FORWARD,
};
use rime_kernels::reference::qmatmul as r;
use rime_kernels::{Device, QTensor, QType};

const U: f64 = 1.0 / (1u64 << 24) as f64;

/// Per-output bounds for x [m, k] · wᵀ (+ bias) (+ prev), see the module doc.
fn forward_bounds(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    prev: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let mut t = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let mut s: f64 = (0..k).map(|q| (x[i * k + q] as f64 * w[j * k + q] as f64).abs()).sum();
            s += bias.map_or(0.0, |b| (b[j] as f64).abs()) + prev.map_or(0.0, |p| (p[i * n + j] as f64).abs());
            t.push((k + 4) as f64 * U * s + 1e-30);
        }
    }
    t
}

fn backward_bounds(dy: &[f32], w: &[f32], prev: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut t = Vec::with_capacity(m * k);
    for i in 0..m {
        for q in 0..k {
            let mut s: f64 = (0..n).map(|j| (dy[i * n + j] as f64 * w[j * k + q] as f64).abs()).sum();
            s += prev.map_or(0.0, |p| (p[i * k + q] as f64).abs());
            t.push((n + 4) as f64 * U * s + 1e-30);
        }
    }
    t
}

#[track_caller]
fn assert_within(what: &str, got: &[f32], want: &[f32], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let d = (g as f64 - w as f64).abs();
        // The reference rounds its f64 sum to f32: half an ulp of the result on top of the bound.
        let tol = b + (w.abs() as f64) * U;
        assert!(d <= tol, "{what}: index {i}: got {g}, want {w} (|diff| {d:e} > bound {tol:e})");
    }
}

/// Both products of one quantized weight [n, k] with m rows, against the reference.
#[allow(clippy::too_many_arguments)]
fn check(d: &Device, qtype: QType, m: usize, n: usize, k: usize, bias: bool, accumulate: bool, seed: u64) {
    let bytes = random_blocks(qtype, n, k, seed);
    let w = r::dequantize(qtype, &bytes, n, k).unwrap();
    let qw = QTensor::upload(d, qtype, n, k, &bytes).unwrap();
    let what = format!("{qtype} m={m} n={n} k={k} bias={bias} acc={accumulate}");

    let x = randn(seed + 1, m * k, 1.0);
    let b = randn(seed + 2, n, 1.0);
    let prev_y = randn(seed + 3, m * n, 1.0);
    let tx = d.upload_f32(&x, &[m, k]).unwrap();
    let tb = d.upload_f32(&b, &[n]).unwrap();
    let ty = d.upload_f32(&prev_y, &[m, n]).unwrap();
    d.run(&qmatmul_forward(d, &ty, &tx, &qw, bias.then_some(&tb), accumulate).unwrap()).unwrap();
    let (bo, po) = (bias.then_some(&b[..]), accumulate.then_some(&prev_y[..]));
    let want = r::qmatmul_forward(&x, &w, bo, po, m, n, k);
    // The scratch launchers (the block kernels below 24 / 16 rows, else dequantize + the f32 matmul: M = 37 here)
    // on a scratch larger than the weight.
    let scratch = d.zeros(&[n * k + 5], rime_kernels::DType::F32).unwrap();
    let ty2 = d.upload_f32(&prev_y, &[m, n]).unwrap();
    d.run(&qmatmul_forward_scratch(d, &ty2, &tx, &qw, bias.then_some(&tb), accumulate, &scratch).unwrap()).unwrap();
    let bound = forward_bounds(&x, &w, bo, po, m, n, k);
    assert_within(&format!("forward (scratch) {what}"), &d.download_f32(&ty2).unwrap(), &want, &bound);
    assert_within(
        &format!("forward {what}"),
        &d.download_f32(&ty).unwrap(),
        &want,
        &forward_bounds(&x, &w, bo, po, m, n, k),
    );

    let dy = randn(seed + 4, m * n, 1.0);
    let prev_dx = randn(seed + 5, m * k, 1.0);
    let tdy = d.upload_f32(&dy, &[m, n]).unwrap();
    let tdx = d.upload_f32(&prev_dx, &[m, k]).unwrap();
    d.run(&qmatmul_backward_input(d, &tdx, &tdy, &qw, accumulate).unwrap()).unwrap();
    let po = accumulate.then_some(&prev_dx[..]);
    let want = r::qmatmul_backward_input(&dy, &w, po, m, n, k);
    let tdx2 = d.upload_f32(&prev_dx, &[m, k]).unwrap();
    d.run(&qmatmul_backward_input_scratch(d, &tdx2, &tdy, &qw, accumulate, &scratch).unwrap()).unwrap();
    let bound = backward_bounds(&dy, &w, po, m, n, k);
    assert_within(&format!("backward (scratch) {what}"), &d.download_f32(&tdx2).unwrap(), &want, &bound);
    assert_within(
        &format!("backward {what}"),
        &d.download_f32(&tdx).unwrap(),
        &want,
        &backward_bounds(&dy, &w, po, m, n, k),
    );
}

fn check_type(qtype: QType) {
    let d = dev();
    let ks: &[usize] = if qtype.block().0 == 256 { &[512] } else { &[64, 96] };
    let mut seed = 1000 * qtype.ggml_id() as u64;
    for &k in ks {
        for m in [1, 3, QGEMV_MAX_M, 37] {
            for (n, bias, accumulate) in [(13, false, false), (6, true, true)] {
                seed += 10;
                check(d, qtype, m, n, k, bias, accumulate, seed);
            }
        }
    }
}

#[test]
fn q8_0_matches_reference() {
    check_type(QType::Q8_0);
}

#[test]
fn q4_0_matches_reference() {
    check_type(QType::Q4_0);
}

#[test]
fn q4_1_matches_reference() {
    check_type(QType::Q4_1);
}

#[test]
fn q5_0_matches_reference() {
    check_type(QType::Q5_0);
}

#[test]
fn q4_k_matches_reference() {
    check_type(QType::Q4K);
}

#[test]
fn q6_k_matches_reference() {
    check_type(QType::Q6K);
}

/// More columns than one workgroup covers and more k than one workgroup's backward lanes (several workgroups
/// per row block), weights past 32 KB (byte offsets past 15 bits), rows a multiple of 8 and leading dims
/// [2, 20] flattened.
#[test]
fn larger_shapes_and_leading_dims_match_reference() {
    let d = dev();
    for (qtype, n, k) in
        [(QType::Q4K, 130, 768), (QType::Q8_0, 300, 160), (QType::Q6K, 90, 512), (QType::Q5_0, 260, 256)]
    {
        let (m, seed) = (40, 77);
        let bytes = random_blocks(qtype, n, k, seed);
        let w = r::dequantize(qtype, &bytes, n, k).unwrap();
        let qw = QTensor::upload(d, qtype, n, k, &bytes).unwrap();
        let x = randn(seed + 1, m * k, 1.0);
        let ty = d.zeros(&[2, 20, n], rime_kernels::DType::F32).unwrap();
        d.run(&qmatmul_forward(d, &ty, &d.upload_f32(&x, &[2, 20, k]).unwrap(), &qw, None, false).unwrap()).unwrap();
        let want = r::qmatmul_forward(&x, &w, None, None, m, n, k);
        let bound = forward_bounds(&x, &w, None, None, m, n, k);
        assert_within(&format!("forward {qtype} {n}x{k}"), &d.download_f32(&ty).unwrap(), &want, &bound);
        let dy = randn(seed + 2, m * n, 1.0);
        let tdx = d.zeros(&[2, 20, k], rime_kernels::DType::F32).unwrap();
        let tdy = d.upload_f32(&dy, &[2, 20, n]).unwrap();
        d.run(&qmatmul_backward_input(d, &tdx, &tdy, &qw, false).unwrap()).unwrap();
        let want = r::qmatmul_backward_input(&dy, &w, None, m, n, k);
        let bound = backward_bounds(&dy, &w, None, m, n, k);
        assert_within(&format!("backward {qtype} {n}x{k}"), &d.download_f32(&tdx).unwrap(), &want, &bound);
    }
}

/// The GPU dequantizer (the scratch path's first step) against the reference: bit for bit where a value is one
/// product (Q8_0, Q4_0, Q5_0, Q6_K); within one rounding of a product no larger than the largest weight where
/// it is `q * d + m` or `d1 * q - m1` (Q4_1, Q4_K: a GPU compiler may fuse them into one fma).
#[test]
fn qdequantize_matches_reference() {
    let d = dev();
    for (i, qtype) in QType::ALL.into_iter().enumerate() {
        let (n, k) = (7, qtype.block().0 * 3);
        let bytes = random_blocks(qtype, n, k, 700 + i as u64);
        let want = r::dequantize(qtype, &bytes, n, k).unwrap();
        let qw = QTensor::upload(d, qtype, n, k, &bytes).unwrap();
        let out = d.zeros(&[n, k], rime_kernels::DType::F32).unwrap();
        d.run(&qdequantize(d, &out, &qw).unwrap()).unwrap();
        let got = d.download_f32(&out).unwrap();
        let fused = matches!(qtype, QType::Q4_1 | QType::Q4K);
        let big = want.iter().fold(0f32, |a, &v| a.max(v.abs()));
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            let ok = if fused { ((g - w).abs() as f64) <= 2.0 * U * big as f64 } else { g.to_bits() == w.to_bits() };
            assert!(ok, "{qtype} value {j}: GPU {g}, reference {w}");
        }
    }
    let small = d.zeros(&[10], rime_kernels::DType::F32).unwrap();
    let qw = QTensor::upload(d, QType::Q8_0, 1, 32, &random_blocks(QType::Q8_0, 1, 32, 1)).unwrap();
    assert!(qdequantize(d, &small, &qw).err().unwrap().to_string().contains("fewer"));
    let x = d.zeros(&[QSCRATCH_MIN_M_FORWARD, 32], rime_kernels::DType::F32).unwrap();
    let y = d.zeros(&[QSCRATCH_MIN_M_FORWARD, 1], rime_kernels::DType::F32).unwrap();
    let e = qmatmul_forward_scratch(d, &y, &x, &qw, None, false, &small).err().unwrap().to_string();
    assert!(e.contains("scratch"), "{e}");
}

/// The reference's own dequantizer agrees bit for bit with rime-io's (which tests/gguf_vectors.rs in rime-io
/// checks against the `gguf` Python package).
#[test]
fn reference_dequantize_matches_rime_io() {
    for (i, qtype) in QType::ALL.into_iter().enumerate() {
        let k = qtype.block().0 * 3;
        let bytes = random_blocks(qtype, 5, k, 500 + i as u64);
        let ours = r::dequantize(qtype, &bytes, 5, k).unwrap();
        let io = rime_io::gguf::dequantize(rime_io::GgmlType::from_id(qtype.ggml_id()), &bytes, 5 * k).unwrap();
        assert_eq!(ours.len(), io.len());
        for (j, (a, b)) in ours.iter().zip(&io).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{qtype} value {j}: reference {a}, rime-io {b}");
        }
    }
}

/// A real Q4_1 weight of SmolLM2-135M (blk.0.ffn_down, [576, 1536]) in both products against the product of
/// rime-io's dequantized f32 weight; skipped with a message when the model file is absent.
#[test]
fn real_smollm2_q4_1_tensor_matches_cpu_product() {
    let path = match rime_io::locate_model("smollm2-135m-instruct.Q4_1.gguf") {
        Ok(p) => p,
        Err(e) => {
            eprintln!("\n!!!!!!!! SKIPPED: model not found, run scripts/fetch-models.sh ({e}) !!!!!!!!\n");
            return;
        }
    };
    let f = rime_io::GgufFile::open(&path).unwrap();
    let name = "blk.0.ffn_down.weight";
    let info = f.tensor_info(name).unwrap();
    assert_eq!(info.ggml_type, rime_io::GgmlType::Q4_1, "{name} is expected to be Q4_1");
    let shape = info.shape();
    let (n, k) = (shape[0], shape[1]);
    let w = f.dequantize(name).unwrap();
    let d = dev();
    let qw = QTensor::upload_named(d, name, QType::Q4_1, n, k, f.raw_bytes(name).unwrap()).unwrap();
    assert!(qw.bytes() * 5 < (n * k * 4) as u64, "Q4_1 is 5 bits per value: {} bytes", qw.bytes());
    for m in [1, 11] {
        let x = randn(900 + m as u64, m * k, 1.0);
        let ty = d.zeros(&[m, n], rime_kernels::DType::F32).unwrap();
        d.run(&qmatmul_forward(d, &ty, &d.upload_f32(&x, &[m, k]).unwrap(), &qw, None, false).unwrap()).unwrap();
        let want = r::qmatmul_forward(&x, &w, None, None, m, n, k);
        let bound = forward_bounds(&x, &w, None, None, m, n, k);
        assert_within(&format!("{name} forward m={m}"), &d.download_f32(&ty).unwrap(), &want, &bound);
        let dy = randn(950 + m as u64, m * n, 1.0);
        let tdx = d.zeros(&[m, k], rime_kernels::DType::F32).unwrap();
        d.run(&qmatmul_backward_input(d, &tdx, &d.upload_f32(&dy, &[m, n]).unwrap(), &qw, false).unwrap()).unwrap();
        let want = r::qmatmul_backward_input(&dy, &w, None, m, n, k);
        let bound = backward_bounds(&dy, &w, None, m, n, k);
        assert_within(&format!("{name} backward m={m}"), &d.download_f32(&tdx).unwrap(), &want, &bound);
    }
}

#[test]
fn bad_uploads_and_shapes_are_refused_with_the_sizes() {
    let d = dev();
    let e = QTensor::upload_named(d, "blk.0.attn_q.weight", QType::Q4K, 2, 300, &[0; 288]).unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("300") && e.contains("256"), "{e}");
    let e = QTensor::upload(d, QType::Q8_0, 2, 64, &[0; 135]).unwrap_err().to_string();
    assert!(e.contains("136") && e.contains("135") && e.contains("Q8_0"), "{e}");
    let e = QTensor::upload(d, QType::Q4_0, 0, 32, &[]).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");

    let qw = QTensor::upload(d, QType::Q4_0, 3, 32, &random_blocks(QType::Q4_0, 3, 32, 1)).unwrap();
    assert_eq!((qw.row_bytes(), qw.bytes()), (18, 56));
    let x = d.zeros(&[2, 32], rime_kernels::DType::F32).unwrap();
    let y = d.zeros(&[2, 3], rime_kernels::DType::F32).unwrap();
    let wrong_k = d.zeros(&[2, 31], rime_kernels::DType::F32).unwrap();
    let e = qmatmul_forward(d, &y, &wrong_k, &qw, None, false).err().unwrap().to_string();
    assert!(e.contains("qmatmul_forward") && e.contains("32"), "{e}");
    let y3 = d.zeros(&[3, 3], rime_kernels::DType::F32).unwrap();
    let e = qmatmul_forward(d, &y3, &x, &qw, None, false).err().unwrap().to_string();
    assert!(e.contains("rows"), "{e}");
    let bad_bias = d.zeros(&[4], rime_kernels::DType::F32).unwrap();
    assert!(qmatmul_forward(d, &y, &x, &qw, Some(&bad_bias), false).is_err());
    let e = qmatmul_backward_input(d, &x, &x, &qw, false).err().unwrap().to_string();
    assert!(e.contains("qmatmul_backward_input") && e.contains("dy"), "{e}");
    let half = d.zeros(&[2, 32], rime_kernels::DType::F16).unwrap();
    assert!(qmatmul_forward(d, &y, &half, &qw, None, false).is_err());

    assert_eq!(QType::from_ggml_id(12), Some(QType::Q4K));
    assert_eq!(QType::from_ggml_id(1), None);
}

/// Timing, not a check (`cargo test -p rime-kernels --test qmatmul timing -- --ignored --nocapture`): Q4_K and
/// Q4_1 weights at SmolLM2's MLP shapes (W [1536, 576] up, Q4_1 only; [576, 1536] down) against the f32 matmul of the
/// dequantized weight (with its texture twin where the device makes them), same run, M = 1, 8 and 8 x 256.
#[test]
#[ignore]
fn timing_against_f32_matmul() {
    use rime_kernels::ops::matmul::matmul_forward;
    use std::time::Instant;
    let d = dev();
    let time = |ds: &[rime_kernels::Dispatch]| {
        d.run(ds).unwrap();
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            d.run(ds).unwrap();
        }
        t.elapsed().as_secs_f64() / reps as f64 * 1e3
    };
    eprintln!("adapter: {}", d.info().name);
    eprintln!(
        "{:<5} {:>5} {:>5} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "type", "N", "K", "M", "q fwd ms", "scratch", "f32 fwd", "q bwd ms", "scratch", "f32 bwd"
    );
    for qtype in [QType::Q4K, QType::Q4_1] {
        // K = 576 is not a whole number of 256-value blocks: llama.cpp stores such K-quant tensors as another type.
        for (n, k) in [(1536, 576), (576, 1536)].into_iter().filter(|&(_, k)| qtype.row_bytes(k).is_some()) {
            let bytes = random_blocks(qtype, n, k, 3);
            let qw = QTensor::upload(d, qtype, n, k, &bytes).unwrap();
            let w = r::dequantize(qtype, &bytes, n, k).unwrap();
            let fw = d.with_texture_twin(&d.upload_f32(&w, &[n, k]).unwrap()).unwrap();
            for m in [1, 8, 16, 32, 64, 2048] {
                let x = d.upload_f32(&randn(1, m * k, 1.0), &[m, k]).unwrap();
                let y = d.zeros(&[m, n], rime_kernels::DType::F32).unwrap();
                let dy = d.upload_f32(&randn(2, m * n, 1.0), &[m, n]).unwrap();
                let dx = d.zeros(&[m, k], rime_kernels::DType::F32).unwrap();
                let scratch = d.zeros(&[n * k], rime_kernels::DType::F32).unwrap();
                let qsf = time(&qmatmul_forward_scratch(d, &y, &x, &qw, None, false, &scratch).unwrap());
                let qsb = time(&qmatmul_backward_input_scratch(d, &dx, &dy, &qw, false, &scratch).unwrap());
                let qf = time(&qmatmul_forward(d, &y, &x, &qw, None, false).unwrap());
                let ff = time(&matmul_forward(d, &y, &x, &fw, None, false, true).unwrap());
                let qb = time(&qmatmul_backward_input(d, &dx, &dy, &qw, false).unwrap());
                let fb = time(&matmul_forward(d, &dx, &dy, &fw, None, false, false).unwrap());
                eprintln!(
                    "{:<5} {n:>5} {k:>5} {m:>5} {qf:>10.2} {qsf:>10.2} {ff:>10.2} {qb:>10.2} {qsb:>10.2} {fb:>10.2}",
                    qtype.name()
                );
            }
        }
    }
}
