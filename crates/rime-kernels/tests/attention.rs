mod common;
use common::*;
use rime_kernels::ops::attention::*;
use rime_kernels::reference::attention::{self as r, Dims};
use rime_kernels::{DType, Device, Tensor};

// Forward: GPU f32 online softmax vs f64 reference.
const FWD_ATOL: f32 = 2e-5;
const FWD_RTOL: f32 = 1e-4;
// Backward: longer f32 sums (over S keys, or over T queries x group heads).
const BWD_ATOL: f32 = 1e-4;
const BWD_RTOL: f32 = 1e-3;

#[derive(Clone, Copy, Debug)]
struct Case {
    d: Dims,
    mask: bool,
    causal: bool,
}

#[allow(clippy::too_many_arguments)]
fn case(b: usize, t: usize, s: usize, nh: usize, nkv: usize, hs: usize, mask: bool, causal: bool) -> Case {
    Case { d: Dims { b, t, s, nh, nkv, hs }, mask, causal }
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<Vec<f32>>,
    dout: Vec<f32>,
}

fn inputs(c: &Case, seed: u64) -> Inputs {
    let d = c.d;
    let nq = d.b * d.t * d.nh * d.hs;
    let nk = d.b * d.s * d.nkv * d.hs;
    // Padding at the end of each sequence with a different length per batch entry, plus holes, so some
    // rows lose keys in the middle too. Batch entry 0 always keeps key 0.
    let mask = c.mask.then(|| {
        let mut r = randn(seed + 4, d.b * d.s, 1.0);
        for b in 0..d.b {
            let len = d.s - (b * 3) % d.s.max(1);
            for j in 0..d.s {
                let x = &mut r[b * d.s + j];
                *x = if j < len && *x > -0.6 { 1.0 } else { 0.0 };
            }
        }
        r[0] = 1.0;
        r
    });
    Inputs {
        q: randn(seed, nq, 2.0),
        k: randn(seed + 1, nk, 2.0),
        v: randn(seed + 2, nk, 1.0),
        mask,
        dout: randn(seed + 3, nq, 1.0),
    }
}

fn scale(d: &Dims) -> f32 {
    1.0 / (d.hs as f32).sqrt()
}

fn up(dev: &Device, x: &[f32], shape: &[usize]) -> Tensor {
    dev.upload_f32(x, shape).unwrap()
}

struct Gpu {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Option<Tensor>,
    out: Tensor,
    lse: Tensor,
}

fn gpu_forward(c: &Case, x: &Inputs, variant: Variant) -> Gpu {
    let dev = dev();
    let d = c.d;
    let qs = [d.b, d.t, d.nh, d.hs];
    let ks = [d.b, d.s, d.nkv, d.hs];
    let g = Gpu {
        q: up(dev, &x.q, &qs),
        k: up(dev, &x.k, &ks),
        v: up(dev, &x.v, &ks),
        mask: x.mask.as_ref().map(|m| up(dev, m, &[d.b, d.s])),
        out: dev.empty(&qs, DType::F32).unwrap(),
        lse: dev.empty(&[d.b, d.nh, d.t], DType::F32).unwrap(),
    };
    let ds =
        attention_forward_variant(dev, variant, &g.out, &g.lse, &g.q, &g.k, &g.v, g.mask.as_ref(), c.causal, scale(&d))
            .unwrap();
    dev.run(&ds).unwrap();
    g
}

/// (dq, dk, dv) from the GPU backward, given the GPU forward's out and lse.
fn gpu_backward(c: &Case, x: &Inputs, g: &Gpu, variant: Variant) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dev = dev();
    let d = c.d;
    let dq = dev.empty(&g.q.shape, DType::F32).unwrap();
    let dk = dev.empty(&g.k.shape, DType::F32).unwrap();
    let dv = dev.empty(&g.k.shape, DType::F32).unwrap();
    let delta = dev.empty(&[d.b, d.nh, d.t], DType::F32).unwrap();
    let dout = up(dev, &x.dout, &g.q.shape);
    let ds = attention_backward_variant(
        dev,
        variant,
        &dq,
        &dk,
        &dv,
        &delta,
        &dout,
        &g.q,
        &g.k,
        &g.v,
        &g.out,
        &g.lse,
        g.mask.as_ref(),
        c.causal,
        scale(&d),
    )
    .unwrap();
    dev.run(&ds).unwrap();
    (dev.download_f32(&dq).unwrap(), dev.download_f32(&dk).unwrap(), dev.download_f32(&dv).unwrap())
}

/// lse may hold -inf (rows that see no key): those must match exactly, the rest within tolerance.
#[track_caller]
fn assert_lse(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f32::NEG_INFINITY {
            assert_eq!(g, w, "{what}: lse[{i}] should be -inf (row sees no key), got {g}");
        } else {
            assert!((g - w).abs() <= FWD_ATOL + FWD_RTOL * w.abs(), "{what}: lse[{i}] got {g}, want {w}");
        }
    }
}

fn check_forward(c: &Case, seed: u64, variant: Variant) -> (Inputs, Gpu) {
    let x = inputs(c, seed);
    let g = gpu_forward(c, &x, variant);
    let (out, lse) = r::attention_forward(&c.d, &x.q, &x.k, &x.v, x.mask.as_deref(), c.causal, scale(&c.d));
    let what = format!("{c:?} {variant:?}");
    assert_close(&format!("out {what}"), &dev().download_f32(&g.out).unwrap(), &out, FWD_ATOL, FWD_RTOL);
    assert_lse(&what, &dev().download_f32(&g.lse).unwrap(), &lse);
    (x, g)
}

fn check_backward(c: &Case, seed: u64, variant: Variant) {
    let (x, g) = check_forward(c, seed, variant);
    let (dq, dk, dv) = gpu_backward(c, &x, &g, variant);
    let (wq, wk, wv) = r::attention_backward(&c.d, &x.dout, &x.q, &x.k, &x.v, x.mask.as_deref(), c.causal, scale(&c.d));
    let what = format!("{c:?} {variant:?}");
    assert_close(&format!("dq {what}"), &dq, &wq, BWD_ATOL, BWD_RTOL);
    assert_close(&format!("dk {what}"), &dk, &wk, BWD_ATOL, BWD_RTOL);
    assert_close(&format!("dv {what}"), &dv, &wv, BWD_ATOL, BWD_RTOL);
}

fn forward_cases() -> Vec<Case> {
    vec![
        case(1, 1, 1, 1, 1, 4, false, false),
        case(2, 3, 3, 2, 2, 8, false, false),
        case(2, 17, 17, 3, 3, 12, true, false),
        case(1, 17, 17, 4, 2, 32, false, true),
        case(2, 127, 127, 2, 1, 32, true, true),
        case(1, 3, 17, 6, 2, 64, false, true), // KV cache: T < S
        case(1, 1, 127, 3, 1, 64, true, true), // one decode step
        case(2, 17, 3, 2, 1, 8, true, false),  // T > S
        case(1, 17, 3, 2, 2, 8, false, true),  // T > S causal: the first rows see nothing
        case(1, 9, 20, 9, 3, 64, true, false), // SmolLM2 head layout
        case(1, 5, 7, 1, 1, 128, false, false),
    ]
}

#[test]
fn attention_forward_matches_reference() {
    for (i, c) in forward_cases().iter().enumerate() {
        check_forward(c, 100 + i as u64, Variant::Subgroup);
    }
}

#[test]
fn attention_forward_plain_variant_matches_reference() {
    for (i, c) in [case(2, 70, 70, 4, 2, 32, true, true), case(1, 3, 17, 2, 1, 32, false, false)].iter().enumerate() {
        check_forward(c, 200 + i as u64, Variant::Plain);
    }
}

#[test]
fn attention_backward_matches_reference() {
    let cases = [
        case(1, 1, 1, 1, 1, 4, false, false),
        case(2, 3, 3, 2, 2, 8, true, false),
        case(1, 17, 17, 4, 2, 32, false, true),
        case(2, 33, 33, 2, 1, 32, true, true),
        case(1, 3, 17, 6, 2, 64, true, true),
        case(2, 17, 3, 2, 1, 12, true, false),
        case(1, 17, 3, 2, 2, 8, false, true),
        case(1, 9, 20, 9, 3, 64, true, false),
        case(1, 5, 7, 2, 1, 128, true, true),
    ];
    for (i, c) in cases.iter().enumerate() {
        check_backward(c, 300 + i as u64, Variant::Subgroup);
    }
}

#[test]
fn attention_backward_plain_variant_matches_reference() {
    for (i, c) in [case(2, 70, 70, 4, 2, 32, true, true), case(1, 3, 17, 2, 1, 32, false, false)].iter().enumerate() {
        check_backward(c, 400 + i as u64, Variant::Plain);
    }
}

// L = sum(out * dout), so dL/dq etc. are the backward's outputs for upstream gradient dout; the central
// differences run on the f64-accumulating CPU forward.
#[test]
fn attention_backward_matches_finite_differences() {
    let cases =
        [case(1, 3, 5, 4, 2, 8, true, true), case(2, 4, 4, 2, 1, 4, false, false), case(1, 2, 6, 2, 2, 8, true, false)];
    for (i, c) in cases.iter().enumerate() {
        let x = inputs(c, 500 + i as u64);
        let g = gpu_forward(c, &x, Variant::Subgroup);
        let (dq, dk, dv) = gpu_backward(c, &x, &g, Variant::Subgroup);
        let sc = scale(&c.d);
        let m = x.mask.as_deref();
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let (o, _) = r::attention_forward(&c.d, q, k, v, m, c.causal, sc);
            o.iter().zip(&x.dout).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        let eps = 1e-2;
        let fq = finite_diff(&x.q, eps, |q| loss(q, &x.k, &x.v));
        let fk = finite_diff(&x.k, eps, |k| loss(&x.q, k, &x.v));
        let fv = finite_diff(&x.v, eps, |v| loss(&x.q, &x.k, v));
        // Finite differences carry O(eps^2) truncation error and the f32 rounding of the outputs.
        let what = format!("{c:?}");
        assert_close(&format!("dq vs fd {what}"), &dq, &fq, 2e-3, 1e-2);
        assert_close(&format!("dk vs fd {what}"), &dk, &fk, 2e-3, 1e-2);
        assert_close(&format!("dv vs fd {what}"), &dv, &fv, 2e-3, 1e-2);
    }
}

#[test]
fn attention_fully_masked_rows_are_zero() {
    let dev = dev();
    // Batch entry 1 is all padding; causal with T > S leaves the first T - S rows of entry 0 without keys.
    let c = case(2, 6, 4, 2, 1, 8, true, true);
    let mut x = inputs(&c, 600);
    let mut m = vec![1.0f32; 8];
    m[4..].fill(0.0);
    x.mask = Some(m);
    let g = gpu_forward(&c, &x, Variant::Subgroup);
    let out = dev.download_f32(&g.out).unwrap();
    let lse = dev.download_f32(&g.lse).unwrap();
    let row = c.d.nh * c.d.hs;
    assert!(out[6 * row..].iter().all(|&v| v == 0.0), "all-padding batch entry must output zeros");
    assert!(out[..2 * row].iter().all(|&v| v == 0.0), "rows before the causal window must output zeros");
    assert!(lse[12..].iter().all(|&v| v == f32::NEG_INFINITY));
    let (dq, dk, dv) = gpu_backward(&c, &x, &g, Variant::Subgroup);
    for (name, gr) in [("dq", &dq), ("dk", &dk), ("dv", &dv)] {
        assert!(gr.iter().all(|v| v.is_finite()), "{name} must be finite");
    }
    assert!(dq[6 * row..].iter().all(|&v| v == 0.0));
    assert!(dk[4 * c.d.hs..].iter().all(|&v| v == 0.0) && dv[4 * c.d.hs..].iter().all(|&v| v == 0.0));
    let sc = scale(&c.d);
    let (wo, wl) = r::attention_forward(&c.d, &x.q, &x.k, &x.v, x.mask.as_deref(), c.causal, sc);
    assert_close("out", &out, &wo, FWD_ATOL, FWD_RTOL);
    assert_lse("lse", &lse, &wl);
    let (wq, wk, wv) = r::attention_backward(&c.d, &x.dout, &x.q, &x.k, &x.v, x.mask.as_deref(), c.causal, sc);
    assert_close("dq", &dq, &wq, BWD_ATOL, BWD_RTOL);
    assert_close("dk", &dk, &wk, BWD_ATOL, BWD_RTOL);
    assert_close("dv", &dv, &wv, BWD_ATOL, BWD_RTOL);
}

#[test]
fn attention_backward_is_deterministic() {
    let c = case(1, 19, 19, 4, 1, 8, true, true);
    let x = inputs(&c, 700);
    let g = gpu_forward(&c, &x, Variant::Subgroup);
    let a = gpu_backward(&c, &x, &g, Variant::Subgroup);
    let b = gpu_backward(&c, &x, &g, Variant::Subgroup);
    assert!(a == b, "two backward runs differ");
}

#[test]
fn attention_rejects_bad_shapes() {
    let dev = dev();
    let t = |shape: &[usize]| dev.empty(shape, DType::F32).unwrap();
    let fwd = |out: &Tensor, lse: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, m: Option<&Tensor>| {
        attention_forward(dev, out, lse, q, k, v, m, false, 1.0).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let (q, k, out, lse) = (t(&[2, 5, 4, 8]), t(&[2, 7, 2, 8]), t(&[2, 5, 4, 8]), t(&[2, 4, 5]));
    assert_eq!(fwd(&out, &lse, &q, &k, &k, None), "");
    // head size not a multiple of 4, too large
    let e = fwd(&t(&[1, 2, 1, 6]), &t(&[1, 1, 2]), &t(&[1, 2, 1, 6]), &t(&[1, 2, 1, 6]), &t(&[1, 2, 1, 6]), None);
    assert!(e.contains("multiple of 4"), "{e}");
    let e =
        fwd(&t(&[1, 2, 1, 260]), &t(&[1, 1, 2]), &t(&[1, 2, 1, 260]), &t(&[1, 2, 1, 260]), &t(&[1, 2, 1, 260]), None);
    assert!(e.contains("at most 256"), "{e}");
    // heads not divisible
    let k3 = t(&[2, 7, 3, 8]);
    let e = fwd(&out, &lse, &q, &k3, &k3, None);
    assert!(e.contains("kv heads"), "{e}");
    // mask, lse, v, out, rank, batch
    let e = fwd(&out, &lse, &q, &k, &k, Some(&t(&[2, 5])));
    assert!(e.contains("mask"), "{e}");
    let e = fwd(&out, &t(&[2, 5, 4]), &q, &k, &k, None);
    assert!(e.contains("lse"), "{e}");
    let e = fwd(&out, &lse, &q, &k, &t(&[2, 7, 2, 4]), None);
    assert!(e.contains("v is [2, 7, 2, 4], expected [2, 7, 2, 8]"), "{e}");
    let e = fwd(&t(&[2, 5, 4, 4]), &lse, &q, &k, &k, None);
    assert!(e.contains("out"), "{e}");
    let e = fwd(&out, &lse, &t(&[10, 4, 8]), &k, &k, None);
    assert!(e.contains("[B, T, NH, HS]"), "{e}");
    let e = fwd(&out, &lse, &q, &t(&[1, 7, 2, 8]), &t(&[1, 7, 2, 8]), None);
    assert!(e.contains("batch"), "{e}");
    let e = fwd(&out, &lse, &dev.empty(&[2, 5, 4, 8], DType::F16).unwrap(), &k, &k, None);
    assert!(e.contains("F32"), "{e}");
    // backward: gradient and scratch shapes
    let bwd = |dq: &Tensor, dk: &Tensor, delta: &Tensor| {
        attention_backward(dev, dq, dk, &k, delta, &out, &q, &k, &k, &out, &lse, None, true, 1.0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(bwd(&q, &k, &lse), "");
    let e = bwd(&t(&[2, 5, 4, 4]), &k, &lse);
    assert!(e.contains("dq"), "{e}");
    let e = bwd(&q, &t(&[2, 7, 4, 8]), &lse);
    assert!(e.contains("dk"), "{e}");
    let e = bwd(&q, &k, &t(&[2, 4, 4]));
    assert!(e.contains("delta_tmp"), "{e}");
}

/// User + system CPU time of this process (lavapipe's worker threads included): unlike wall time, it holds
/// steady when other jobs share the machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|x| x.parse::<f64>().ok()).sum());
    ticks / 100.0
}

/// Prints kernel times at MiniLM's training shape (B=32, T=128, 12 heads x 32) and a SmolLM2-like one
/// (9 query heads, 3 kv heads x 64, causal); run with --ignored --nocapture.
#[test]
#[ignore]
fn attention_timing() {
    let dev = dev();
    let shapes = [
        ("minilm", case(32, 128, 128, 12, 12, 32, true, false)),
        ("smollm2", case(4, 256, 256, 9, 3, 64, false, true)),
    ];
    for (label, c) in shapes {
        let Dims { b, t, nh, hs, .. } = c.d;
        let x = inputs(&c, 900);
        let g = gpu_forward(&c, &x, Variant::for_device(dev));
        let dq = dev.empty(&g.q.shape, DType::F32).unwrap();
        let dk = dev.empty(&g.k.shape, DType::F32).unwrap();
        let dv = dev.empty(&g.k.shape, DType::F32).unwrap();
        let delta = dev.empty(&[b, nh, t], DType::F32).unwrap();
        let dout = up(dev, &x.dout, &g.q.shape);
        let sc = scale(&c.d);
        let m = g.mask.as_ref();
        let fwd = attention_forward(dev, &g.out, &g.lse, &g.q, &g.k, &g.v, m, c.causal, sc).unwrap();
        let bwd =
            attention_backward(dev, &dq, &dk, &dv, &delta, &dout, &g.q, &g.k, &g.v, &g.out, &g.lse, m, c.causal, sc)
                .unwrap();
        // Matmul flops per visible (query, key) pair and head element: 2 x 2 for the forward, 2 x 5 for the
        // backward (score recompute, dP, dQ, dK, dV), of which the dQ kernel does 3 and the dK/dV kernel 4 (both
        // recompute scores and dP). Pairs hidden by the causal rule are not counted.
        let s = c.d.s;
        let pairs: usize = (0..t).map(|q| if c.causal { (q + 1 + s).saturating_sub(t).min(s) } else { s }).sum();
        let flops = 2.0 * (b * nh * pairs * hs) as f64;
        let parts = [
            ("forward", &fwd[..], 2.0 * flops),
            ("backward", &bwd[..], 5.0 * flops),
            ("backward dq", &bwd[..1], 3.0 * flops),
            ("backward dk/dv", &bwd[1..], 4.0 * flops),
        ];
        for (name, ds, f) in parts {
            dev.run(ds).unwrap();
            let reps = 5;
            let start = std::time::Instant::now();
            let cpu0 = cpu_seconds();
            for _ in 0..reps {
                dev.run(ds).unwrap();
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            let cpu = (cpu_seconds() - cpu0) / reps as f64;
            println!(
                "{label} {name}: {:.2} ms, {:.1} GFLOP/s; {:.2} CPU-ms, {:.1} GFLOP per CPU-second",
                secs * 1e3,
                f / secs / 1e9,
                cpu * 1e3,
                f / cpu / 1e9
            );
        }
    }
}

// Devices without SUBGROUP get the plain specialization: it must validate without subgroup support.
#[test]
fn attention_plain_specialization_needs_no_subgroups() {
    use rime_kernels::shaders::source_with_prelude;
    let plain: Vec<_> = specs().into_iter().filter(|(_, s)| !s.prelude.contains("subgroupBroadcast")).collect();
    assert!(!plain.is_empty());
    for (file, spec) in plain {
        let src = source_with_prelude(file, &spec.prelude).unwrap();
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let caps = naga::valid::Capabilities::all() - naga::valid::Capabilities::SUBGROUP;
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{file} ({spec:?}): {e:?}"));
    }
}

/// The sliding window (Gemma 3's local layers): GPU plain kernels against the windowed reference, forward and
/// backward, including T < S (a prompt chunk after a cached prefix), padding, GQA and head size 256.
#[test]
fn attention_sliding_window_matches_reference() {
    let cases = [
        (case(1, 17, 17, 4, 2, 32, false, true), 4),
        (case(2, 33, 33, 2, 1, 16, true, true), 7),
        (case(1, 5, 19, 2, 1, 8, true, true), 6), // chunk after a cached prefix
        (case(1, 9, 9, 4, 1, 256, false, true), 3),
        (case(1, 6, 6, 2, 2, 8, false, true), 1), // each query sees only itself
    ];
    for (i, (c, w)) in cases.iter().enumerate() {
        let (c, w) = (*c, *w);
        let x = inputs(&c, 700 + i as u64);
        let dev = dev();
        let d = c.d;
        let (qs, ks) = ([d.b, d.t, d.nh, d.hs], [d.b, d.s, d.nkv, d.hs]);
        let (q, k, v) = (up(dev, &x.q, &qs), up(dev, &x.k, &ks), up(dev, &x.v, &ks));
        let mask = x.mask.as_ref().map(|m| up(dev, m, &[d.b, d.s]));
        let out = dev.empty(&qs, DType::F32).unwrap();
        let lse = dev.empty(&[d.b, d.nh, d.t], DType::F32).unwrap();
        let sc = scale(&d);
        dev.run(&attention_forward_window(dev, &out, &lse, &q, &k, &v, mask.as_ref(), true, sc, w).unwrap()).unwrap();
        let (wo, wl) = r::attention_forward_window(&d, &x.q, &x.k, &x.v, x.mask.as_deref(), true, sc, w);
        let what = format!("{c:?} window {w}");
        assert_close(&format!("out {what}"), &dev.download_f32(&out).unwrap(), &wo, FWD_ATOL, FWD_RTOL);
        assert_lse(&what, &dev.download_f32(&lse).unwrap(), &wl);
        let (dq, dk, dv) = (
            dev.empty(&qs, DType::F32).unwrap(),
            dev.empty(&ks, DType::F32).unwrap(),
            dev.empty(&ks, DType::F32).unwrap(),
        );
        let delta = dev.empty(&[d.b, d.nh, d.t], DType::F32).unwrap();
        let dout = up(dev, &x.dout, &qs);
        let ds = attention_backward_window(
            dev,
            &dq,
            &dk,
            &dv,
            &delta,
            &dout,
            &q,
            &k,
            &v,
            &out,
            &lse,
            mask.as_ref(),
            true,
            sc,
            w,
        )
        .unwrap();
        dev.run(&ds).unwrap();
        let (gq, gk, gv) = r::attention_backward_window(&d, &x.dout, &x.q, &x.k, &x.v, x.mask.as_deref(), true, sc, w);
        assert_close(&format!("dq {what}"), &dev.download_f32(&dq).unwrap(), &gq, BWD_ATOL, BWD_RTOL);
        assert_close(&format!("dk {what}"), &dev.download_f32(&dk).unwrap(), &gk, BWD_ATOL, BWD_RTOL);
        assert_close(&format!("dv {what}"), &dev.download_f32(&dv).unwrap(), &gv, BWD_ATOL, BWD_RTOL);
    }
}

/// The windowed reference checked independently: a window of at least S keys is plain causal attention, and a
/// window of 1 returns each query's own value row.
#[test]
fn attention_window_reference_limits() {
    let c = case(1, 7, 7, 2, 1, 8, false, true);
    let x = inputs(&c, 800);
    let sc = scale(&c.d);
    let (full, _) = r::attention_forward(&c.d, &x.q, &x.k, &x.v, None, true, sc);
    let (wide, _) = r::attention_forward_window(&c.d, &x.q, &x.k, &x.v, None, true, sc, 7);
    assert_eq!(full, wide);
    let (one, _) = r::attention_forward_window(&c.d, &x.q, &x.k, &x.v, None, true, sc, 1);
    let d = c.d;
    for t in 0..d.t {
        for h in 0..d.nh {
            for e in 0..d.hs {
                let got = one[(t * d.nh + h) * d.hs + e];
                let want = x.v[(t * d.nkv + h / (d.nh / d.nkv)) * d.hs + e];
                assert!((got - want).abs() < 1e-6, "t {t} h {h} e {e}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn attention_window_needs_causal_and_plain_variant() {
    let dev = dev();
    let q = dev.zeros(&[1, 4, 1, 8], DType::F32).unwrap();
    let lse = dev.empty(&[1, 1, 4], DType::F32).unwrap();
    let out = dev.empty(&[1, 4, 1, 8], DType::F32).unwrap();
    let e = attention_forward_window(dev, &out, &lse, &q, &q, &q, None, false, 1.0, 2).err().unwrap().to_string();
    assert!(e.contains("needs causal"), "{e}");
    let q = dev.zeros(&[1, 4, 1, 256], DType::F32).unwrap();
    let out = dev.empty(&[1, 4, 1, 256], DType::F32).unwrap();
    let e = attention_forward_variant(dev, Variant::Subgroup, &out, &lse, &q, &q, &q, None, true, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("plain variant"), "{e}");
}

/// The windowed backward against central differences of the windowed CPU forward (L = sum(out · dout)).
#[test]
fn attention_window_backward_matches_finite_differences() {
    let c = case(1, 6, 6, 2, 1, 8, false, true);
    let w = 3;
    let x = inputs(&c, 900);
    let dev = dev();
    let d = c.d;
    let (qs, ks) = ([d.b, d.t, d.nh, d.hs], [d.b, d.s, d.nkv, d.hs]);
    let (q, k, v) = (up(dev, &x.q, &qs), up(dev, &x.k, &ks), up(dev, &x.v, &ks));
    let out = dev.empty(&qs, DType::F32).unwrap();
    let lse = dev.empty(&[d.b, d.nh, d.t], DType::F32).unwrap();
    let sc = scale(&d);
    dev.run(&attention_forward_window(dev, &out, &lse, &q, &k, &v, None, true, sc, w).unwrap()).unwrap();
    let (dq, dk, dv) =
        (dev.empty(&qs, DType::F32).unwrap(), dev.empty(&ks, DType::F32).unwrap(), dev.empty(&ks, DType::F32).unwrap());
    let delta = dev.empty(&[d.b, d.nh, d.t], DType::F32).unwrap();
    let dout = up(dev, &x.dout, &qs);
    let ds = attention_backward_window(dev, &dq, &dk, &dv, &delta, &dout, &q, &k, &v, &out, &lse, None, true, sc, w)
        .unwrap();
    dev.run(&ds).unwrap();
    let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        let (o, _) = r::attention_forward_window(&d, q, k, v, None, true, sc, w);
        o.iter().zip(&x.dout).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let eps = 1e-2;
    let fq = finite_diff(&x.q, eps, |q| loss(q, &x.k, &x.v));
    let fk = finite_diff(&x.k, eps, |k| loss(&x.q, k, &x.v));
    let fv = finite_diff(&x.v, eps, |v| loss(&x.q, &x.k, v));
    assert_close("dq vs fd (window)", &dev.download_f32(&dq).unwrap(), &fq, 2e-3, 1e-2);
    assert_close("dk vs fd (window)", &dev.download_f32(&dk).unwrap(), &fk, 2e-3, 1e-2);
    assert_close("dv vs fd (window)", &dev.download_f32(&dv).unwrap(), &fv, 2e-3, 1e-2);
}
