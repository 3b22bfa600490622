//! mergekit 0.1.5's generalized task arithmetic family (task_arithmetic, ties, dare_linear, dare_ties,
//! breadcrumbs, breadcrumbs_ties, della, della_linear) and sce, with its dtype semantics, on the merge kernels
//! of shaders/merge_sparse.wgsl. Per tensor, with r() rounding to the compute dtype:
//! - task vectors d_i = r(x_i - base) (inputs were rounded to the compute dtype on load);
//! - sparsified (density < 1) by the method: `magnitude` (ties: the max(1, int(density L)) largest |d|),
//!   `magnitude_outliers` (breadcrumbs: in ascending order of |d|, skip the n_bot smallest and keep the next
//!   int(density L), n_bot = max(0, L - int(density L) - int(gamma L))), `random` (DARE: rime's seeded
//!   Bernoulli(density) mask, see the engine) or `della_magprune` (per row of the tensor, keep with probability
//!   density - epsilon + 2 epsilon (rank - 1) / (cols - 1), ranks of |d| ascending; rime draws the uniforms
//!   from DARE's seeded stream); with `rescale` the kept values are scaled to the L1 norm of the unsparsified
//!   task vector (mergekit's `rescaled_masked_tensor`, in float32 for DARE and DELLA on a float16 merge, as
//!   mergekit's CPU path does);
//! - combined by `merge_gta_forward`: weighted, TIES' sign consensus for ties / dare_ties / breadcrumbs_ties /
//!   della, normalised, scaled by lambda, added to the base.
//!
//! Without sparsification the tensor streams in chunks; sparsified task vectors are held whole on the GPU (the
//! top-k, ranks and norms are whole-tensor statistics), the combine then runs chunk by chunk.
//!
//! sce: the task vectors whole; with `select_topk` < 1 the int(nonzero(var) * select_topk) elements of largest
//! variance across the task vectors are kept (others zeroed in every task vector); each task vector weighs
//! r(mean(r(d^2))) normalised by the sum (1/N when that is below 1e-6); `merge_sce_forward` elects signs and
//! averages.
//!
//! Ties at a threshold (equal magnitudes, common in float16) are broken by index (lower index first for the
//! top-k, ascending index for the ascending sort); torch's sorts leave that order unspecified.

use rime_kernels::ops::merge as km;
use rime_kernels::ops::merge_sparse::{self as ks, Gta, Precision, SumOf};
use rime_kernels::{DType, Tensor};

use crate::config::{Method, OutDtype};
use crate::engine::{check_binding, copy_at, dare_mask, read_back, write_at, TensorMerge};
use crate::output::TensorSink;
use crate::Result;
use rime_io::Dtype;

/// The compute precision of a tensor: the config's `dtype`, else the common type of the stored inputs.
pub(crate) fn precision(compute: Option<OutDtype>, stored: &[Dtype]) -> Precision {
    match compute {
        Some(OutDtype::F32) => Precision::F32,
        Some(OutDtype::F16) => Precision::F16,
        Some(OutDtype::BF16) => Precision::BF16,
        None if !stored.is_empty() && stored.iter().all(|d| *d == Dtype::F16) => Precision::F16,
        None if !stored.is_empty() && stored.iter().all(|d| *d == Dtype::BF16) => Precision::BF16,
        None => Precision::F32,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Sparsify {
    None,
    Magnitude,
    Random,
    Outliers,
    Della,
}

fn param(p: &Option<crate::config::Param>, tensor: &str, default: f64) -> f64 {
    p.as_ref().and_then(|p| p.for_tensor(tensor)).unwrap_or(default)
}

impl TensorMerge<'_> {
    /// The GTA family (see the module doc).
    pub(crate) fn gta(&self, sink: &mut TensorSink, dt: Dtype) -> Result<()> {
        let (cfg, name, dev, prec) = (self.cfg, self.name, self.dev, self.prec);
        let models = cfg.task_models();
        let n = models.len();
        let lambda = cfg.lambda.for_tensor(name).unwrap_or(1.0) as f32;
        let w: Vec<f32> = models.iter().map(|m| param(&m.weight, name, 1.0) as f32).collect();
        let dens: Vec<f64> = models.iter().map(|m| param(&m.density, name, 1.0)).collect();
        if let Some(d) = dens.iter().find(|d| !(**d > 0.0 && **d <= 1.0)) {
            return Err(self.terr(format!("density {d} is outside (0, 1]")));
        }
        let kind = match cfg.method {
            Method::Ties => Sparsify::Magnitude,
            Method::DareLinear | Method::DareTies => Sparsify::Random,
            Method::Breadcrumbs | Method::BreadcrumbsTies => Sparsify::Outliers,
            Method::Della | Method::DellaLinear => Sparsify::Della,
            _ => Sparsify::None,
        };
        let g = Gta {
            consensus: matches!(cfg.method, Method::Ties | Method::DareTies | Method::BreadcrumbsTies | Method::Della),
            normalize: cfg.normalize,
            raw: false,
            lambda,
            prec,
        };
        if kind == Sparsify::None || dens.iter().all(|&d| d >= 1.0) {
            // Streaming: [x_1..x_N, base] per chunk, task vectors taken in the kernel.
            let rows: Vec<usize> = (1..=n).chain([0]).collect();
            for (c0, c1) in self.chunks() {
                let xs = self.stack(&rows, c0, c1)?;
                let out = dev.empty(&[c1 - c0], DType::F32)?;
                dev.run(&ks::merge_gta_forward(dev, &out, &xs, &w, Gta { raw: true, ..g })?)?;
                sink.write_f32(&read_back(dev, &out, 0, c1 - c0)?, dt)?;
            }
            return Ok(());
        }
        check_binding(dev, name, self.l, "sparsifying a task vector needs the whole tensor at once")?;
        let mut ds = Vec::with_capacity(n);
        for (i, m) in models.iter().enumerate() {
            let d = self.whole_delta(i + 1)?;
            if dens[i] < 1.0 {
                let gamma = param(&m.gamma, name, 0.01);
                let eps = param(&m.epsilon, name, 0.15);
                let what = format!("model `{}`", m.name);
                self.sparsify(&d, i, kind, dens[i], gamma, eps, &what)?;
            }
            ds.push(d);
        }
        self.combine(&ds, |out, xs| ks::merge_gta_forward(dev, out, xs, &w, g), sink, dt)
    }

    /// Task vector `k` (an input index) minus the base, whole, rounded to the compute dtype.
    fn whole_delta(&self, k: usize) -> Result<Tensor> {
        let dev = self.dev;
        let d = dev.empty(&[self.l], DType::F32)?;
        for (c0, c1) in self.chunks() {
            let len = c1 - c0;
            let x = dev.empty(&[len], DType::F32)?;
            let b = dev.empty(&[len], DType::F32)?;
            let mut buf = vec![0f32; len];
            self.read(k, c0, &mut buf)?;
            write_at(dev, &x, 0, &buf);
            self.read(0, c0, &mut buf)?;
            write_at(dev, &b, 0, &buf);
            dev.run(&ks::merge_delta_round_forward(dev, &d, c0, &x, &b, self.prec)?)?;
        }
        Ok(d)
    }

    /// Sparsifies task vector `d` (of task model `i`) in place, with mergekit's optional L1 rescale.
    #[allow(clippy::too_many_arguments)]
    fn sparsify(
        &self,
        d: &Tensor,
        i: usize,
        kind: Sparsify,
        density: f64,
        gamma: f64,
        eps: f64,
        what: &str,
    ) -> Result<()> {
        let (dev, l, prec, name) = (self.dev, self.l, self.prec, self.name);
        let rescale = self.cfg.rescale;
        let acc = dev.empty(&[2], DType::F32)?;
        if rescale {
            dev.run(&ks::merge_sparse_sum_forward(dev, &acc, 0, d, SumOf::Abs)?)?;
        }
        let row = Tensor { shape: vec![1, l], ..d.clone() };
        let s1 = dev.empty(&[2], DType::U32)?;
        let s2 = dev.empty(&[2], DType::U32)?;
        // torch runs bernoulli and DELLA's drop in float32 for a float16 tensor on the CPU.
        let mut work = prec;
        match kind {
            Sparsify::None => {}
            Sparsify::Magnitude => {
                let k = ((density * l as f64) as usize).max(1);
                dev.run(&km::merge_topk_threshold_forward(dev, &s1, &row, k, false)?)?;
                dev.run(&ks::merge_band_mask_forward(dev, d, None, &s1, k, &s2, 0, false)?)?;
            }
            Sparsify::Outliers => {
                let target = (density * l as f64) as usize;
                let n_top = (gamma * l as f64) as usize;
                let n_bot = l.saturating_sub(target + n_top);
                let (k1, k2) = (l - n_bot, l - n_bot - target);
                dev.run(&km::merge_topk_threshold_forward(dev, &s1, &row, k1, true)?)?;
                dev.run(&km::merge_topk_threshold_forward(dev, &s2, &row, k2, true)?)?;
                dev.run(&ks::merge_band_mask_forward(dev, d, None, &s1, k1, &s2, k2, true)?)?;
            }
            Sparsify::Random => {
                work = if prec == Precision::F16 { Precision::F32 } else { prec };
                let mask = dare_mask(self.cfg.seed, name, i, l, density as f32);
                let mask = dev.upload_f32(&mask, &[l])?;
                dev.run(&ks::merge_sparse_rescale_forward(dev, d, Some(&mask), &acc, false, work, prec)?)?;
            }
            Sparsify::Della => {
                work = if prec == Precision::F16 { Precision::F32 } else { prec };
                if density + eps >= 1.0 || density - eps <= 0.0 {
                    return Err(self.terr(format!(
                        "{what}: `epsilon` {eps} with `density` {density}: density ± epsilon must lie in (0, 1)"
                    )));
                }
                let shape = self.ckpts[0].info(self.src[0])?.1.to_vec();
                let rows = match shape.len() {
                    0 | 1 => 1,
                    2 => shape[0],
                    _ => {
                        return Err(self.terr(format!(
                            "della ranks magnitudes along dimension 1; tensors of {} dimensions ({shape:?}) are not \
                             supported",
                            shape.len()
                        )))
                    }
                };
                if l / rows.max(1) < 2 {
                    return Err(self.terr(format!(
                        "della ranks magnitudes within rows of {} element(s) (shape {shape:?}); mergekit's rank \
                         normalisation divides by zero there",
                        l / rows.max(1)
                    )));
                }
                let u = crate::engine::merge_uniforms(self.cfg.seed, name, i, l);
                let u = dev.upload_f32(&u, &[l])?;
                let lo = (density - eps) as f32;
                dev.run(&ks::merge_della_mask_forward(dev, d, &u, rows, lo, eps as f32)?)?;
            }
        }
        if rescale {
            dev.run(&ks::merge_sparse_sum_forward(dev, &acc, 1, d, SumOf::Abs)?)?;
            dev.run(&ks::merge_sparse_rescale_forward(dev, d, None, &acc, true, work, prec)?)?;
        }
        Ok(())
    }

    /// Chunk by chunk: [d_1..d_N, base] stacked, `kernel(out, xs)`, read back and written.
    fn combine(
        &self,
        ds: &[Tensor],
        kernel: impl Fn(&Tensor, &Tensor) -> rime_kernels::Result<Vec<rime_kernels::Dispatch>>,
        sink: &mut TensorSink,
        dt: Dtype,
    ) -> Result<()> {
        let (dev, n) = (self.dev, ds.len());
        for (c0, c1) in self.chunks() {
            let len = c1 - c0;
            let xs = dev.empty(&[n + 1, len], DType::F32)?;
            for (i, d) in ds.iter().enumerate() {
                copy_at(dev, d, c0, &xs, i * len, len);
            }
            let mut buf = vec![0f32; len];
            self.read(0, c0, &mut buf)?;
            write_at(dev, &xs, n * len, &buf);
            let out = dev.empty(&[len], DType::F32)?;
            dev.run(&kernel(&out, &xs)?)?;
            sink.write_f32(&read_back(dev, &out, 0, len)?, dt)?;
        }
        Ok(())
    }

    /// SCE (see the module doc).
    pub(crate) fn sce(&self, sink: &mut TensorSink, dt: Dtype) -> Result<()> {
        let (dev, name, l, prec) = (self.dev, self.name, self.l, self.prec);
        let n = self.cfg.task_models().len();
        check_binding(dev, name, l, "sce's variance selection and weights need the whole tensor at once")?;
        let ds: Vec<Tensor> = (1..=n).map(|k| self.whole_delta(k)).collect::<Result<_>>()?;
        let topk = self.cfg.select_topk;
        if topk < 1.0 {
            let var = dev.empty(&[l], DType::F32)?;
            for (c0, c1) in self.chunks() {
                let len = c1 - c0;
                let xs = dev.empty(&[n, len], DType::F32)?;
                for (i, d) in ds.iter().enumerate() {
                    copy_at(dev, d, c0, &xs, i * len, len);
                }
                let v = dev.empty(&[len], DType::F32)?;
                dev.run(&ks::merge_sce_var_forward(dev, &v, &xs, prec)?)?;
                copy_at(dev, &v, 0, &var, c0, len);
            }
            let acc = dev.empty(&[1], DType::F32)?;
            dev.run(&ks::merge_sparse_sum_forward(dev, &acc, 0, &var, SumOf::NonZero)?)?;
            let nonzero = read_back(dev, &acc, 0, 1)?[0];
            // torch: int(count_nonzero(var) * select_topk), an int64 tensor times a float, in float32.
            let k = if topk <= 0.0 { 0 } else { (nonzero * topk as f32) as usize };
            let s1 = dev.empty(&[2], DType::U32)?;
            let s2 = dev.empty(&[2], DType::U32)?;
            let row = Tensor { shape: vec![1, l], ..var.clone() };
            dev.run(&km::merge_topk_threshold_forward(dev, &s1, &row, k, false)?)?;
            for d in &ds {
                dev.run(&ks::merge_band_mask_forward(dev, d, Some(&var), &s1, k, &s2, 0, false)?)?;
            }
        }
        let acc = dev.empty(&[n], DType::F32)?;
        for (i, d) in ds.iter().enumerate() {
            dev.run(&ks::merge_sparse_sum_forward(dev, &acc, i, d, SumOf::Square(prec))?)?;
        }
        let sq = read_back(dev, &acc, 0, n)?;
        // sce_weight: the mean squares (rounded), normalised by their sum (torch `.item()`, a CPU scalar).
        let means: Vec<f32> = sq.iter().map(|s| prec.round(s / l as f32)).collect();
        let total = prec.round(means.iter().fold(0.0f32, |a, b| a + b));
        let w: Vec<f32> = if total.abs() < 1e-6 {
            vec![prec.round(1.0 / n as f32); n]
        } else {
            means.iter().map(|m| prec.round(m / total)).collect()
        };
        self.combine(&ds, |out, xs| ks::merge_sce_forward(dev, out, xs, &w, prec), sink, dt)
    }
}
