//! CPU reference for shaders/cache.wgsl.

/// cache [s, r] with rows pos..pos+t replaced by src [t, r]; rows past s are dropped.
pub fn cache_write(cache: &[f32], src: &[f32], r: usize, pos: u32) -> Vec<f32> {
    let mut out = cache.to_vec();
    for (k, row) in src.chunks(r).enumerate() {
        let at = (pos as usize + k) * r;
        if at + r <= out.len() {
            out[at..at + r].copy_from_slice(row);
        }
    }
    out
}

/// mask [b, s]: 1 where the column is below pos + t.
pub fn cache_mask(b: usize, s: usize, pos: u32, t: usize) -> Vec<f32> {
    (0..b * s).map(|i| if (i % s) < pos as usize + t { 1.0 } else { 0.0 }).collect()
}
