mod common;
use common::*;
use half::{bf16, f16};
use rime_kernels::ops::matmul::*;
use rime_kernels::reference::matmul::{self as r, MatmulDims};
use rime_kernels::{DType, Device, Tensor};

const VARIANTS: [Variant; 3] = [Variant::General, Variant::Tiled, Variant::TiledSubgroup];

/// f32 sums of K products of values in [-1, 1): rounding grows about linearly with K.
fn tol(k: usize) -> (f32, f32) {
    (1e-5 + 2e-6 * k as f32, 1e-4)
}

/// Upload `x` as `dt`, returning the tensor and the values the GPU will actually see.
fn upload_as(d: &Device, x: &[f32], shape: &[usize], dt: DType) -> (Tensor, Vec<f32>) {
    match dt {
        DType::F16 => {
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            (d.upload_f16(&h, shape).unwrap(), h.iter().map(|v| v.to_f32()).collect())
        }
        DType::BF16 => {
            let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            (d.upload_bf16(&h, shape).unwrap(), h.iter().map(|v| v.to_f32()).collect())
        }
        _ => (d.upload_f32(x, shape).unwrap(), x.to_vec()),
    }
}

fn shape(batch: &[usize], last: [usize; 2]) -> Vec<usize> {
    let mut s = batch.to_vec();
    s.extend(last);
    s
}

fn a_shape(batch: &[usize], dm: &MatmulDims) -> Vec<usize> {
    shape(batch, if dm.trans_a { [dm.k, dm.m] } else { [dm.m, dm.k] })
}

fn b_shape(batch: &[usize], dm: &MatmulDims) -> Vec<usize> {
    let last = if dm.trans_b { [dm.n, dm.k] } else { [dm.k, dm.n] };
    if dm.b_batched {
        shape(batch, last)
    } else {
        last.to_vec()
    }
}

/// (batch dims, M, K, N): odd sizes, sizes below and above the tiles, and 4-aligned M/K/N for the tiled kernels.
const SHAPES: &[(&[usize], usize, usize, usize)] = &[
    (&[], 1, 1, 1),
    (&[], 3, 17, 5),
    (&[2], 17, 3, 127),
    (&[2, 3], 5, 33, 7),
    (&[], 127, 64, 68),
    (&[3], 33, 20, 36),
    (&[2], 40, 8, 132),
    (&[], 36, 68, 40),
];

fn cases() -> Vec<(Vec<usize>, MatmulDims)> {
    let mut v = Vec::new();
    for &(batch, m, k, n) in SHAPES {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for b_batched in [false, true] {
                if b_batched && batch.is_empty() {
                    continue;
                }
                let bn = batch.iter().product();
                v.push((batch.to_vec(), MatmulDims { batch: bn, m, k, n, b_batched, trans_a: ta, trans_b: tb }));
            }
        }
    }
    v
}

fn check_forward(variant: Variant, batch: &[usize], dm: &MatmulDims, dt: DType, with_bias: bool, seed: u64) {
    let d = dev();
    let a = randn(seed, dm.batch * dm.m * dm.k, 1.0);
    let b = randn(seed + 1, dm.b_len(), 1.0);
    let bias = randn(seed + 2, dm.n, 1.0);
    let ta = d.upload_f32(&a, &a_shape(batch, dm)).unwrap();
    let (tb, b_seen) = upload_as(d, &b, &b_shape(batch, dm), dt);
    let tbias = d.upload_f32(&bias, &[dm.n]).unwrap();
    let out = d.empty(&shape(batch, [dm.m, dm.n]), DType::F32).unwrap();
    let bias_t = with_bias.then_some(&tbias);
    d.run(&matmul_forward_variant(d, variant, &out, &ta, &tb, bias_t, dm.trans_a, dm.trans_b).unwrap()).unwrap();
    let want = r::matmul_forward(&a, &b_seen, with_bias.then_some(&bias[..]), dm);
    let (at, rt) = tol(dm.k);
    assert_close(
        &format!("forward {variant:?} {dt:?} bias={with_bias} {batch:?} {dm:?}"),
        &d.download_f32(&out).unwrap(),
        &want,
        at,
        rt,
    );
}

#[test]
fn matmul_forward_matches_reference() {
    for (i, (batch, dm)) in cases().iter().enumerate() {
        for v in VARIANTS {
            check_forward(v, batch, dm, DType::F32, i % 2 == 0, i as u64 * 10);
        }
    }
}

#[test]
fn matmul_forward_half_weights_matches_reference() {
    for dt in [DType::F16, DType::BF16] {
        for (i, (batch, dm)) in cases().iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            for v in [Variant::General, Variant::Auto] {
                check_forward(v, batch, dm, dt, i % 2 == 1, i as u64 * 10 + 3);
            }
        }
    }
}

#[test]
fn matmul_backward_input_matches_reference() {
    let d = dev();
    for (i, (batch, dm)) in cases().iter().enumerate() {
        let dt = [DType::F32, DType::F16, DType::BF16][i % 3];
        let dout = randn(i as u64, dm.batch * dm.m * dm.n, 1.0);
        let b = randn(i as u64 + 100, dm.b_len(), 1.0);
        let tdout = d.upload_f32(&dout, &shape(batch, [dm.m, dm.n])).unwrap();
        let (tb, b_seen) = upload_as(d, &b, &b_shape(batch, dm), dt);
        let want = r::matmul_backward_input(&dout, &b_seen, dm);
        // Every kernel for f32 weights; half weights through the kernel the device picks (fewer compiles).
        let variants: &[Variant] = if dt == DType::F32 { &VARIANTS } else { &[Variant::Auto] };
        for &v in variants {
            let da = d.empty(&a_shape(batch, dm), DType::F32).unwrap();
            d.run(&matmul_backward_input_variant(d, v, &da, &tdout, &tb, dm.trans_a, dm.trans_b).unwrap()).unwrap();
            let (at, rt) = tol(dm.n);
            assert_close(
                &format!("backward_input {v:?} {dt:?} {batch:?} {dm:?}"),
                &d.download_f32(&da).unwrap(),
                &want,
                at,
                rt,
            );
        }
    }
}

/// Forward x·op(W) and the input gradient dy·op(W)ᵀ through `w` (a weight with a texture twin) with `variant`,
/// against the reference on `want_w` (the values the twin holds). Seeds: x from `seed`, dy from `seed + 1`.
fn check_twin_products(variant: Variant, batch: &[usize], dm: &MatmulDims, w: &Tensor, want_w: &[f32], seed: u64) {
    let d = dev();
    let (m, k, n) = (dm.m, dm.k, dm.n);
    let x = randn(seed, dm.batch * m * k, 1.0);
    let tx = d.upload_f32(&x, &a_shape(batch, dm)).unwrap();
    let out = d.empty(&shape(batch, [m, n]), DType::F32).unwrap();
    d.run(&matmul_forward_variant(d, variant, &out, &tx, w, None, false, dm.trans_b).unwrap()).unwrap();
    let (at, rt) = tol(k);
    let want = r::matmul_forward(&x, want_w, None, dm);
    let what = format!("twin forward {variant:?} {:?} {batch:?} {dm:?}", w.dtype);
    assert_close(&what, &d.download_f32(&out).unwrap(), &want, at, rt);
    let dy = randn(seed + 1, dm.batch * m * n, 1.0);
    let tdy = d.upload_f32(&dy, &shape(batch, [m, n])).unwrap();
    let dx = d.empty(&a_shape(batch, dm), DType::F32).unwrap();
    d.run(&matmul_backward_input_variant(d, variant, &dx, &tdy, w, false, dm.trans_b).unwrap()).unwrap();
    let (at, rt) = tol(n);
    let want = r::matmul_backward_input(&dy, want_w, dm);
    let what = format!("twin backward_input {variant:?} {:?} {batch:?} {dm:?}", w.dtype);
    assert_close(&what, &d.download_f32(&dx).unwrap(), &want, at, rt);
}

/// Products whose rhs is a frozen weight with a texture twin: forward x·Wᵀ (nt) and x·W (nn), the input
/// gradient dy·W (nn), batched lhs against the shared weight, ragged M and N, and the layouts the twin cannot
/// serve (trans_a), which must fall back to the buffer. The weight buffer is zeroed after the twin is made, so
/// a product that matches the reference read the twin (on CPU adapters, the only ones that get twins).
#[test]
fn matmul_texture_twin_matches_reference() {
    let d = dev();
    // (batch dims of x, M, K, N, trans_b): W is [N, K] when trans_b, else [K, N]; its rows are 64-multiples.
    let cases: &[(&[usize], usize, usize, usize, bool)] = &[
        (&[], 37, 128, 72, true),
        (&[2], 9, 64, 200, true),
        (&[], 33, 72, 192, false),
        (&[3], 5, 24, 64, false),
        (&[], 64, 128, 128, true),
    ];
    for (i, &(batch, m, k, n, tb)) in cases.iter().enumerate() {
        let seed = 700 + i as u64 * 10;
        let dm = MatmulDims { batch: batch.iter().product(), m, k, n, b_batched: false, trans_a: false, trans_b: tb };
        let w = randn(seed, k * n, 1.0);
        let plain = d.upload_f32(&w, &b_shape(batch, &dm)).unwrap();
        let tw = d.with_texture_twin(&plain).unwrap();
        assert_eq!(tw.texture.is_some(), d.is_cpu(), "twin of {:?}", plain.shape);
        d.write_f32(&plain, &vec![0.0; k * n]).unwrap();
        let want_w = if d.is_cpu() { w.clone() } else { vec![0.0; k * n] };
        for v in [Variant::Auto, Variant::TiledTexture] {
            check_twin_products(v, batch, &dm, &tw, &want_w, seed + 1);
        }
        let x = randn(seed + 1, dm.batch * m * k, 1.0);
        // trans_a has no texture kernel: the buffer (now zeros) is read, so the product is zero.
        let dm_t = MatmulDims { trans_a: true, ..dm };
        let txt = d.upload_f32(&x, &a_shape(batch, &dm_t)).unwrap();
        let out = d.empty(&shape(batch, [m, n]), DType::F32).unwrap();
        d.run(&matmul_forward_variant(d, Variant::TiledTexture, &out, &txt, &tw, None, true, tb).unwrap()).unwrap();
        assert!(d.download_f32(&out).unwrap().iter().all(|&v| v == 0.0), "trans_a with a twin reads the buffer");
    }
}

/// Rewriting a weight through `write_f32` (PiSSA and SVFit residuals) updates its twin.
#[test]
fn texture_twin_follows_write_f32() {
    let d = dev();
    let (m, k, n) = (8, 64, 64);
    let w1 = randn(40, n * k, 1.0);
    let w2 = randn(41, n * k, 1.0);
    let tw = d.with_texture_twin(&d.upload_f32(&w1, &[n, k]).unwrap()).unwrap();
    d.write_f32(&tw, &w2).unwrap();
    let x = randn(42, m * k, 1.0);
    let tx = d.upload_f32(&x, &[m, k]).unwrap();
    let out = d.empty(&[m, n], DType::F32).unwrap();
    d.run(&matmul_forward_variant(d, Variant::TiledTexture, &out, &tx, &tw, None, false, true).unwrap()).unwrap();
    let dm = MatmulDims { batch: 1, m, k, n, b_batched: false, trans_a: false, trans_b: true };
    let (at, rt) = tol(k);
    assert_close(
        "twin after write_f32",
        &d.download_f32(&out).unwrap(),
        &r::matmul_forward(&x, &w2, None, &dm),
        at,
        rt,
    );
}

/// A reshape that keeps the row length keeps the twin; any other drops it, and ineligible tensors get none.
#[test]
fn texture_twin_follows_reshape_and_eligibility() {
    let d = dev();
    let t = d.with_texture_twin(&d.upload_f32(&randn(1, 4 * 128, 1.0), &[4, 128]).unwrap()).unwrap();
    assert_eq!(t.texture.is_some(), d.is_cpu());
    assert_eq!(t.reshape(&[2, 2, 128]).unwrap().texture.is_some(), d.is_cpu());
    assert!(t.reshape(&[8, 64]).unwrap().texture.is_none());
    // Views (what the graph executor hands kernels) follow the same rule and also need the same dtype.
    assert_eq!(t.view(&[4, 128], DType::F32).texture.is_some(), d.is_cpu());
    assert!(t.view(&[4, 128], DType::U32).texture.is_none());
    // Rows that are not 64-multiples, non-f32 and 1-D tensors stay plain.
    assert!(d.with_texture_twin(&d.upload_f32(&randn(2, 4 * 36, 1.0), &[4, 36]).unwrap()).unwrap().texture.is_none());
    assert!(d.with_texture_twin(&d.upload_f32(&randn(3, 128, 1.0), &[128]).unwrap()).unwrap().texture.is_none());
    // f16 rows need 128-multiples (rgba16float texels, 256-byte rows); bf16 has no texture format.
    let h: Vec<f16> = randn(4, 4 * 128, 1.0).iter().map(|&v| f16::from_f32(v)).collect();
    assert_eq!(d.with_texture_twin(&d.upload_f16(&h, &[4, 128]).unwrap()).unwrap().texture.is_some(), d.is_cpu());
    assert!(d.with_texture_twin(&d.upload_f16(&h, &[8, 64]).unwrap()).unwrap().texture.is_none());
    let hb: Vec<bf16> = randn(5, 4 * 128, 1.0).iter().map(|&v| bf16::from_f32(v)).collect();
    assert!(d.with_texture_twin(&d.upload_bf16(&hb, &[4, 128]).unwrap()).unwrap().texture.is_none());
}

/// f16 weights with an rgba16float twin: forward x·Wᵀ and x·W and the input gradient, against the reference on
/// the f16-rounded weight, with the buffer zeroed after the copy (so a match proves the twin was read).
#[test]
fn matmul_f16_texture_twin_matches_reference() {
    let d = dev();
    let cases: &[(&[usize], usize, usize, usize, bool)] = &[(&[], 37, 128, 72, true), (&[2], 9, 72, 256, false)];
    for (i, &(batch, m, k, n, tb)) in cases.iter().enumerate() {
        let seed = 900 + i as u64 * 10;
        let dm = MatmulDims { batch: batch.iter().product(), m, k, n, b_batched: false, trans_a: false, trans_b: tb };
        let (plain, w_seen) = upload_as(d, &randn(seed, k * n, 1.0), &b_shape(batch, &dm), DType::F16);
        let tw = d.with_texture_twin(&plain).unwrap();
        assert_eq!(tw.texture.is_some(), d.is_cpu(), "twin of {:?}", plain.shape);
        d.queue().write_buffer(&plain.buffer, 0, &vec![0u8; plain.buffer.size() as usize]);
        let want_w = if d.is_cpu() { w_seen } else { vec![0.0; k * n] };
        check_twin_products(Variant::Auto, batch, &dm, &tw, &want_w, seed + 1);
    }
}

#[test]
fn matmul_backward_weight_matches_reference() {
    let d = dev();
    for (i, (batch, dm)) in cases().iter().enumerate() {
        let a = randn(i as u64 + 7, dm.batch * dm.m * dm.k, 1.0);
        let dout = randn(i as u64 + 8, dm.batch * dm.m * dm.n, 1.0);
        let prev = randn(i as u64 + 9, dm.b_len(), 1.0);
        let ta = d.upload_f32(&a, &a_shape(batch, dm)).unwrap();
        let tdout = d.upload_f32(&dout, &shape(batch, [dm.m, dm.n])).unwrap();
        let want = r::matmul_backward_weight(&a, &dout, dm);
        let want_acc: Vec<f32> = want.iter().zip(&prev).map(|(w, p)| w + p).collect();
        let red = dm.m * if dm.b_batched { 1 } else { dm.batch };
        let (at, rt) = tol(red);
        for v in VARIANTS {
            for accumulate in [false, true] {
                let db = d.upload_f32(&prev, &b_shape(batch, dm)).unwrap();
                d.run(
                    &matmul_backward_weight_variant(d, v, &db, &ta, &tdout, dm.trans_a, dm.trans_b, accumulate)
                        .unwrap(),
                )
                .unwrap();
                let w = if accumulate { &want_acc } else { &want };
                assert_close(
                    &format!("backward_weight {v:?} acc={accumulate} {batch:?} {dm:?}"),
                    &d.download_f32(&db).unwrap(),
                    w,
                    at,
                    rt,
                );
            }
        }
    }
}

// loss = sum(out ⊙ g); dloss/da = backward_input(g), dloss/db = backward_weight(a, g), dloss/dbias = sum_rows g.
#[test]
fn matmul_backward_matches_finite_differences() {
    let d = dev();
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for b_batched in [false, true] {
            let dm = MatmulDims { batch: 2, m: 3, k: 5, n: 4, b_batched, trans_a: ta, trans_b: tb };
            let batch = [2usize];
            let a = randn(1, dm.batch * dm.m * dm.k, 1.0);
            let b = randn(2, dm.b_len(), 1.0);
            let g = randn(3, dm.batch * dm.m * dm.n, 1.0);
            let loss = |a: &[f32], b: &[f32]| -> f64 {
                r::matmul_forward(a, b, None, &dm).iter().zip(&g).map(|(o, g)| *o as f64 * *g as f64).sum()
            };
            let fd_a = finite_diff(&a, 1e-2, |x| loss(x, &b));
            let fd_b = finite_diff(&b, 1e-2, |x| loss(&a, x));
            let ref_a = r::matmul_backward_input(&g, &b, &dm);
            let ref_b = r::matmul_backward_weight(&a, &g, &dm);
            assert_close("reference da vs fd", &ref_a, &fd_a, 1e-3, 1e-3);
            assert_close("reference db vs fd", &ref_b, &fd_b, 1e-3, 1e-3);
            let tg = d.upload_f32(&g, &shape(&batch, [dm.m, dm.n])).unwrap();
            let tb_ = d.upload_f32(&b, &b_shape(&batch, &dm)).unwrap();
            let ta_ = d.upload_f32(&a, &a_shape(&batch, &dm)).unwrap();
            let da = d.empty(&a_shape(&batch, &dm), DType::F32).unwrap();
            let db = d.empty(&b_shape(&batch, &dm), DType::F32).unwrap();
            let mut ds = matmul_backward_input(d, &da, &tg, &tb_, ta, tb).unwrap();
            ds.extend(matmul_backward_weight(d, &db, &ta_, &tg, ta, tb, false).unwrap());
            d.run(&ds).unwrap();
            assert_close("gpu da vs fd", &d.download_f32(&da).unwrap(), &fd_a, 1e-3, 1e-3);
            assert_close("gpu db vs fd", &d.download_f32(&db).unwrap(), &fd_b, 1e-3, 1e-3);
        }
    }
}

#[test]
fn matmul_linear_convention_matches_reference() {
    // PyTorch Linear: y = x·Wᵀ + bias, W [OC, C], x [B, T, C].
    let d = dev();
    let (bt, c, oc) = ([2usize, 5], 12, 8);
    let x = randn(40, 10 * c, 1.0);
    let w = randn(41, oc * c, 1.0);
    let bias = randn(42, oc, 1.0);
    let y = d.empty(&[2, 5, oc], DType::F32).unwrap();
    let tx = d.upload_f32(&x, &[bt[0], bt[1], c]).unwrap();
    let tw = d.upload_f32(&w, &[oc, c]).unwrap();
    let tbias = d.upload_f32(&bias, &[oc]).unwrap();
    d.run(&matmul_forward(d, &y, &tx, &tw, Some(&tbias), false, true).unwrap()).unwrap();
    let mut want = vec![0f32; 10 * oc];
    for row in 0..10 {
        for o in 0..oc {
            let s: f64 = (0..c).map(|i| x[row * c + i] as f64 * w[o * c + i] as f64).sum();
            want[row * oc + o] = (s + bias[o] as f64) as f32;
        }
    }
    assert_close("linear", &d.download_f32(&y).unwrap(), &want, 1e-5, 1e-5);
}

#[test]
fn matmul_empty_inner_dim_matches_reference() {
    // K = 0: out is the bias alone, db is zero (or unchanged when accumulating).
    let d = dev();
    for v in VARIANTS {
        let out = d.empty(&[3, 8], DType::F32).unwrap();
        let (a, b) = (d.empty(&[3, 0], DType::F32).unwrap(), d.empty(&[0, 8], DType::F32).unwrap());
        let bias: Vec<f32> = (0..8).map(|i| i as f32).collect();
        d.run(
            &matmul_forward_variant(d, v, &out, &a, &b, Some(&d.upload_f32(&bias, &[8]).unwrap()), false, false)
                .unwrap(),
        )
        .unwrap();
        let want: Vec<f32> = (0..24).map(|i| (i % 8) as f32).collect();
        assert_close(&format!("K=0 forward {v:?}"), &d.download_f32(&out).unwrap(), &want, 0.0, 0.0);
    }
}

/// The subgroup tests above exercise the broadcast kernel only where subgroups are 8 lanes (lavapipe);
/// elsewhere TiledSubgroup falls back to Tiled. Fail loudly if lavapipe ever reports another size.
#[test]
fn lavapipe_subgroups_are_eight_lanes() {
    let d = dev();
    if d.is_cpu() && d.has_subgroups() {
        assert_eq!((d.info().subgroup_min_size, d.info().subgroup_max_size), (8, 8), "{:?}", d.info());
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let d = dev();
    let f = |s: &[usize]| d.empty(s, DType::F32).unwrap();
    let err = |r: rime_kernels::Result<Vec<rime_kernels::Dispatch>>| r.err().expect("an error").to_string();
    // inner dims differ
    let e = err(matmul_forward(d, &f(&[3, 5]), &f(&[3, 4]), &f(&[6, 5]), None, false, false));
    assert!(e.contains("matmul_forward") && e.contains("inner dims"), "{e}");
    // wrong out shape
    let e = err(matmul_forward(d, &f(&[3, 6]), &f(&[3, 4]), &f(&[4, 5]), None, false, false));
    assert!(e.contains("out is [3, 6]"), "{e}");
    // bias length
    let e = err(matmul_forward(d, &f(&[3, 5]), &f(&[3, 4]), &f(&[4, 5]), Some(&f(&[4])), false, false));
    assert!(e.contains("bias"), "{e}");
    // batched b whose batch dims differ from a's
    let e = err(matmul_forward(d, &f(&[2, 3, 5]), &f(&[2, 3, 4]), &f(&[3, 4, 5]), None, false, false));
    assert!(e.contains("batch dims"), "{e}");
    // 1-D operand
    assert!(matmul_forward(d, &f(&[5]), &f(&[4]), &f(&[4, 5]), None, false, false).is_err());
    // f16 activations are not accepted
    let h = d.empty(&[3, 4], DType::F16).unwrap();
    assert!(matmul_forward(d, &f(&[3, 5]), &h, &f(&[4, 5]), None, false, false).is_err());
    let e = err(matmul_backward_input(d, &f(&[3, 4]), &f(&[3, 6]), &f(&[4, 5]), false, false));
    assert!(e.contains("matmul_backward_input") && e.contains("dout"), "{e}");
    let e = err(matmul_backward_weight(d, &f(&[4, 5]), &f(&[3, 4]), &f(&[2, 5]), false, false, false));
    assert!(e.contains("matmul_backward_weight") && e.contains("dout"), "{e}");
}

/// CPU time of this process (user + system), which lavapipe's worker threads count towards: on a shared
/// machine it is a steadier measure of a kernel's cost than wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // Fields 14 and 15 of /proc/self/stat (utime, stime) in clock ticks of 1/100 s.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// Throughput on square sizes (forward for both weight layouts, and a Linear weight gradient); run with
/// `cargo test --test matmul -- --ignored --nocapture` (RIME_MM_SIZES=1024,2048, RIME_MM_VARIANT=...).
#[test]
#[ignore]
fn matmul_forward_throughput() {
    let d = dev();
    let sizes: Vec<usize> = std::env::var("RIME_MM_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or(vec![512, 1024]);
    let time = |label: String, n: usize, ds: &[rime_kernels::Dispatch]| {
        let t0 = std::time::Instant::now();
        d.run(ds).unwrap();
        let build = t0.elapsed().as_secs_f64();
        let reps = 6;
        let (t, cpu0) = (std::time::Instant::now(), cpu_seconds());
        for _ in 0..reps {
            d.run(ds).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let cpu = (cpu_seconds() - cpu0) / reps as f64;
        let flop = 2.0 * (n as f64).powi(3);
        println!(
            "{label}: {:.1} GFLOP/s, {:.1} GFLOP per CPU-second (first run {build:.2} s)",
            flop / s / 1e9,
            flop / cpu / 1e9
        );
    };
    for n in sizes {
        let a = d.upload_f32(&randn(1, n * n, 1.0), &[n, n]).unwrap();
        let out = d.empty(&[n, n], DType::F32).unwrap();
        for v in VARIANTS {
            // RIME_MM_VARIANT=TiledSubgroup (etc.) times one variant only.
            if std::env::var("RIME_MM_VARIANT").is_ok_and(|w| w != format!("{v:?}")) {
                continue;
            }
            for (tb, dt) in [(false, DType::F32), (true, DType::F32), (true, DType::F16)] {
                let (b, _) = upload_as(d, &randn(2, n * n, 1.0), &[n, n], dt);
                let ds = matmul_forward_variant(d, v, &out, &a, &b, None, false, tb).unwrap();
                time(format!("{n}^3 forward trans_b={tb} {dt:?} {v:?}"), n, &ds);
            }
            let ds = matmul_backward_weight_variant(d, v, &out, &a, &a, false, true, false).unwrap();
            time(format!("{n}^3 backward_weight trans_b=true {v:?}"), n, &ds);
        }
    }
}
