//! CPU reference for shaders/patch.wgsl: x [b, c, h, w] -> [b, (h/p)·(w/p), c·p·p], patches row-major, each
//! flattened (c, dy, dx); a border narrower than p is dropped (Conv2d with stride p).

pub fn patch_unfold(x: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (hp, wp) = (h / p, w / p);
    let mut out = Vec::with_capacity(b * hp * wp * c * p * p);
    for bi in 0..b {
        for py in 0..hp {
            for px in 0..wp {
                for ch in 0..c {
                    for dy in 0..p {
                        for dx in 0..p {
                            out.push(x[((bi * c + ch) * h + py * p + dy) * w + px * p + dx]);
                        }
                    }
                }
            }
        }
    }
    out
}

/// The gradient of x: each patch element of dout put back where it came from, zero on a dropped border.
pub fn patch_unfold_backward(dout: &[f32], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (hp, wp) = (h / p, w / p);
    let mut dx = vec![0.0; b * c * h * w];
    let mut k = 0;
    for bi in 0..b {
        for py in 0..hp {
            for px in 0..wp {
                for ch in 0..c {
                    for dy in 0..p {
                        for ddx in 0..p {
                            dx[((bi * c + ch) * h + py * p + dy) * w + px * p + ddx] = dout[k];
                            k += 1;
                        }
                    }
                }
            }
        }
    }
    dx
}
