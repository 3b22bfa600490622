mod common;
use common::*;
use rime_kernels::{ops::optim::*, reference::optim as r, DType, Device, Tensor};

/// hyper for AdamW step t (1-based), as the executor writes it.
fn adam_hyper(lr: f32, b1: f32, b2: f32, eps: f32, wd: f32, t: i32, scale: f32) -> Vec<f32> {
    let bc1 = (1.0 - (b1 as f64).powi(t)) as f32;
    let bc2 = (1.0 - (b2 as f64).powi(t)) as f32;
    vec![lr, b1, b2, eps, wd, bc1, bc2, scale]
}

fn up(d: &Device, x: &[f32]) -> Tensor {
    d.upload_f32(x, &[x.len()]).unwrap()
}

#[test]
fn adamw_update_matches_reference() {
    let d = dev();
    for &n in &[1usize, 3, 17, 127, 4096 + 5] {
        let mut p = randn(n as u64, n, 1.0);
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let (gp, gm, gv) = (up(d, &p), up(d, &m), up(d, &v));
        let hyper = d.zeros(&[8], DType::F32).unwrap();
        let grad = d.empty(&[n], DType::F32).unwrap();
        let ds = adamw_update(d, &gp, &grad, &gm, &gv, &hyper).unwrap();
        for t in 1..=5 {
            let g = randn(1000 + t as u64, n, 2.0);
            let h = adam_hyper(1e-2, 0.9, 0.999, 1e-8, 0.01, t, 1.0);
            d.write_f32(&grad, &g).unwrap();
            d.write_f32(&hyper, &h).unwrap();
            d.run(&ds).unwrap(); // the same recorded dispatch replays every step
            r::adamw_update(&mut p, &g, &mut m, &mut v, &h);
        }
        assert_close("adamw param", &d.download_f32(&gp).unwrap(), &p, 1e-6, 1e-5);
        assert_close("adamw m", &d.download_f32(&gm).unwrap(), &m, 1e-6, 1e-5);
        assert_close("adamw v", &d.download_f32(&gv).unwrap(), &v, 1e-7, 1e-5);
    }
}

#[test]
fn adamw_update_matches_hand_derived_values() {
    // p=1, g=0.5, lr=0.1, wd=0.1. Step 1: p *= 0.99; m=0.05, v=2.5e-4, m/bc1=0.5, sqrt(v/bc2)=0.5, so
    // p = 0.99 - 0.1*0.5/(0.5+1e-8) = 0.89. Step 2 (same g): bias correction again gives m̂=0.5, v̂=0.25,
    // p = 0.89*0.99 - 0.1 = 0.7811; m = 0.095, v = 4.9975e-4.
    let d = dev();
    let (p, g, m, v) = (up(d, &[1.0]), up(d, &[0.5]), up(d, &[0.0]), up(d, &[0.0]));
    let hyper = d.zeros(&[8], DType::F32).unwrap();
    let ds = adamw_update(d, &p, &g, &m, &v, &hyper).unwrap();
    d.write_f32(&hyper, &adam_hyper(0.1, 0.9, 0.999, 1e-8, 0.1, 1, 1.0)).unwrap();
    d.run(&ds).unwrap();
    assert_close("step 1 param", &d.download_f32(&p).unwrap(), &[0.89], 1e-6, 0.0);
    d.write_f32(&hyper, &adam_hyper(0.1, 0.9, 0.999, 1e-8, 0.1, 2, 1.0)).unwrap();
    d.run(&ds).unwrap();
    assert_close("step 2 param", &d.download_f32(&p).unwrap(), &[0.7811], 1e-6, 0.0);
    assert_close("step 2 m", &d.download_f32(&m).unwrap(), &[0.095], 1e-7, 0.0);
    // 1 - beta2 is formed from the f32 beta2 (0.999f32 is 0.99900001287), so v carries a 1.3e-5 relative
    // offset from the decimal value; torch forms 1 - beta2 in f64 and lands on 0.001.
    assert_close("step 2 v", &d.download_f32(&v).unwrap(), &[4.9975e-4], 0.0, 2e-5);
}

#[test]
fn adamw_weight_decay_is_decoupled() {
    // With a zero gradient the moments stay zero, the Adam term is 0/(0+eps) = 0, and only the decoupled decay
    // acts: p *= (1 - lr*wd) per step.
    let d = dev();
    let x = randn(3, 17, 1.0);
    let (p, g, m, v) = (up(d, &x), up(d, &[0.0; 17]), up(d, &[0.0; 17]), up(d, &[0.0; 17]));
    let hyper = up(d, &adam_hyper(0.5, 0.9, 0.999, 1e-8, 0.2, 1, 1.0));
    let ds = adamw_update(d, &p, &g, &m, &v, &hyper).unwrap();
    d.run(&ds).unwrap();
    d.run(&ds).unwrap();
    let want: Vec<f32> = x.iter().map(|&a| a * 0.9 * 0.9).collect();
    assert_close("decayed param", &d.download_f32(&p).unwrap(), &want, 1e-7, 1e-6);
}

#[test]
fn sgd_update_matches_reference() {
    let d = dev();
    for &n in &[1usize, 3, 17, 127, 1000] {
        let mut p = randn(n as u64 + 7, n, 1.0);
        let mut buf = vec![0.0; n];
        let (gp, gb) = (up(d, &p), up(d, &buf));
        let grad = d.empty(&[n], DType::F32).unwrap();
        let hyper = up(d, &[0.05, 0.9, 0.0, 0.0, 0.01, 0.0, 0.0, 0.5]);
        let ds = sgd_update(d, &gp, &grad, &gb, &hyper).unwrap();
        for t in 0..4 {
            let g = randn(50 + t, n, 1.0);
            d.write_f32(&grad, &g).unwrap();
            d.run(&ds).unwrap();
            r::sgd_update(&mut p, &g, &mut buf, &[0.05, 0.9, 0.0, 0.0, 0.01, 0.0, 0.0, 0.5]);
        }
        assert_close("sgd param", &d.download_f32(&gp).unwrap(), &p, 1e-6, 1e-5);
        assert_close("sgd buf", &d.download_f32(&gb).unwrap(), &buf, 1e-6, 1e-5);
    }
    // Hand value: p=1, g=1, lr=0.1, momentum 0.9, wd 0: buf=1, p=0.9; then buf=1.9, p=0.71.
    let (p, g, b) = (up(d, &[1.0]), up(d, &[1.0]), up(d, &[0.0]));
    let hyper = up(d, &[0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
    let ds = sgd_update(d, &p, &g, &b, &hyper).unwrap();
    d.run(&ds).unwrap();
    d.run(&ds).unwrap();
    assert_close("sgd hand", &d.download_f32(&p).unwrap(), &[0.71], 1e-6, 0.0);
}

#[test]
fn grad_sumsq_matches_reference() {
    let d = dev();
    let acc = d.zeros(&[1], DType::F32).unwrap();
    // 300_000 > 4096 partials * 64, so each first-stage invocation strides over several elements.
    for &n in &[1usize, 3, 17, 127, 5000, 300_000] {
        let g = randn(n as u64 + 11, n, 1.0);
        let gg = up(d, &g);
        d.run(&grad_sumsq_forward(d, &acc, &gg, false).unwrap()).unwrap();
        let got = d.download_f32(&acc).unwrap();
        let mut want = [0.0f32];
        r::grad_sumsq_forward(&mut want, &g, false);
        assert_close("sumsq", &got, &want, 1e-6, 1e-5);
        // Deterministic: the same input gives the same bits.
        d.run(&grad_sumsq_forward(d, &acc, &gg, false).unwrap()).unwrap();
        assert_eq!(got[0].to_bits(), d.download_f32(&acc).unwrap()[0].to_bits(), "sumsq n={n} not deterministic");
        // Accumulating adds to what acc holds.
        d.run(&grad_sumsq_forward(d, &acc, &gg, true).unwrap()).unwrap();
        assert_close("sumsq accumulated", &d.download_f32(&acc).unwrap(), &[2.0 * want[0]], 1e-6, 1e-5);
    }
}

#[test]
fn clip_then_adamw_matches_reference_end_to_end() {
    let d = dev();
    let sizes = [17usize, 300, 5];
    for &max_norm in &[0.5f32, 1e6] {
        let mut ps: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| randn(i as u64, n, 1.0)).collect();
        let gs: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| randn(100 + i as u64, n, 1.0)).collect();
        let mut ms: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut vs = ms.clone();
        let gp: Vec<Tensor> = ps.iter().map(|x| up(d, x)).collect();
        let gg: Vec<Tensor> = gs.iter().map(|x| up(d, x)).collect();
        let gm: Vec<Tensor> = ms.iter().map(|x| up(d, x)).collect();
        let gv: Vec<Tensor> = vs.iter().map(|x| up(d, x)).collect();
        let acc = d.empty(&[1], DType::F32).unwrap();
        let mut h = adam_hyper(1e-2, 0.9, 0.999, 1e-8, 0.01, 1, 1.0);
        let hyper = up(d, &h);
        let mut ds = Vec::new();
        for (i, g) in gg.iter().enumerate() {
            ds.extend(grad_sumsq_forward(d, &acc, g, i > 0).unwrap());
        }
        ds.extend(clip_scale_forward(d, &hyper, &acc, max_norm).unwrap());
        for i in 0..3 {
            ds.extend(adamw_update(d, &gp[i], &gg[i], &gm[i], &gv[i], &hyper).unwrap());
        }
        d.run(&ds).unwrap();

        let mut racc = [0.0f32];
        for (i, g) in gs.iter().enumerate() {
            r::grad_sumsq_forward(&mut racc, g, i > 0);
        }
        r::clip_scale_forward(&mut h, &racc, max_norm);
        // torch: total_norm = ||grads||, coef = max_norm / (total_norm + 1e-6) clamped at 1.
        let total: f64 = gs.iter().flatten().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
        let torch_coef = (max_norm as f64 / (total + 1e-6)).min(1.0) as f32;
        assert_close("clip coefficient vs torch formula", &[h[7]], &[torch_coef], 0.0, 1e-6);
        assert_close("acc", &d.download_f32(&acc).unwrap(), &racc, 1e-5, 1e-5);
        assert_close("hyper after clip", &d.download_f32(&hyper).unwrap(), &h, 0.0, 1e-6);
        if max_norm > 1e5 {
            assert_eq!(h[7], 1.0, "no clipping below max_norm");
        } else {
            assert!(h[7] < 1.0);
        }
        for i in 0..3 {
            r::adamw_update(&mut ps[i], &gs[i], &mut ms[i], &mut vs[i], &h);
            assert_close("clipped adamw param", &d.download_f32(&gp[i]).unwrap(), &ps[i], 1e-6, 1e-5);
            assert_close("clipped adamw m", &d.download_f32(&gm[i]).unwrap(), &ms[i], 1e-6, 1e-5);
        }
    }
}

#[test]
fn optim_rejects_bad_shapes() {
    let d = dev();
    let a = d.empty(&[4], DType::F32).unwrap();
    let b = d.empty(&[5], DType::F32).unwrap();
    let h = d.empty(&[8], DType::F32).unwrap();
    let h7 = d.empty(&[7], DType::F32).unwrap();
    let e = adamw_update(d, &a, &b, &a.clone(), &a.clone(), &h).err().unwrap().to_string();
    assert!(e.contains("adamw_update") && e.contains("[5]"), "{e}");
    let e = adamw_update(d, &a, &a.clone(), &a.clone(), &a.clone(), &h7).err().unwrap().to_string();
    assert!(e.contains("hyper"), "{e}");
    assert!(sgd_update(d, &a, &b, &a.clone(), &h).is_err());
    let e = grad_sumsq_forward(d, &a, &b, false).err().unwrap().to_string();
    assert!(e.contains("acc"), "{e}");
    assert!(clip_scale_forward(d, &h, &a, 1.0).is_err());
    assert!(clip_scale_forward(d, &h, &d.empty(&[1], DType::F32).unwrap(), -1.0).is_err());
    let f16 = d.empty(&[4], DType::F16).unwrap();
    assert!(adamw_update(d, &a, &f16, &a.clone(), &a.clone(), &h).is_err());
}
