mod common;
use common::*;
use rime_kernels::ops::cross_entropy::*;
use rime_kernels::ops::reduce::RowVariant;
use rime_kernels::{reference::cross_entropy as r, DType, Device, Tensor};

fn variants(d: &Device) -> Vec<RowVariant> {
    let mut v = vec![RowVariant::for_device(d), RowVariant::Shared(8), RowVariant::Shared(256)];
    v.dedup();
    v
}

const IGNORE: i32 = -100;
/// Odd V runs f32 elements, V a multiple of 4 vec4.
const SHAPES: &[(usize, usize)] =
    &[(1, 1), (3, 17), (17, 3), (5, 127), (4, 4099), (130, 33), (1, 4), (3, 128), (4, 4096)];

fn up(x: &[f32], shape: &[usize]) -> Tensor {
    dev().upload_f32(x, shape).unwrap()
}
fn up_i32(x: &[i32]) -> Tensor {
    dev().upload_bytes("targets", bytemuck::cast_slice(x), &[x.len()], DType::I32).unwrap()
}
fn get(t: &Tensor) -> Vec<f32> {
    dev().download_f32(t).unwrap()
}
fn empty(shape: &[usize]) -> Tensor {
    dev().empty(shape, DType::F32).unwrap()
}

/// Targets with every third row ignored (unless there is only one row).
fn targets(n: usize, v: usize, seed: u64) -> Vec<i32> {
    let mut r = rng(seed);
    (0..n).map(|i| if n > 1 && i % 3 == 1 { IGNORE } else { rand::Rng::random_range(&mut r, 0..v as i32) }).collect()
}

#[test]
fn cross_entropy_matches_reference() {
    let d = dev();
    for rv in variants(d) {
        for &(n, v) in SHAPES {
            let x = randn((n * v) as u64, n * v, 8.0);
            let t = targets(n, v, 3);
            let (loss, lse) = (empty(&[1]), empty(&[n]));
            d.run(&cross_entropy_forward_with(d, rv, &loss, &lse, &up(&x, &[n, v]), &up_i32(&t), IGNORE).unwrap())
                .unwrap();
            let (wl, wlse) = r::cross_entropy_forward(&x, &t, v, IGNORE);
            let what = format!("cross_entropy {rv:?} {n}x{v}");
            assert_close(&(what.clone() + " lse"), &get(&lse), &wlse, 1e-5, 1e-6);
            assert_close(&(what + " loss"), &get(&loss), &[wl], 1e-5, 1e-5);
        }
    }
}

#[test]
fn cross_entropy_all_ignored_is_zero() {
    let d = dev();
    let (loss, lse) = (empty(&[1]), empty(&[3]));
    let x = up(&randn(1, 12, 1.0), &[3, 4]);
    d.run(&cross_entropy_forward(d, &loss, &lse, &x, &up_i32(&[IGNORE; 3]), IGNORE).unwrap()).unwrap();
    assert_eq!(get(&loss), vec![0.0]);
    let dl = empty(&[3, 4]);
    d.run(&cross_entropy_backward(d, &dl, &up(&[1.0], &[1]), &x, &lse, &up_i32(&[IGNORE; 3]), IGNORE).unwrap())
        .unwrap();
    assert_eq!(get(&dl), vec![0.0; 12]);
}

#[test]
fn cross_entropy_out_of_range_target_gives_nan_loss() {
    let d = dev();
    let (loss, lse) = (empty(&[1]), empty(&[2]));
    let x = up(&randn(2, 8, 1.0), &[2, 4]);
    d.run(&cross_entropy_forward(d, &loss, &lse, &x, &up_i32(&[1, 4]), IGNORE).unwrap()).unwrap();
    assert!(get(&loss)[0].is_nan());
}

#[test]
fn cross_entropy_backward_matches_reference() {
    let d = dev();
    for rv in variants(d) {
        for &(n, v) in SHAPES {
            let x = randn((n * v) as u64 + 1, n * v, 8.0);
            let t = targets(n, v, 4);
            let (_, lse) = r::cross_entropy_forward(&x, &t, v, IGNORE);
            let dl = empty(&[n, v]);
            let ds = cross_entropy_backward_with(
                d,
                rv,
                &dl,
                &up(&[0.7], &[1]),
                &up(&x, &[n, v]),
                &up(&lse, &[n]),
                &up_i32(&t),
                IGNORE,
            );
            d.run(&ds.unwrap()).unwrap();
            let want = r::cross_entropy_backward(0.7, &x, &lse, &t, v, IGNORE);
            assert_close(&format!("cross_entropy backward {rv:?} {n}x{v}"), &get(&dl), &want, 1e-6, 1e-5);
        }
    }
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    // d loss / d logits = (softmax - onehot) / kept rows, ignored rows 0.
    let (n, v) = (4, 6);
    let x = randn(5, n * v, 3.0);
    let t = targets(n, v, 6);
    let (_, lse) = r::cross_entropy_forward(&x, &t, v, IGNORE);
    let fd = finite_diff(&x, 1e-2, |xx| r::cross_entropy_forward(xx, &t, v, IGNORE).0 as f64);
    assert_close(
        "cross_entropy backward vs fd",
        &r::cross_entropy_backward(1.0, &x, &lse, &t, v, IGNORE),
        &fd,
        2e-3,
        2e-3,
    );
}

#[test]
fn cross_entropy_rejects_bad_shapes() {
    let d = dev();
    let x = empty(&[3, 5]);
    let e =
        cross_entropy_forward(d, &empty(&[1]), &empty(&[3]), &x, &up_i32(&[0, 1]), IGNORE).err().unwrap().to_string();
    assert!(e.contains("cross_entropy_forward") && e.contains("targets"), "{e}");
    let u = d.upload_u32(&[0, 1, 2], &[3]).unwrap();
    assert!(cross_entropy_forward(d, &empty(&[1]), &empty(&[3]), &x, &u, IGNORE).is_err());
    assert!(cross_entropy_forward(d, &empty(&[2]), &empty(&[3]), &x, &up_i32(&[0, 1, 2]), IGNORE).is_err());
    assert!(cross_entropy_backward(d, &empty(&[5, 3]), &empty(&[1]), &x, &empty(&[3]), &up_i32(&[0, 1, 2]), IGNORE)
        .is_err());
}

/// naga validation of this family's specializations (the shared test covers all files; this one runs alone).
#[test]
fn cross_entropy_shaders_validate() {
    for (file, spec) in specs() {
        let src = rime_kernels::shaders::source_with_prelude(file, &spec.prelude).unwrap();
        let module =
            naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(&src)));
        let mut v = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
        let info = v.validate(&module).unwrap_or_else(|e| panic!("{file} ({spec:?}) invalid: {e:?}"));
        let consts: naga::back::PipelineConstants = spec.constants.iter().map(|(k, v)| (k.clone(), *v)).collect();
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &consts).unwrap();
    }
}

/// The rows `r` and columns `c` of x [.., v].
fn block_of(x: &[f32], v: usize, r: std::ops::Range<usize>, c: std::ops::Range<usize>) -> Vec<f32> {
    r.flat_map(|i| x[i * v + c.start..i * v + c.end].to_vec()).collect()
}

/// Logits taken as row chunks × class blocks (an output head split by vocabulary rows, tokens a chunk at a
/// time): the chunks' loss shares add up to the reference mean, each chunk's folded lse is the reference lse
/// of its rows, and each block's gradient is the reference gradient's block. Block widths mix f32 and vec4
/// rows, and a target falls in each block.
#[test]
fn cross_entropy_blocks_match_the_whole() {
    let d = dev();
    // (rows, row chunk, class block boundaries)
    let cases: &[(usize, usize, &[usize])] =
        &[(7, 3, &[0, 5, 12, 13, 29]), (16, 16, &[0, 64, 128]), (9, 4, &[0, 1]), (33, 8, &[0, 40, 41, 200])];
    for rv in variants(d) {
        for &(n, chunk, cuts) in cases {
            let v = *cuts.last().unwrap();
            let x = randn((n * v) as u64 + 9, n * v, 6.0);
            let t = targets(n, v, 11);
            let (wl, wlse) = r::cross_entropy_forward(&x, &t, v, IGNORE);
            let wd = r::cross_entropy_backward(0.3, &x, &wlse, &t, v, IGNORE);
            let tt = up_i32(&t);
            let what = format!("cross_entropy blocks {rv:?} {n}x{v} by {chunk}");
            let mut total = 0f32;
            for r0 in (0..n).step_by(chunk) {
                let rows = r0..(r0 + chunk).min(n);
                let m = rows.len();
                let (lse, picked, loss) = (empty(&[m]), empty(&[m]), empty(&[1]));
                let mut blocks = Vec::new();
                for (k, c) in cuts.windows(2).enumerate() {
                    let b = Block { row0: r0, offset: c[0], classes: v, first: k == 0 };
                    let xb = up(&block_of(&x, v, rows.clone(), c[0]..c[1]), &[m, c[1] - c[0]]);
                    d.run(&cross_entropy_block_forward_with(d, rv, &lse, &picked, &xb, &tt, b, IGNORE).unwrap())
                        .unwrap();
                    blocks.push((b, xb, c[0]..c[1]));
                }
                let b0 = blocks[0].0;
                d.run(&cross_entropy_block_loss_with(d, rv, &loss, &lse, &picked, &tt, b0, IGNORE).unwrap()).unwrap();
                total += get(&loss)[0];
                assert_close(&format!("{what} lse at {r0}"), &get(&lse), &wlse[rows.clone()], 1e-5, 1e-6);
                for (b, xb, cols) in blocks {
                    let db = empty(&xb.shape);
                    let ds =
                        cross_entropy_block_backward_with(d, rv, &db, &up(&[0.3], &[1]), &xb, &lse, &tt, b, IGNORE);
                    d.run(&ds.unwrap()).unwrap();
                    let want = block_of(&wd, v, rows.clone(), cols.clone());
                    assert_close(&format!("{what} dlogits {r0} {cols:?}"), &get(&db), &want, 1e-6, 1e-5);
                }
            }
            assert_close(&(what + " loss"), &[total], &[wl], 1e-5, 1e-5);
        }
    }
}

#[test]
fn cross_entropy_blocks_reject_blocks_outside_the_problem() {
    let d = dev();
    let (x, tt) = (empty(&[2, 4]), up_i32(&[0, 1, 2]));
    let (lse, picked) = (empty(&[2]), empty(&[2]));
    let past_classes = Block { row0: 0, offset: 3, classes: 6, first: true };
    let e = cross_entropy_block_forward(d, &lse, &picked, &x, &tt, past_classes, IGNORE).err().unwrap().to_string();
    assert!(e.contains("classes"), "{e}");
    let past_rows = Block { row0: 2, offset: 0, classes: 4, first: true };
    let e = cross_entropy_block_forward(d, &lse, &picked, &x, &tt, past_rows, IGNORE).err().unwrap().to_string();
    assert!(e.contains("rows 2..4"), "{e}");
    assert!(cross_entropy_block_loss(d, &empty(&[1]), &lse, &empty(&[3]), &tt, Block::whole(4), IGNORE).is_err());
}

/// The unit backward (a loss gradient of one, for a frozen head's input gradient computed in the forward pass) is
/// the backward with dloss = 1, block by block.
#[test]
fn cross_entropy_unit_backward_is_the_backward_at_one() {
    let d = dev();
    let (n, v, split) = (6, 21, 8);
    let x = randn(77, n * v, 5.0);
    let t = targets(n, v, 12);
    let (_, wlse) = r::cross_entropy_forward(&x, &t, v, IGNORE);
    let want = r::cross_entropy_backward(1.0, &x, &wlse, &t, v, IGNORE);
    let (tt, lse) = (up_i32(&t), up(&wlse, &[n]));
    for (k, cols) in [0..split, split..v].into_iter().enumerate() {
        let b = Block { row0: 0, offset: cols.start, classes: v, first: k == 0 };
        let xb = up(&block_of(&x, v, 0..n, cols.clone()), &[n, cols.len()]);
        let db = empty(&[n, cols.len()]);
        d.run(&cross_entropy_block_backward_unit(d, &db, &xb, &lse, &tt, b, IGNORE).unwrap()).unwrap();
        assert_close(&format!("unit backward {cols:?}"), &get(&db), &block_of(&want, v, 0..n, cols), 1e-6, 1e-5);
    }
}
