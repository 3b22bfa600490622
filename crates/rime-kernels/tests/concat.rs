//! Column blocks (concat along the last axis and its slice) and the embedding lookup into a table that holds a
//! range of rows of the vocabulary (a table split by rows), against the CPU references.

mod common;
use common::*;
use rime_kernels::ops::{concat, embedding};
use rime_kernels::reference::{concat as rc, embedding as re};
use rime_kernels::{DType, Tensor};

fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

#[test]
fn concat_and_slice_cols_match_reference() {
    let d = dev();
    for &(n, widths) in &[(1usize, &[3usize, 5][..]), (7, &[1, 64, 13][..]), (33, &[100, 100, 7, 2][..])] {
        let parts: Vec<Vec<f32>> = widths.iter().enumerate().map(|(i, &w)| randn(10 + i as u64, n * w, 1.0)).collect();
        let total: usize = widths.iter().sum();
        let whole = d.empty(&[n, total], DType::F32).unwrap();
        let mut off = 0;
        for (p, &w) in parts.iter().zip(widths) {
            d.run(&concat::concat_cols(d, &whole, &d.upload_f32(p, &[n, w]).unwrap(), off).unwrap()).unwrap();
            off += w;
        }
        let refs: Vec<(&[f32], usize)> = parts.iter().zip(widths).map(|(p, &w)| (p.as_slice(), w)).collect();
        let want = rc::concat_cols(&refs, n);
        assert_close(&format!("concat {n} {widths:?}"), &get(&whole), &want, 0.0, 0.0);
        // slicing the columns back gives each part (the gradient rule)
        let mut off = 0;
        for (p, &w) in parts.iter().zip(widths) {
            let out = d.empty(&[n, w], DType::F32).unwrap();
            d.run(&concat::slice_cols(d, &out, &whole, off).unwrap()).unwrap();
            assert_close("slice", &get(&out), p, 0.0, 0.0);
            assert_eq!(rc::slice_cols(&want, n, total, off, w), *p);
            off += w;
        }
    }
    let whole = d.empty(&[2, 5], DType::F32).unwrap();
    let e = concat::concat_cols(d, &whole, &d.empty(&[2, 3], DType::F32).unwrap(), 3).err().unwrap().to_string();
    assert!(e.contains("does not fit"), "{e}");
    let e = concat::concat_cols(d, &whole, &d.empty(&[3, 1], DType::F32).unwrap(), 0).err().unwrap().to_string();
    assert!(e.contains("does not fit"), "{e}");
}

#[test]
fn place_cols_matches_reference() {
    let d = dev();
    for &(n, w, total, off) in &[(1usize, 3usize, 3usize, 0usize), (5, 7, 20, 13), (1, 64, 640, 128), (9, 1, 70, 0)] {
        let part = randn(3, n * w, 1.0);
        let start = randn(4, n * total, 1.0);
        for acc in [false, true] {
            let whole = d.upload_f32(&start, &[n, total]).unwrap();
            d.run(&concat::place_cols(d, &whole, &d.upload_f32(&part, &[n, w]).unwrap(), off, acc).unwrap()).unwrap();
            let mut want = start.clone();
            rc::place_cols(&mut want, &part, n, total, off, acc);
            assert_close(&format!("place_cols {n}x{w} in {total} at {off} acc {acc}"), &get(&whole), &want, 0.0, 0.0);
        }
    }
    let whole = d.empty(&[2, 5], DType::F32).unwrap();
    let e = concat::place_cols(d, &whole, &d.empty(&[2, 3], DType::F32).unwrap(), 3, true).err().unwrap().to_string();
    assert!(e.contains("place_cols") && e.contains("does not fit"), "{e}");
}

#[test]
fn embedding_with_offset_sums_to_the_whole_lookup() {
    let d = dev();
    let (v, c) = (23usize, 9usize);
    let table = randn(3, v * c, 1.0);
    let ids: Vec<u32> = vec![0, 22, 7, 8, 15, 16, 3, 22, 100];
    let idt = d.upload_u32(&ids, &[ids.len()]).unwrap();
    let whole = re::embedding_forward(&ids, &table, c);
    let mut sum = vec![0f32; ids.len() * c];
    for (start, end) in [(0usize, 8usize), (8, 16), (16, 23)] {
        let part = &table[start * c..end * c];
        let out = d.empty(&[ids.len(), c], DType::F32).unwrap();
        let t = d.upload_f32(part, &[end - start, c]).unwrap();
        d.run(&embedding::embedding_forward_offset(d, &out, &idt, &t, start as u32).unwrap()).unwrap();
        let got = get(&out);
        assert_close("embedding part", &got, &re::embedding_forward_offset(&ids, part, c, start as u32), 0.0, 0.0);
        sum.iter_mut().zip(&got).for_each(|(a, b)| *a += b);
    }
    assert_close("sum of parts", &sum, &whole, 0.0, 0.0);
}
