//! A quantized weight held as a [`DType::Q`] tensor ([`QTensor::to_tensor`]) through the launchers a model
//! graph calls: `matmul_forward` / `matmul_backward_input` (PyTorch's linear and its input gradient),
//! `lora_forward` / `lora_backward_input` (LoRA on a quantized base weight: QLoRA) and `embedding_forward`,
//! each against the plain-Rust reference on the dequantized weight, for every block type, at few rows (the
//! block kernels) and many (the device's dequantization scratch and the f32 matmul); and the products a
//! quantized weight cannot take part in refused with a message.

mod common;
use common::*;
use rime_kernels::ops::{embedding, lora, matmul};
use rime_kernels::reference::{embedding as re, lora as rl, qmatmul as rq};
use rime_kernels::{DType, Device, QTensor, QType, Tensor};

/// A quantized weight [n, k] as the tensor a store holds, and its dequantized values.
fn weight(d: &Device, qtype: QType, n: usize, k: usize, seed: u64) -> (Tensor, Vec<f32>) {
    let bytes = random_blocks(qtype, n, k, seed);
    let w = rq::dequantize(qtype, &bytes, n, k).unwrap();
    let t = QTensor::upload(d, qtype, n, k, &bytes).unwrap().to_tensor();
    assert_eq!((t.dtype, &t.shape[..]), (DType::Q(qtype), &[n, k][..]));
    (t, w)
}

/// Sums of k products in f32 in any order: (k + 4) units of f32 rounding times the sum of magnitudes,
/// relative to the largest output (the products here are random, so a per-output bound is not needed).
fn tol(k: usize, scale: f32) -> f32 {
    (k as f32 + 4.0) * f32::EPSILON * scale
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

#[test]
fn linear_and_its_input_gradient_route_to_the_quantized_kernels() {
    let d = dev();
    let (n, k) = (40, 512);
    for (i, qtype) in QType::ALL.into_iter().enumerate() {
        let (tw, w) = weight(d, qtype, n, k, 10 + i as u64);
        for m in [3, 37] {
            let x = randn(20 + m as u64, m * k, 1.0);
            let bias = randn(30, n, 1.0);
            let tx = d.upload_f32(&x, &[1, m, k]).unwrap();
            let tb = d.upload_f32(&bias, &[n]).unwrap();
            let ty = d.zeros(&[1, m, n], DType::F32).unwrap();
            d.run(&matmul::matmul_forward(d, &ty, &tx, &tw, Some(&tb), false, true).unwrap()).unwrap();
            let want = rq::qmatmul_forward(&x, &w, Some(&bias), None, m, n, k);
            let scale = x.iter().map(|v| v.abs()).sum::<f32>() / m as f32 * max_abs(&w) + max_abs(&bias);
            assert_close(&format!("{qtype} linear m={m}"), &d.download_f32(&ty).unwrap(), &want, tol(k, scale), 0.0);

            let dy = randn(40 + m as u64, m * n, 1.0);
            let tdy = d.upload_f32(&dy, &[1, m, n]).unwrap();
            let tdx = d.zeros(&[1, m, k], DType::F32).unwrap();
            d.run(&matmul::matmul_backward_input(d, &tdx, &tdy, &tw, false, true).unwrap()).unwrap();
            let want = rq::qmatmul_backward_input(&dy, &w, None, m, n, k);
            let scale = dy.iter().map(|v| v.abs()).sum::<f32>() / m as f32 * max_abs(&w);
            assert_close(&format!("{qtype} dx m={m}"), &d.download_f32(&tdx).unwrap(), &want, tol(n, scale), 0.0);
        }
    }
    // m = 37 ran through the shared scratch, sized for the largest weight so far.
    assert!(d.dequant_scratch_bytes() >= (4 * n * k) as u64);
}

/// `matmul_backward_input_accumulate`: the input gradient of a product split into weight parts (an output head
/// split by rows) summed into one dx, for an f32 and a quantized part, at few rows and many (the scratch path).
#[test]
fn input_gradient_accumulates_over_weight_parts() {
    let d = dev();
    let (k, n0, n1) = (256, 24, 40);
    let (tw0, w0) = weight(d, QType::Q8_0, n0, k, 61);
    let w1 = randn(62, n1 * k, 0.5);
    let tw1 = d.upload_f32(&w1, &[n1, k]).unwrap();
    for m in [3, 37] {
        let (dy0, dy1) = (randn(63, m * n0, 1.0), randn(64, m * n1, 1.0));
        let tdx = d.upload_f32(&randn(65, m * k, 9.0), &[m, k]).unwrap();
        let (t0, t1) = (d.upload_f32(&dy0, &[m, n0]).unwrap(), d.upload_f32(&dy1, &[m, n1]).unwrap());
        d.run(&matmul::matmul_backward_input_accumulate(d, &tdx, &t0, &tw0, false, true, false).unwrap()).unwrap();
        d.run(&matmul::matmul_backward_input_accumulate(d, &tdx, &t1, &tw1, false, true, true).unwrap()).unwrap();
        let a = rq::qmatmul_backward_input(&dy0, &w0, None, m, n0, k);
        let b = rq::qmatmul_backward_input(&dy1, &w1, None, m, n1, k);
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_close(
            &format!("dx over two parts m={m}"),
            &d.download_f32(&tdx).unwrap(),
            &want,
            tol(n0 + n1, 40.0),
            0.0,
        );
    }
}

#[test]
fn lora_on_a_quantized_base_weight_matches_the_reference() {
    let d = dev();
    let (m, c, oc, r) = (33, 256, 24, 4);
    let dm = rl::LoraDims { rows: m, c, oc, r };
    for (i, qtype) in [QType::Q4K, QType::Q8_0, QType::Q4_1].into_iter().enumerate() {
        let (tw, w) = weight(d, qtype, oc, c, 50 + i as u64);
        let (x, a, b, bias) = (randn(1, m * c, 1.0), randn(2, r * c, 0.1), randn(3, oc * r, 0.1), randn(4, oc, 1.0));
        let tx = d.upload_f32(&x, &[m, c]).unwrap();
        let (ta, tb, tbias) = (
            d.upload_f32(&a, &[r, c]).unwrap(),
            d.upload_f32(&b, &[oc, r]).unwrap(),
            d.upload_f32(&bias, &[oc]).unwrap(),
        );
        let (out, h) = (d.zeros(&[m, oc], DType::F32).unwrap(), d.zeros(&[m, r], DType::F32).unwrap());
        d.run(&lora::lora_forward(d, &out, &h, &tx, &tw, Some(&tbias), &ta, &tb, 0.75).unwrap()).unwrap();
        let (want, _) = rl::lora_forward(&x, &w, Some(&bias), &a, &b, 0.75, &dm);
        let scale = x.iter().map(|v| v.abs()).sum::<f32>() / m as f32 * max_abs(&w) + max_abs(&bias);
        assert_close(&format!("{qtype} lora forward"), &d.download_f32(&out).unwrap(), &want, tol(c, scale), 0.0);

        let dout = randn(5, m * oc, 1.0);
        let tdout = d.upload_f32(&dout, &[m, oc]).unwrap();
        let (dx, dh) = (d.zeros(&[m, c], DType::F32).unwrap(), d.zeros(&[m, r], DType::F32).unwrap());
        d.run(&lora::lora_backward_input(d, &dx, &dh, &tdout, &tw, &ta, &tb, 0.5).unwrap()).unwrap();
        let want = rl::lora_backward_input(&dout, &w, &a, &b, 0.5, &dm);
        let scale = dout.iter().map(|v| v.abs()).sum::<f32>() / m as f32 * max_abs(&w);
        assert_close(&format!("{qtype} lora dx"), &d.download_f32(&dx).unwrap(), &want, tol(oc, scale), 0.0);
    }
}

#[test]
fn embedding_lookup_in_a_quantized_table_is_exact() {
    let d = dev();
    let (v, c) = (50, 512);
    for (i, qtype) in QType::ALL.into_iter().enumerate() {
        let (tw, w) = weight(d, qtype, v, c, 70 + i as u64);
        // The last id is outside the table: a zero row, as for an f32 table.
        let ids: Vec<u32> = vec![3, 49, 0, 3, 17, 50];
        let tids = d.upload_u32(&ids, &[2, 3]).unwrap();
        let out = d.zeros(&[ids.len(), c], DType::F32).unwrap();
        d.run(&embedding::embedding_forward(d, &out, &tids, &tw).unwrap()).unwrap();
        let mut want = re::embedding_forward(&ids[..5], &w, c);
        want.extend(vec![0.0; c]);
        // Dequantization is the reference's f32 operations, so the rows are bitwise equal, except where the
        // shader fuses d·q + m into one multiply-add (Q4_1, Q4_K): within two f32 roundings of the largest value.
        let got = d.download_f32(&out).unwrap();
        // The same table as the row part 100..150 of a larger vocabulary: ids outside it give zero rows.
        let shifted: Vec<u32> = vec![103, 149, 100, 99, 117, 150];
        let tsh = d.upload_u32(&shifted, &[6]).unwrap();
        let out2 = d.zeros(&[ids.len(), c], DType::F32).unwrap();
        d.run(&embedding::embedding_forward_offset(d, &out2, &tsh, &tw, 100).unwrap()).unwrap();
        let got2 = d.download_f32(&out2).unwrap();
        for (r, (&a, &b)) in ids.iter().zip(&shifted).enumerate() {
            let row = &got2[r * c..(r + 1) * c];
            if (100..150).contains(&b) {
                assert_eq!(row, &got[r * c..(r + 1) * c], "{qtype}: id {b} at offset 100 is row {a}");
            } else {
                assert!(row.iter().all(|&x| x == 0.0), "{qtype}: id {b} is outside the part");
            }
        }
        let fused = matches!(qtype, QType::Q4_1 | QType::Q4K);
        let big = max_abs(&want);
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            let ok = if fused { (g - w).abs() <= 2.0 * f32::EPSILON / 2.0 * big } else { g.to_bits() == w.to_bits() };
            assert!(ok, "{qtype} value {j}: GPU {g}, reference {w}");
        }
    }
}

#[test]
fn other_products_with_a_quantized_weight_are_refused() {
    let d = dev();
    let (tw, _) = weight(d, QType::Q8_0, 8, 32, 90);
    let x = d.zeros(&[4, 8], DType::F32).unwrap();
    let out = d.zeros(&[4, 32], DType::F32).unwrap();
    // x [4, 8] · W [8, 32] (no transpose): not a linear layer.
    let e = matmul::matmul_forward(d, &out, &x, &tw, None, false, false).err().unwrap().to_string();
    assert!(e.contains("quantized weight") && e.contains("x·Wᵀ"), "{e}");
    assert!(QTensor::from_tensor(&x).is_none());
}
