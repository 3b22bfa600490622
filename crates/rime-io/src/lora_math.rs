//! The LoRA arithmetic every consumer of a peft adapter shares (folding into a checkpoint, combining adapters,
//! applying one at decode time): peft's pattern lookup, the scale of a module (`lora_alpha` or its
//! `alpha_pattern` entry over r, or over √r with rsLoRA), W += s·B·A (`fan_in_fan_out` weights transposed)
//! and DoRA's per-row rescale to the trained magnitude.

use std::collections::BTreeMap;

use crate::peft::AdapterConfig;

/// peft's pattern lookup (`rank_pattern`, `alpha_pattern`): a key matches a module whose path is the key or
/// ends with `.key`.
pub fn pattern_lookup<'a, T>(m: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
    m.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v)
}

impl AdapterConfig {
    /// `lora_alpha` of `module` (its `alpha_pattern` entry when one matches).
    pub fn module_alpha(&self, module: &str) -> f64 {
        pattern_lookup(&self.alpha_pattern, module).copied().unwrap_or(self.lora_alpha)
    }

    /// The LoRA scale of `module` whose factor A has `r` rows: alpha / r, or alpha / √r with rsLoRA.
    pub fn module_scale(&self, module: &str, r: usize) -> f64 {
        let alpha = self.module_alpha(module);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// The sizes of one LoRA pair: A is [r, fan_in], B is [fan_out, r].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraDims {
    pub r: usize,
    pub fan_in: usize,
    pub fan_out: usize,
}

impl LoraDims {
    /// From the shapes of A [r, in] and B [out, r] (already checked 2-D and rank-consistent by the loader).
    pub fn of(a_shape: &[usize], b_shape: &[usize]) -> LoraDims {
        LoraDims { r: a_shape[0], fan_in: a_shape[1], fan_out: b_shape[0] }
    }

    /// The shape the adapted weight must have: [out, in], or [in, out] for `fan_in_fan_out` (Conv1D) weights.
    pub fn weight_shape(&self, fan_in_fan_out: bool) -> [usize; 2] {
        if fan_in_fan_out {
            [self.fan_in, self.fan_out]
        } else {
            [self.fan_out, self.fan_in]
        }
    }
}

/// W += s·B·A in place: w is [out, in] ([in, out] when `fan_in_fan_out`), a [r, in], b [out, r], row-major.
/// Each entry of B·A is summed over the rank first, then scaled and added.
pub fn add_scaled_product(w: &mut [f32], a: &[f32], b: &[f32], d: LoraDims, s: f32, fan_in_fan_out: bool) {
    let LoraDims { r, fan_in: fin, fan_out: fout } = d;
    for o in 0..fout {
        for i in 0..fin {
            let mut acc = 0.0f32;
            for q in 0..r {
                acc += b[o * r + q] * a[q * fin + i];
            }
            let idx = if fan_in_fan_out { i * fout + o } else { o * fin + i };
            w[idx] += s * acc;
        }
    }
}

/// DoRA's scale of each output row: g\[o\] = m\[o\] / ||w\[o, :\]|| for an [out, in] weight w that already holds
/// W + s·B·A (norm in f64, as the fold writes it).
pub fn dora_row_scale(w: &[f32], m: &[f32], fan_in: usize) -> Vec<f32> {
    w.chunks(fan_in)
        .zip(m)
        .map(|(row, &mo)| {
            let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            (mo as f64 / norm) as f32
        })
        .collect()
}

/// DoRA's fold: every row of the [out, in] weight w (holding W + s·B·A) scaled to the magnitude m\[o\].
pub fn dora_rescale_rows(w: &mut [f32], m: &[f32], fan_in: usize) {
    let g = dora_row_scale(w, m, fan_in);
    for (row, g) in w.chunks_mut(fan_in).zip(g) {
        row.iter_mut().for_each(|v| *v *= g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_respects_patterns_and_rslora() {
        let mut c = AdapterConfig::lora(8, 16.0, vec!["q_proj".into()]);
        c.alpha_pattern.insert("layers.1.self_attn.q_proj".into(), 4.0);
        assert_eq!(c.module_scale("model.layers.0.self_attn.q_proj", 8), 2.0);
        assert_eq!(c.module_scale("model.layers.1.self_attn.q_proj", 8), 0.5);
        // a key matches whole path components only
        assert_eq!(c.module_scale("model.layers.11.self_attn.q_proj", 8), 2.0);
        c.use_rslora = true;
        assert_eq!(c.module_scale("model.layers.0.self_attn.q_proj", 4), 8.0);
        assert_eq!(pattern_lookup(&c.alpha_pattern, "x.layers.1.self_attn.q_proj"), Some(&4.0));
    }

    #[test]
    fn product_and_dora_rows() {
        // B·A = [[1,2,3], [0.5-4, 1-5, 1.5-6]], s = 4
        let (a, b) = ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 0.0, 0.5, -1.0]);
        let d = LoraDims::of(&[2, 3], &[2, 2]);
        let mut w = vec![0.0; 6];
        add_scaled_product(&mut w, &a, &b, d, 4.0, false);
        assert_eq!(w, vec![4.0, 8.0, 12.0, -14.0, -16.0, -18.0]);
        let mut wt = vec![0.0; 6];
        add_scaled_product(&mut wt, &a, &b, d, 4.0, true);
        assert_eq!(wt, vec![4.0, -14.0, 8.0, -16.0, 12.0, -18.0]);
        assert_eq!(d.weight_shape(true), [3, 2]);
        let mut r = vec![3.0, 4.0, 0.0, 0.0, 0.0, 2.0];
        dora_rescale_rows(&mut r, &[10.0, 1.0], 3);
        assert_eq!(r, vec![6.0, 8.0, 0.0, 0.0, 0.0, 1.0]);
    }
}
