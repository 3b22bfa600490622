//! `rime::kernels` (the accelerator-backend calls) against the plain-Rust references.

use rime::kernels::{self, reference};

use crate::common::*;

#[test]
fn matmul_forward_matches_the_reference() {
    let g = gpu();
    for &(batch, m, k, n, ta, tb, bias) in
        &[(1, 7, 13, 5, false, true, true), (3, 33, 17, 9, false, false, false), (2, 8, 40, 12, true, true, true)]
    {
        let a = rnd(batch * m * k, 1);
        let b = rnd(k * n, 2);
        let c = rnd(n, 3);
        let a_shape = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
        let b_shape = if tb { vec![n, k] } else { vec![k, n] };
        let bt = g.upload(&c, &[n]).unwrap();
        let out = kernels::matmul_forward(
            g,
            &g.upload(&a, &a_shape).unwrap(),
            &g.upload(&b, &b_shape).unwrap(),
            bias.then_some(&bt),
            ta,
            tb,
        )
        .unwrap();
        assert_eq!(out.shape, vec![batch, m, n]);
        let d = reference::matmul::MatmulDims { batch, m, k, n, b_batched: false, trans_a: ta, trans_b: tb };
        let want = reference::matmul::matmul_forward(&a, &b, bias.then_some(&c[..]), &d);
        let diff = max_diff(&g.download(&out).unwrap(), &want);
        assert!(diff < 1e-4, "matmul {batch}x{m}x{k}x{n} ta {ta} tb {tb}: diff {diff}");
    }
}

#[test]
fn attention_forward_matches_the_reference() {
    let g = gpu();
    // Grouped-query attention with a padding mask: 4 query heads over 2 kv heads.
    let (b, t, nh, nkv, hs) = (2, 9, 4, 2, 16);
    let q = rnd(b * t * nh * hs, 4);
    let k = rnd(b * t * nkv * hs, 5);
    let v = rnd(b * t * nkv * hs, 6);
    let mut mask = vec![1.0f32; b * t];
    mask[t + 7..2 * t].iter_mut().for_each(|x| *x = 0.0);
    let scale = 0.25;
    let (out, lse) = kernels::attention_forward(
        g,
        &g.upload(&q, &[b, t, nh, hs]).unwrap(),
        &g.upload(&k, &[b, t, nkv, hs]).unwrap(),
        &g.upload(&v, &[b, t, nkv, hs]).unwrap(),
        Some(&g.upload(&mask, &[b, t]).unwrap()),
        true,
        scale,
    )
    .unwrap();
    let d = reference::attention::Dims { b, t, s: t, nh, nkv, hs };
    let (want, want_lse) = reference::attention::attention_forward(&d, &q, &k, &v, Some(&mask), true, scale);
    assert!(max_diff(&g.download(&out).unwrap(), &want) < 1e-5);
    assert!(max_diff(&g.download(&lse).unwrap(), &want_lse) < 1e-5);
}

#[test]
fn merge_kernels_match_the_reference() {
    let g = gpu();
    let (n, l) = (3, 1000);
    let xs = rnd(n * l, 7);
    let w = [0.5f32, 0.3, 0.2];
    let out = kernels::merge_weighted_sum_forward(g, &g.upload(&xs, &[n, l]).unwrap(), &w).unwrap();
    let mut want = vec![0.0; l];
    reference::merge::merge_weighted_sum_forward(&mut want, &xs, &w);
    assert!(max_diff(&g.download(&out).unwrap(), &want) < 1e-6);

    let (a, b) = (rnd(l, 8), rnd(l, 9));
    let out = kernels::merge_slerp_forward(g, &g.upload(&a, &[l]).unwrap(), &g.upload(&b, &[l]).unwrap(), 0.3).unwrap();
    let mut want = vec![0.0; l];
    reference::merge::merge_slerp_forward(&mut want, &a, &b, 0.3);
    assert!(max_diff(&g.download(&out).unwrap(), &want) < 1e-5);
}
