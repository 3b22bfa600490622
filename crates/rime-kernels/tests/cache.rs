mod common;
use common::*;
use rime_kernels::ops::cache::*;
use rime_kernels::{reference::cache as r, DType, Tensor};

fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}

#[test]
fn cache_write_matches_reference_at_every_position() {
    // One recorded dispatch per shape, replayed with the position rewritten, as a decode loop does; the last
    // positions run past the end (those rows are dropped, nothing else changes).
    let d = dev();
    for &(s, t, r_) in &[(1, 1, 1), (5, 1, 3), (9, 3, 7), (33, 4, 130), (7, 7, 2)] {
        let mut want = randn(1, s * r_, 1.0);
        let cache = d.upload_f32(&want, &[s, r_]).unwrap();
        let pos = d.upload_u32(&[0], &[1]).unwrap();
        let src_t = d.empty(&[t, r_], DType::F32).unwrap();
        let ds = cache_write(d, &cache, &src_t, &pos).unwrap();
        for p in 0..(s + 2) as u32 {
            let src = randn(p as u64 + 2, t * r_, 1.0);
            d.queue().write_buffer(&src_t.buffer, 0, bytemuck::cast_slice(&src));
            d.queue().write_buffer(&pos.buffer, 0, bytemuck::cast_slice(&[p]));
            d.run(&ds).unwrap();
            want = r::cache_write(&want, &src, r_, p);
            assert_close(&format!("cache_write s={s} t={t} r={r_} pos={p}"), &get(&cache), &want, 0.0, 0.0);
        }
    }
}

#[test]
fn cache_mask_marks_the_filled_prefix() {
    let d = dev();
    for &(b, s, t) in &[(1, 1, 1), (1, 9, 1), (3, 17, 4), (2, 130, 2)] {
        let mask = d.upload_f32(&randn(3, b * s, 1.0), &[b, s]).unwrap(); // overwritten
        let pos = d.upload_u32(&[0], &[1]).unwrap();
        let ds = cache_mask(d, &mask, &pos, t).unwrap();
        for p in [0u32, 1, (s / 2) as u32, s as u32] {
            d.queue().write_buffer(&pos.buffer, 0, bytemuck::cast_slice(&[p]));
            d.run(&ds).unwrap();
            assert_close(
                &format!("cache_mask {b}x{s} t={t} pos={p}"),
                &get(&mask),
                &r::cache_mask(b, s, p, t),
                0.0,
                0.0,
            );
        }
    }
}

#[test]
fn cache_kernels_reject_bad_inputs() {
    let d = dev();
    let cache = d.empty(&[8, 4], DType::F32).unwrap();
    let pos = d.upload_u32(&[0], &[1]).unwrap();
    let err = |r: rime_kernels::Result<Vec<rime_kernels::Dispatch>>| match r {
        Ok(_) => panic!("accepted bad input"),
        Err(e) => e.to_string(),
    };
    let e = err(cache_write(d, &cache, &d.empty(&[2, 5], DType::F32).unwrap(), &pos));
    assert!(e.contains("cache_write") && e.contains("[T, R]"), "{e}");
    let fpos = d.upload_f32(&[0.0], &[1]).unwrap();
    assert!(err(cache_write(d, &cache, &d.empty(&[2, 4], DType::F32).unwrap(), &fpos)).contains("must be one U32"));
    assert!(err(cache_mask(d, &d.empty(&[8], DType::F32).unwrap(), &pos, 1)).contains("[B, S]"));
}
