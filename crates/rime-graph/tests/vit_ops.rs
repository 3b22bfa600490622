//! The ops a ViT adds: the patch embedding (patch_unfold + matmul) against a CPU convolution and finite
//! differences, and LayerScale (a learned [C] multiply) through `mul`'s row broadcast.

mod common;
use common::{check_grads, dev, rnd};

use rime_graph::{Executor, Graph, OptimConfig, ParamStore};
use rime_kernels::DType;

/// Conv2d(c, oc, kernel = stride = p) on the CPU, out [b, (h/p)·(w/p), oc] (patch-major like ViT's tokens).
#[allow(clippy::too_many_arguments)]
fn conv_patches(x: &[f32], wt: &[f32], bias: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let oc = bias.len();
    let (hp, wp) = (h / p, w / p);
    let mut out = Vec::new();
    for bi in 0..b {
        for py in 0..hp {
            for px in 0..wp {
                for o in 0..oc {
                    let mut s = bias[o] as f64;
                    for ch in 0..c {
                        for dy in 0..p {
                            for dx in 0..p {
                                let xv = x[((bi * c + ch) * h + py * p + dy) * w + px * p + dx] as f64;
                                s += xv * wt[((o * c + ch) * p + dy) * p + dx] as f64;
                            }
                        }
                    }
                    out.push(s as f32);
                }
            }
        }
    }
    out
}

#[test]
fn patch_embed_equals_a_direct_convolution() {
    let d = dev();
    for &(b, c, h, w, p, oc) in &[(2, 3, 8, 8, 4, 5), (1, 3, 11, 9, 3, 7), (3, 1, 5, 7, 2, 2), (1, 4, 16, 16, 16, 3)] {
        let (x, wt, bias) = (rnd(1, b * c * h * w, 1.0), rnd(2, oc * c * p * p, 0.5), rnd(3, oc, 0.5));
        let mut store = ParamStore::new();
        store.add_f32(d, "patch.weight", &wt, &[oc, c, p, p], false).unwrap();
        store.add_f32(d, "patch.bias", &bias, &[oc], false).unwrap();
        let mut g = Graph::new();
        let xv = g.input("pixels", &[b, c, h, w], DType::F32);
        let (wv, bv) = (g.param(&store, "patch.weight").unwrap(), g.param(&store, "patch.bias").unwrap());
        let y = g.patch_embed(xv, wv, Some(bv), p).unwrap();
        assert_eq!(g.shape(y), [b, (h / p) * (w / p), oc]);
        let mut ex = Executor::new(d, g, &store, None, &[y], None).unwrap();
        ex.feed_f32(d, "pixels", &x).unwrap();
        ex.forward(d).unwrap();
        let (got, want) = (ex.read(d, y).unwrap(), conv_patches(&x, &wt, &bias, b, c, h, w, p));
        assert_eq!(got.len(), want.len());
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            assert!((a - e).abs() <= 1e-4 * (1.0 + e.abs()), "{b}x{c}x{h}x{w} p={p}: [{i}] {a} vs conv {e}");
        }
    }
}

#[test]
fn patch_embed_gradients_match_finite_differences() {
    let d = dev();
    // H = 7 with p = 3: the last row is a border Conv2d drops, so its gradient must be exactly zero.
    let (b, c, h, w, p, oc) = (2, 3, 7, 6, 3, 4);
    let n = b * (h / p) * (w / p);
    let mut store = ParamStore::new();
    store.add_f32(d, "x", &rnd(4, b * c * h * w, 1.0), &[b, c, h, w], true).unwrap();
    store.add_f32(d, "patch.weight", &rnd(5, oc * c * p * p, 0.5), &[oc, c, p, p], true).unwrap();
    store.add_f32(d, "patch.bias", &rnd(6, oc, 0.5), &[oc], true).unwrap();
    let mut g = Graph::new();
    let (xv, wv, bv) = (
        g.param(&store, "x").unwrap(),
        g.param(&store, "patch.weight").unwrap(),
        g.param(&store, "patch.bias").unwrap(),
    );
    let y = g.patch_embed(xv, wv, Some(bv), p).unwrap();
    let act = g.gelu(y, false);
    let logits = g.reshape(act, &[n, oc]).unwrap();
    let targets = g.input("targets", &[n], DType::I32);
    let loss = g.cross_entropy(logits, targets, -100).unwrap();
    let mut ex = Executor::new(d, g, &store, Some(loss), &[], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_i32(d, "targets", &[0, 3, 1, 2, 2, 1, 0, 3]).unwrap();
    check_grads(&mut ex, &store, loss, 12, 7);
    let dx = ex.read_param_grad(d, store.id("x").unwrap()).unwrap();
    for (i, v) in dx.iter().enumerate() {
        let row = (i / w) % h;
        if row >= (h / p) * p {
            assert_eq!(*v, 0.0, "dropped border element {i} has gradient {v}");
        } else {
            assert!(v.is_finite());
        }
    }
    assert!(dx.iter().any(|v| *v != 0.0));
}

/// LayerScale: y = h · gamma with gamma [C] learned, broadcast over [B, T, C] by `mul`; gamma's gradient is
/// the row sum of dout · h, checked against finite differences and against that sum computed on the CPU.
#[test]
fn layer_scale_gradient_reaches_the_per_channel_vector() {
    let d = dev();
    let (b, t, c) = (2, 3, 5);
    let x = rnd(7, b * t * c, 1.0);
    let mut store = ParamStore::new();
    store.add_f32(d, "ls.gamma", &rnd(8, c, 1.0), &[c], true).unwrap();
    store.add_f32(d, "w", &rnd(9, c * c, 0.5), &[c, c], true).unwrap();
    let mut g = Graph::new();
    let xv = g.input("x", &[b, t, c], DType::F32);
    let (gamma, wv) = (g.param(&store, "ls.gamma").unwrap(), g.param(&store, "w").unwrap());
    let h = g.linear(xv, wv, None).unwrap();
    let scaled = g.mul(h, gamma).unwrap();
    let logits = g.reshape(scaled, &[b * t, c]).unwrap();
    let targets = g.input("targets", &[b * t], DType::I32);
    let loss = g.cross_entropy(logits, targets, -100).unwrap();
    let mut ex = Executor::new(d, g, &store, Some(loss), &[h, logits], Some(OptimConfig::adamw(1e-2, 0.0))).unwrap();
    ex.feed_f32(d, "x", &x).unwrap();
    ex.feed_i32(d, "targets", &[1, 4, 0, 2, 3, -100]).unwrap();
    check_grads(&mut ex, &store, loss, 5, 7);
    // d loss / d logits of a mean cross-entropy over the 5 counted rows: (softmax - onehot) / 5.
    ex.backward_only(d).unwrap();
    let (hv, lv) = (ex.read(d, h).unwrap(), ex.read(d, logits).unwrap());
    let tg = [1, 4, 0, 2, 3, -100];
    let mut want = vec![0f64; c];
    for (r, &tr) in tg.iter().enumerate() {
        if tr < 0 {
            continue;
        }
        let row = &lv[r * c..(r + 1) * c];
        let m = row.iter().fold(f32::MIN, |a, &v| a.max(v));
        let z: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        for k in 0..c {
            let dl = (((row[k] - m) as f64).exp() / z - if k as i32 == tr { 1.0 } else { 0.0 }) / 5.0;
            want[k] += dl * hv[r * c + k] as f64;
        }
    }
    let got = ex.read_param_grad(d, store.id("ls.gamma").unwrap()).unwrap();
    for k in 0..c {
        assert!((got[k] as f64 - want[k]).abs() <= 1e-5, "dgamma[{k}] {} vs {}", got[k], want[k]);
    }
}

#[test]
fn patch_ops_reject_bad_shapes() {
    let d = dev();
    let mut store = ParamStore::new();
    store.add_f32(d, "w", &[0.0; 24], &[2, 3, 2, 2], false).unwrap();
    let mut g = Graph::new();
    let flat = g.input("flat", &[2, 48], DType::F32);
    let e = g.patch_unfold(flat, 4).unwrap_err().to_string();
    assert!(e.contains("patch_unfold") && e.contains("[2, 48]"), "{e}");
    let img = g.input("img", &[1, 3, 4, 4], DType::F32);
    assert!(g.patch_unfold(img, 5).unwrap_err().to_string().contains("patch size 5"));
    let w = g.param(&store, "w").unwrap();
    let e = g.patch_embed(img, w, None, 4).unwrap_err().to_string();
    assert!(e.contains("patch_embed") && e.contains("[OC, 3, 4, 4]"), "{e}");
}
