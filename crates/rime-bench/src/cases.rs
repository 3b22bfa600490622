//! The cases: shapes from real models (MiniLM-L6 at batch 32 × sequence 128, SmolLM2-135M, a 4096-wide
//! Llama layer) and square products, each timed on the device and, right after, on the CPU baseline.
//! FLOP counts are nominal (2·M·N·K per product, attention 4·B·NH·T²·HS forward and 10·B·NH·T²·HS backward
//! with the probabilities recomputed), the same count for rime and the baseline, so a ratio is a time ratio.

use std::time::Instant;

use rime_graph::{OptimConfig, ParamStore};
use rime_kernels::ops::{attention, lora, matmul, merge};
use rime_kernels::{DType, Device, Dispatch, Tensor};
use rime_models::bert::BertConfig;
use rime_peft::classifier::{self, Method};
use rime_peft::lora::{LoraConfig, LoraInit};

use crate::cpu::{self, row, trans};
use crate::timer::{measure_cpu, Stats, Timer};
use crate::{adapter_label, CaseResult, Error, Options, Result, Unit};

pub(crate) struct Ctx<'d> {
    pub dev: &'d Device,
    pub opts: &'d Options,
    pub timer: Timer<'d>,
    pub adapter: String,
}

impl<'d> Ctx<'d> {
    pub fn new(dev: &'d Device, opts: &'d Options) -> Ctx<'d> {
        Ctx { dev, opts, timer: Timer::new(dev, opts.wall), adapter: adapter_label(dev) }
    }

    fn gpu(&self, ds: &[Dispatch]) -> Result<Stats> {
        self.timer.measure(ds, self.opts.warmup, self.opts.runs)
    }

    fn cpu(&self, f: impl FnMut()) -> Stats {
        measure_cpu(self.opts.warmup.max(1), self.opts.runs, f)
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &self,
        name: &str,
        shape: String,
        unit: Unit,
        work: f64,
        gpu: Stats,
        baseline: String,
        cpu: Stats,
    ) -> CaseResult {
        let value = work / gpu.median * 1e-9;
        let baseline_value = work / cpu.median * 1e-9;
        let mut extra = serde_json::Map::new();
        extra.insert("runs".into(), gpu.runs.into());
        extra.insert("ms_min".into(), (gpu.min * 1e3).into());
        extra.insert("ms_max".into(), (gpu.max * 1e3).into());
        CaseResult {
            name: name.to_string(),
            shape,
            unit,
            value,
            baseline,
            baseline_value,
            ratio: value / baseline_value,
            ms: gpu.median * 1e3,
            baseline_ms: cpu.median * 1e3,
            timing: self.timer.method(),
            adapter: self.adapter.clone(),
            extra,
        }
    }
}

fn gemm_label() -> String {
    format!("gemm 0.18 f32 (rayon, {} threads)", crate::cpu_threads())
}

/// Deterministic values in [-1, 1) (xorshift; speed matters for 48M-element inputs, quality does not).
pub(crate) fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32) / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn upload(dev: &Device, shape: &[usize], seed: u64) -> Result<(Tensor, Vec<f32>)> {
    let data = fill(shape.iter().product(), seed);
    Ok((dev.upload_f32(&data, shape)?, data))
}

// ------------------------------------------------------------------------------------------------ matmul

struct MatmulCase {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    /// x·Wᵀ with W [N, K] (a linear layer, the layout models run) or a plain A·B.
    linear: bool,
    /// Read the right operand from its buffer even where the engine would give the frozen weight a texture
    /// twin (the `_storage` rows, the same product through the storage-load kernel, for comparison).
    storage: bool,
}

fn matmul_cases(o: &Options) -> Vec<MatmulCase> {
    let c = |name, m, k, n, linear| MatmulCase { name, m, k, n, linear, storage: false };
    let st = |name, m, k, n, linear| MatmulCase { name, m, k, n, linear, storage: true };
    if o.tiny {
        return vec![c("matmul_tiny_linear", 64, 32, 48, true), c("matmul_tiny_square", 64, 64, 64, false)];
    }
    let mut v = vec![
        c("matmul_minilm_attn_proj", 4096, 384, 384, true),
        st("matmul_minilm_attn_proj_storage", 4096, 384, 384, true),
        c("matmul_minilm_ffn_up", 4096, 384, 1536, true),
        c("matmul_minilm_ffn_down", 4096, 1536, 384, true),
        c("matmul_smollm2_attn_proj", 4096, 576, 576, true),
        c("matmul_smollm2_mlp_up", 4096, 576, 1536, true),
        c("matmul_smollm2_mlp_down", 4096, 1536, 576, true),
        // One decoded token (M = 1, the gemv kernels): an MLP projection and the output head.
        c("matmul_decode_mlp_up", 1, 576, 1536, true),
        c("matmul_decode_lm_head", 1, 576, 49152, true),
    ];
    if !o.quick {
        v.push(c("matmul_llama_4096", 4096, 4096, 4096, true));
    }
    v.push(c("matmul_square_512", 512, 512, 512, false));
    v.push(c("matmul_square_1024", 1024, 1024, 1024, false));
    v.push(st("matmul_square_1024_storage", 1024, 1024, 1024, false));
    if !o.quick {
        v.push(c("matmul_square_2048", 2048, 2048, 2048, false));
        v.push(st("matmul_square_2048_storage", 2048, 2048, 2048, false));
    }
    v
}

pub(crate) fn matmul(ctx: &Ctx) -> Result<Vec<CaseResult>> {
    let dev = ctx.dev;
    let mut out = Vec::new();
    for c in matmul_cases(ctx.opts) {
        let (m, k, n) = (c.m, c.k, c.n);
        let (a_t, a) = upload(dev, &[m, k], 1)?;
        let w_shape = if c.linear { [n, k] } else { [k, n] };
        let (w_t, w) = upload(dev, &w_shape, 2)?;
        // The right operand is a frozen weight: on CPU adapters the engine gives it a texture twin.
        let w_read = if c.storage { w_t.clone() } else { dev.with_texture_twin(&w_t)? };
        let o_t = dev.empty(&[m, n], DType::F32)?;
        let ds = matmul::matmul_forward(dev, &o_t, &a_t, &w_read, None, false, c.linear)?;
        let gpu = ctx.gpu(&ds)?;
        drop(ds);
        let rhs_source = if w_read.texture.is_some() { "texture twin" } else { "storage buffer" };
        drop(w_read);
        for t in [a_t, w_t, o_t] {
            dev.recycle(t);
        }
        let mut dst = vec![0f32; m * n];
        let wv = if c.linear { trans(k) } else { row(n) };
        let cpu =
            ctx.cpu(|| cpu::gemm_f32(m, n, k, &mut dst, row(n), false, &a, row(k), &w, wv, 1.0, cpu::all_threads()));
        let layout = if c.linear { "x·Wᵀ" } else { "A·B" };
        let shape = format!("{m}x{k}x{n} (MxKxN, {layout})");
        let flops = 2.0 * (m * n * k) as f64;
        let mut r = ctx.result(c.name, shape, Unit::Gflops, flops, gpu, gemm_label(), cpu);
        r.extra.insert("rhs".into(), rhs_source.into());
        out.push(r);
    }
    Ok(out)
}

// --------------------------------------------------------------------------------------------- attention

struct AttnShape {
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
}

fn attn_shape(o: &Options) -> AttnShape {
    if o.tiny {
        AttnShape { b: 2, t: 16, nh: 2, hs: 32 }
    } else {
        AttnShape { b: 32, t: 128, nh: 12, hs: 32 }
    }
}

pub(crate) fn attention(ctx: &Ctx) -> Result<Vec<CaseResult>> {
    let dev = ctx.dev;
    let AttnShape { b, t, nh, hs } = attn_shape(ctx.opts);
    let shape4 = [b, t, nh, hs];
    let scale = 1.0 / (hs as f32).sqrt();
    let (q_t, q) = upload(dev, &shape4, 11)?;
    let (k_t, k) = upload(dev, &shape4, 12)?;
    let (v_t, v) = upload(dev, &shape4, 13)?;
    let (do_t, dout) = upload(dev, &shape4, 14)?;
    let mask = vec![1f32; b * t];
    let mask_t = dev.upload_f32(&mask, &[b, t])?;
    let out_t = dev.empty(&shape4, DType::F32)?;
    let lse_t = dev.empty(&[b, nh, t], DType::F32)?;
    let fwd = attention::attention_forward(dev, &out_t, &lse_t, &q_t, &k_t, &v_t, Some(&mask_t), false, scale)?;
    let gpu_f = ctx.gpu(&fwd)?;
    let (dq_t, dk_t, dv_t) =
        (dev.empty(&shape4, DType::F32)?, dev.empty(&shape4, DType::F32)?, dev.empty(&shape4, DType::F32)?);
    let delta_t = dev.empty(&[b, nh, t], DType::F32)?;
    let bwd = attention::attention_backward(
        dev,
        &dq_t,
        &dk_t,
        &dv_t,
        &delta_t,
        &do_t,
        &q_t,
        &k_t,
        &v_t,
        &out_t,
        &lse_t,
        Some(&mask_t),
        false,
        scale,
    )?;
    dev.run(&fwd)?;
    let gpu_b = ctx.gpu(&bwd)?;

    let a = cpu::Attention { b, t, nh, hs, scale };
    let n = b * t * nh * hs;
    let mut out = vec![0f32; n];
    let mut lse = vec![0f32; b * nh * t];
    let cpu_f = ctx.cpu(|| a.forward(&mut out, &mut lse, &q, &k, &v, &mask));
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let cpu_b = ctx.cpu(|| a.backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &mask));

    let base = format!("{} (heads in parallel, gemm per head)", gemm_label());
    let shape = format!("B={b} T={t} NH={nh} HS={hs}");
    let unit = (b * nh * t * t * hs) as f64;
    Ok(vec![
        ctx.result("attention_forward", shape.clone(), Unit::Gflops, 4.0 * unit, gpu_f, base.clone(), cpu_f),
        ctx.result("attention_backward", shape, Unit::Gflops, 10.0 * unit, gpu_b, base, cpu_b),
    ])
}

// -------------------------------------------------------------------------------------------------- lora

/// The products of one LoRA linear forward + backward with a frozen W: (m, n, k) of each, in the order the
/// baseline runs them.
fn lora_products(m: usize, c: usize, oc: usize, r: usize) -> [(usize, usize, usize); 8] {
    [
        (m, r, c),  // h = x·Aᵀ
        (m, oc, c), // out = x·Wᵀ
        (m, oc, r), // out += s·h·Bᵀ
        (m, r, oc), // dh = dout·B
        (m, c, oc), // dx = dout·W
        (m, c, r),  // dx += s·dh·A
        (oc, r, m), // dB = s·doutᵀ·h
        (r, c, m),  // dA = s·dhᵀ·x
    ]
}

pub(crate) fn lora(ctx: &Ctx) -> Result<CaseResult> {
    let dev = ctx.dev;
    let (m, c, oc, r) = if ctx.opts.tiny { (64, 32, 32, 4) } else { (4096, 384, 384, 8) };
    let s = 16.0 / r as f32;
    let (x_t, x) = upload(dev, &[m, c], 21)?;
    let (w_t, w) = upload(dev, &[oc, c], 22)?;
    let (bias_t, bias) = upload(dev, &[oc], 23)?;
    let (a_t, a) = upload(dev, &[r, c], 24)?;
    let (b_t, bm) = upload(dev, &[oc, r], 25)?;
    let (do_t, dout) = upload(dev, &[m, oc], 26)?;
    let e = |shape: &[usize]| dev.empty(shape, DType::F32);
    let (out_t, h_t, dx_t, dh_t, da_t, db_t) =
        (e(&[m, oc])?, e(&[m, r])?, e(&[m, c])?, e(&[m, r])?, e(&[r, c])?, e(&[oc, r])?);
    let mut ds = lora::lora_forward(dev, &out_t, &h_t, &x_t, &w_t, Some(&bias_t), &a_t, &b_t, s)?;
    ds.extend(lora::lora_backward_input(dev, &dx_t, &dh_t, &do_t, &w_t, &a_t, &b_t, s)?);
    ds.extend(lora::lora_backward_weight(dev, &da_t, &db_t, &dh_t, &do_t, &x_t, &h_t, &b_t, s, false)?);
    let gpu = ctx.gpu(&ds)?;

    let (mut out, mut h, mut dx, mut dh) =
        (vec![0f32; m * oc], vec![0f32; m * r], vec![0f32; m * c], vec![0f32; m * r]);
    let (mut da, mut db) = (vec![0f32; r * c], vec![0f32; oc * r]);
    let p = cpu::all_threads;
    let cpu = ctx.cpu(|| {
        cpu::gemm_f32(m, r, c, &mut h, row(r), false, &x, row(c), &a, trans(c), 1.0, p());
        cpu::gemm_f32(m, oc, c, &mut out, row(oc), false, &x, row(c), &w, trans(c), 1.0, p());
        cpu::gemm_f32(m, oc, r, &mut out, row(oc), true, &h, row(r), &bm, trans(r), s, p());
        for orow in out.chunks_mut(oc) {
            for (o, bv) in orow.iter_mut().zip(&bias) {
                *o += bv;
            }
        }
        cpu::gemm_f32(m, r, oc, &mut dh, row(r), false, &dout, row(oc), &bm, row(r), 1.0, p());
        cpu::gemm_f32(m, c, oc, &mut dx, row(c), false, &dout, row(oc), &w, row(c), 1.0, p());
        cpu::gemm_f32(m, c, r, &mut dx, row(c), true, &dh, row(r), &a, row(c), s, p());
        cpu::gemm_f32(oc, r, m, &mut db, row(r), false, &dout, trans(oc), &h, row(r), s, p());
        cpu::gemm_f32(r, c, m, &mut da, row(c), false, &dh, trans(r), &x, row(c), s, p());
    });
    let flops: f64 = lora_products(m, c, oc, r).iter().map(|&(a, b, k)| 2.0 * (a * b * k) as f64).sum();
    let shape = format!("x [{m},{c}] W [{oc},{c}] r={r} (fwd+bwd, frozen W)");
    Ok(ctx.result("lora_minilm_query", shape, Unit::Gflops, flops, gpu, gemm_label(), cpu))
}

// ------------------------------------------------------------------------------------------------- merge

pub(crate) fn merge(ctx: &Ctx) -> Result<CaseResult> {
    let dev = ctx.dev;
    let n_in = 3;
    let l: usize = if ctx.opts.tiny { 4096 } else { 16 << 20 };
    let weights = [0.5f32, 0.3, 0.2];
    let xs: Vec<Vec<f32>> = (0..n_in).map(|i| fill(l, 31 + i as u64)).collect();
    // The stacked input [3, chunk] must fit one binding (128 MiB on lavapipe): split the length.
    let max_chunk = ((ctx.dev.max_binding() as usize / (4 * n_in)) / 1024 * 1024).max(1024);
    let mut ds = Vec::new();
    let mut start = 0;
    while start < l {
        let len = max_chunk.min(l - start);
        let mut stacked = Vec::with_capacity(n_in * len);
        for x in &xs {
            stacked.extend_from_slice(&x[start..start + len]);
        }
        let xs_t = dev.upload_f32(&stacked, &[n_in, len])?;
        let out_t = dev.empty(&[len], DType::F32)?;
        ds.extend(merge::merge_weighted_sum_forward(dev, &out_t, &xs_t, &weights)?);
        start += len;
    }
    let gpu = ctx.gpu(&ds)?;
    drop(ds);
    let mut out = vec![0f32; l];
    let cpu = ctx.cpu(|| cpu::weighted_sum(&mut out, &xs, &weights));
    let bytes = (4 * (n_in + 1) * l) as f64;
    let shape = format!("{n_in} x {l} f32 -> {l} ({} MB moved)", (bytes / 1e6).round());
    let base = format!("Rust loop (rayon, {} threads)", crate::cpu_threads());
    Ok(ctx.result("merge_weighted_sum", shape, Unit::Gbps, bytes, gpu, base, cpu))
}

// -------------------------------------------------------------------------------------------- train step

fn minilm_config() -> BertConfig {
    BertConfig {
        hidden: 384,
        layers: 6,
        heads: 12,
        intermediate: 1536,
        vocab: 30522,
        max_positions: 512,
        type_vocab: 2,
        eps: 1e-12,
        gelu_tanh: false,
    }
}

fn tiny_config() -> BertConfig {
    BertConfig {
        hidden: 64,
        layers: 2,
        heads: 2,
        intermediate: 128,
        vocab: 100,
        max_positions: 32,
        type_vocab: 2,
        eps: 1e-12,
        gelu_tanh: false,
    }
}

/// A BERT encoder with random weights under Hugging Face names (no checkpoint needed).
fn random_bert(dev: &Device, cfg: &BertConfig) -> Result<ParamStore> {
    let mut store = ParamStore::new();
    let mut seed = 100;
    let mut add = |store: &mut ParamStore, name: &str, shape: &[usize], kind: u8| -> Result<()> {
        seed += 1;
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match kind {
            b'w' => fill(n, seed).into_iter().map(|x| 0.04 * x).collect(),
            b'1' => vec![1.0; n],
            _ => vec![0.0; n],
        };
        store.add_f32(dev, name, &data, shape, false)?;
        Ok(())
    };
    for (name, shape) in rime_models::bert::param_shapes(cfg) {
        let kind = if name.ends_with("LayerNorm.weight") {
            b'1'
        } else if name.ends_with(".bias") {
            b'0'
        } else {
            b'w'
        };
        add(&mut store, &name, &shape, kind)?;
    }
    Ok(store)
}

/// The products and attention calls a LoRA step on a frozen BERT must do (nominal; layernorm, GELU,
/// embeddings, pooling, head and optimizer are left out): (m, n, k) per product, and the attention shape.
fn step_products(cfg: &BertConfig, b: usize, t: usize, r: usize) -> Vec<(usize, usize, usize)> {
    let (m, c, i) = (b * t, cfg.hidden, cfg.intermediate);
    let mut v = Vec::new();
    for layer in 0..cfg.layers {
        // forward: q, k, v, o, up, down; LoRA on q and v
        v.extend([(m, c, c), (m, c, c), (m, c, c), (m, c, c), (m, i, c), (m, c, i)]);
        for _ in 0..2 {
            v.extend([(m, r, c), (m, c, r)]);
        }
        // backward through the frozen linears (no weight gradients): down, up, o; q, k, v except in layer 0,
        // whose input needs no gradient.
        v.extend([(m, i, c), (m, c, i), (m, c, c)]);
        if layer > 0 {
            v.extend([(m, c, c), (m, c, c), (m, c, c)]);
        }
        // LoRA factors of q and v: dh, dB, dA (+ dx through A above layer 0)
        for _ in 0..2 {
            v.extend([(m, r, c), (c, r, m), (r, c, m)]);
            if layer > 0 {
                v.push((m, c, r));
            }
        }
    }
    v
}

/// The CPU lower bound of a step: every product of [`step_products`] through `gemm`, plus attention forward
/// and backward per layer.
fn cpu_step(ctx: &Ctx, cfg: &BertConfig, b: usize, t: usize, r: usize) -> (Stats, f64) {
    let prods = step_products(cfg, b, t, r);
    let big = prods.iter().map(|&(m, n, k)| (m * k).max(k * n).max(m * n)).max().unwrap_or(1);
    let lhs = fill(big, 41);
    let rhs = fill(big, 42);
    let mut dst = vec![0f32; big];
    let hs = cfg.hidden / cfg.heads;
    let att = cpu::Attention { b, t, nh: cfg.heads, hs, scale: 1.0 / (hs as f32).sqrt() };
    let n = b * t * cfg.hidden;
    let (q, k, v, dout) = (fill(n, 43), fill(n, 44), fill(n, 45), fill(n, 46));
    let mask = vec![1f32; b * t];
    let (mut out, mut lse) = (vec![0f32; n], vec![0f32; b * cfg.heads * t]);
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let steps = ctx.opts.runs.clamp(1, 3);
    let stats = measure_cpu(1, steps, || {
        for &(m, nn, kk) in &prods {
            cpu::gemm_f32(m, nn, kk, &mut dst, row(nn), false, &lhs, row(kk), &rhs, row(nn), 1.0, cpu::all_threads());
        }
        for _ in 0..cfg.layers {
            att.forward(&mut out, &mut lse, &q, &k, &v, &mask);
            att.backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &mask);
        }
    });
    let flops = prods.iter().map(|&(m, n, k)| 2.0 * (m * n * k) as f64).sum::<f64>()
        + cfg.layers as f64 * 14.0 * (b * cfg.heads * t * t * hs) as f64;
    (stats, flops)
}

/// CPU time of the calling thread so far, in seconds (Linux; None elsewhere).
fn thread_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}

pub(crate) fn train_step(ctx: &Ctx) -> Result<CaseResult> {
    let dev = ctx.dev;
    let tiny = ctx.opts.tiny;
    let (b, t, r) = if tiny { (2, 16, 4) } else { (32, 128, 8) };
    let found = if tiny { None } else { rime_io::locate_model("all-minilm-l6-v2").ok() };
    let (mut store, cfg, prefix, weights) = match found {
        Some(path) => {
            let (store, cfg, prefix, _tok) = rime_peft::trainer::open_model(dev, &path, t)?;
            (store, cfg, prefix, format!("checkpoint {}", path.display()))
        }
        None => {
            let cfg = if tiny { tiny_config() } else { minilm_config() };
            (random_bert(dev, &cfg)?, cfg, String::new(), "random weights of MiniLM-L6's shapes".to_string())
        }
    };
    classifier::init_head(dev, &mut store, cfg.hidden, 2, 0)?;
    let lcfg = LoraConfig {
        rank: r,
        alpha: 2.0 * r as f32,
        targets: vec!["query".into(), "value".into()],
        rslora: false,
        init: LoraInit::Kaiming,
        seed: 0,
        dropout: 0.0,
        dora: false,
    };
    rime_peft::lora::add_lora(dev, &mut store, &lcfg)?;
    let hook = classifier::hook_for(&Method::Lora(lcfg));
    let optim = OptimConfig::adamw(1e-4, 0.01);
    let mut se = classifier::build_exec(dev, &store, &cfg, &prefix, hook.as_ref(), b, t, Some(optim))?;
    let ids: Vec<u32> = fill(b * t, 51).iter().map(|x| ((x + 1.0) * 0.5 * (cfg.vocab - 1) as f32) as u32).collect();
    let types = vec![0u32; b * t];
    let mask = vec![1u32; b * t];
    let labels: Vec<i32> = (0..b).map(|i| (i % 2) as i32).collect();
    classifier::feed(dev, &se, &ids, &types, &mask, &labels)?;

    let steps = time_steps(ctx, &mut se.exec)?;
    let (cpu, flops) = cpu_step(ctx, &cfg, b, t, r);
    let shape = format!("B={b} T={t} L={} C={} LoRA r={r} q,v + head", cfg.layers, cfg.hidden);
    let base = format!("{}: the step's products + attention only (lower bound of a CPU step)", gemm_label());
    let mut res = ctx.result("train_step_minilm_lora", shape, Unit::Gflops, flops, steps.wall, base, cpu);
    step_extras(ctx, &mut res, &steps, b, &se.exec)?;
    res.extra.insert("weights".into(), weights.into());
    Ok(res)
}

/// A steady training loop's timings ([`time_steps`]).
struct StepTimes {
    wall: Stats,
    kernel: Option<f64>,
    record: Option<f64>,
    outside: Option<f64>,
    host_cpu: Option<f64>,
    loss: Option<f32>,
}

/// Warm up, then run `ctx.opts.train_steps` steps one at a time, as the trainer runs them (each step() waits
/// for the GPU: it reads the previous loss). With timestamps, a marker submitted just before the step and one
/// just after bracket its GPU work; the marker before fires at once, while the step is still being recorded,
/// so the recording time is taken off. The share outside kernels is then 1 - kernel time / wall time of the
/// same step.
fn time_steps(ctx: &Ctx, exec: &mut rime_graph::Executor) -> Result<StepTimes> {
    let dev = ctx.dev;
    for _ in 0..ctx.opts.warmup.max(1) {
        exec.step(dev)?;
    }
    exec.last_loss(dev)?;
    let steps = ctx.opts.train_steps.max(1);
    let set = ctx.timer.marker_set();
    let (mut wall_s, mut record_s, mut kernel_s, mut outside_s) = (vec![], vec![], vec![], vec![]);
    let mut loss = None;
    let cpu0 = thread_cpu_s();
    for _ in 0..steps {
        if let Some(set) = &set {
            ctx.timer.submit_marker(set, 0);
        }
        let r0 = Instant::now();
        exec.step(dev)?; // nothing pending: records and submits without waiting
        let rec = r0.elapsed().as_secs_f64();
        if let Some(set) = &set {
            ctx.timer.submit_marker(set, 1);
        }
        loss = exec.last_loss(dev)?;
        let wall = r0.elapsed().as_secs_f64();
        wall_s.push(wall);
        record_s.push(rec);
        if let Some(set) = &set {
            if let Some(ns) = ctx.timer.read_marker_pair(set)? {
                let k = (ns * 1e-9 - rec).clamp(0.0, wall);
                kernel_s.push(k);
                outside_s.push(1.0 - k / wall);
            }
        }
    }
    let host_cpu = cpu0.and_then(|c0| thread_cpu_s().map(|c1| (c1 - c0) / steps as f64));
    if let Some(l) = loss {
        if !l.is_finite() {
            return Err(Error::Msg(format!("train-step: the loss is {l} (not finite)")));
        }
    }
    let med = |v: Vec<f64>| (!v.is_empty()).then(|| Stats::of(v).median);
    let wall = Stats::of(wall_s);
    let (kernel, record) = (med(kernel_s), med(record_s));
    let outside = match (med(outside_s), host_cpu) {
        (Some(o), _) => Some(o),
        (None, Some(h)) => Some((h / wall.median).clamp(0.0, 1.0)),
        _ => None,
    };
    Ok(StepTimes { wall, kernel, record, outside, host_cpu, loss })
}

/// The training-step cases' extra fields: examples/s (rime and baseline), the step's parts and its kernel
/// profile.
fn step_extras(ctx: &Ctx, res: &mut CaseResult, st: &StepTimes, b: usize, exec: &rime_graph::Executor) -> Result<()> {
    let ms = |x: f64| (x * 1e5).round() / 100.0;
    let baseline_ms = res.baseline_ms;
    let e = &mut res.extra;
    e.insert("examples_per_s".into(), (b as f64 / st.wall.median).into());
    e.insert("baseline_examples_per_s".into(), (b as f64 / baseline_ms * 1e3).into());
    e.insert("step_ms".into(), ms(st.wall.median).into());
    e.insert("kernel_ms".into(), st.kernel.map(ms).into());
    e.insert("record_submit_ms".into(), st.record.map(ms).into());
    e.insert("host_cpu_ms".into(), st.host_cpu.map(ms).into());
    e.insert("outside_kernels_share".into(), st.outside.map(|x| (x * 1e4).round() / 1e4).into());
    e.insert(
        "outside_kernels_method".into(),
        if st.kernel.is_some() { "1 - timestamped GPU time / wall" } else { "calling thread's CPU time / wall" }.into(),
    );
    e.insert("dispatches_per_step".into(), exec.dispatches_per_step().into());
    if let Some(p) = kernel_profile(ctx, exec)? {
        e.insert("profile".into(), p);
    }
    e.insert("loss".into(), st.loss.map(|l| l as f64).into());
    res.timing = "wall per step (steady training loop)";
    Ok(())
}

/// Ladder side-tuning's step from cached states: the side network (reduction 8) over seven [B, T, H] encoder
/// states fed as inputs, the head and AdamW; the encoder does not run (its states are random here, as from a
/// cache). Baseline: the side network's products and attention through `gemm` on the CPU.
pub(crate) fn lst_step(ctx: &Ctx) -> Result<CaseResult> {
    use rime_peft::lst::{self, LstConfig, LstSpec};
    let dev = ctx.dev;
    let tiny = ctx.opts.tiny;
    let (b, t) = if tiny { (2, 16) } else { (32, 128) };
    let cfg = if tiny { tiny_config() } else { minilm_config() };
    let lcfg = LstConfig { reduction: if tiny { 4 } else { 8 }, ..LstConfig::default() };
    let spec = LstSpec::new(lcfg, &cfg, "")?;
    let mut store = ParamStore::new();
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        rime_models::bert::param_shapes(&cfg).into_iter().collect();
    let mut get = |name: &str| -> rime_peft::Result<Vec<f32>> {
        let n: usize = shapes.get(name).map(|s| s.iter().product()).unwrap_or(0);
        Ok(fill(n, 7 + name.len() as u64).into_iter().map(|x| 0.04 * x).collect())
    };
    lst::add_parameters(dev, &mut store, &mut get, &cfg, &spec, 0)?;
    classifier::init_head(dev, &mut store, cfg.hidden, 2, 0)?;
    let optim = OptimConfig::adamw(1e-3, 0.01);
    let mut se = lst::build_side_exec(dev, &store, &spec, b, t, Some(optim), None)?;
    let states = spec.states();
    let bufs: Vec<Vec<f32>> = states.iter().map(|&s| fill(b * t * cfg.hidden, 60 + s as u64)).collect();
    let mask = vec![1u32; b * t];
    lst::feed_side_inputs(dev, &se.exec, &spec, &bufs, &mask, b, t)?;
    let labels: Vec<i32> = (0..b).map(|i| (i % 2) as i32).collect();
    se.exec.feed_i32(dev, "labels", &labels)?;
    let steps = time_steps(ctx, &mut se.exec)?;
    let (cpu, flops) = cpu_lst_step(ctx, &cfg, &spec, b, t);
    let d = spec.dims.side;
    let shape = format!(
        "B={b} T={t} H={} side width {d} ({} layers, {} heads), {} states",
        cfg.hidden,
        spec.cfg.kept_layers(cfg.layers).len(),
        spec.dims.heads,
        states.len()
    );
    let base = format!("{}: the side network's products + attention only", gemm_label());
    let mut res = ctx.result("train_step_minilm_lst", shape, Unit::Gflops, flops, steps.wall, base, cpu);
    step_extras(ctx, &mut res, &steps, b, &se.exec)?;
    res.extra.insert("weights".into(), "random side network and states of MiniLM-L6's shapes".into());
    Ok(res)
}

/// The products a side-network step must do (nominal): the downsamplers (forward and weight gradient; no
/// gradient enters the states), each side layer's six linears (forward, input and weight gradients) and the
/// upsampler.
fn lst_products(h: usize, d: usize, f: usize, m: usize, states: usize, layers: usize) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for _ in 0..states {
        v.extend([(m, d, h), (d, h, m)]);
    }
    for _ in 0..layers {
        for (o, i) in [(d, d), (d, d), (d, d), (d, d), (f, d), (d, f)] {
            v.extend([(m, o, i), (m, i, o), (o, i, m)]);
        }
    }
    v.extend([(m, h, d), (m, d, h), (h, d, m)]);
    v
}

fn cpu_lst_step(ctx: &Ctx, cfg: &BertConfig, spec: &rime_peft::lst::LstSpec, b: usize, t: usize) -> (Stats, f64) {
    let (d, f, heads) = (spec.dims.side, spec.dims.intermediate, spec.dims.heads);
    let layers = spec.cfg.kept_layers(cfg.layers).len();
    let prods = lst_products(cfg.hidden, d, f, b * t, spec.states().len(), layers);
    let big = prods.iter().map(|&(m, n, k)| (m * k).max(k * n).max(m * n)).max().unwrap_or(1);
    let lhs = fill(big, 41);
    let rhs = fill(big, 42);
    let mut dst = vec![0f32; big];
    let hs = d / heads;
    let att = cpu::Attention { b, t, nh: heads, hs, scale: 1.0 / (hs as f32).sqrt() };
    let n = b * t * d;
    let (q, k, v, dout) = (fill(n, 43), fill(n, 44), fill(n, 45), fill(n, 46));
    let mask = vec![1f32; b * t];
    let (mut out, mut lse) = (vec![0f32; n], vec![0f32; b * heads * t]);
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let steps = ctx.opts.runs.clamp(1, 3);
    let stats = measure_cpu(1, steps, || {
        for &(m, nn, kk) in &prods {
            cpu::gemm_f32(m, nn, kk, &mut dst, row(nn), false, &lhs, row(kk), &rhs, row(nn), 1.0, cpu::all_threads());
        }
        for _ in 0..layers {
            att.forward(&mut out, &mut lse, &q, &k, &v, &mask);
            att.backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &mask);
        }
    });
    let flops = prods.iter().map(|&(m, n, k)| 2.0 * (m * n * k) as f64).sum::<f64>()
        + layers as f64 * 14.0 * (b * heads * t * t * hs) as f64;
    (stats, flops)
}

/// Where a training step's kernel time goes: one step with each dispatch timed on its own, summed per kernel
/// entry point, largest first (`[{kernel, calls, ms, share}]`). `None` without timestamp queries.
fn kernel_profile(ctx: &Ctx, exec: &rime_graph::Executor) -> Result<Option<serde_json::Value>> {
    let ds: Vec<&Dispatch> = exec.step_dispatches().collect();
    let Some(times) = ctx.timer.profile(&ds)? else { return Ok(None) };
    if std::env::var("RIME_PROFILE_DUMP").is_ok() {
        for (d, t) in ds.iter().zip(&times) {
            eprintln!("PROF {} {:?} {:.3}", d.label, d.workgroups(), t * 1e3);
        }
    }
    let mut by: Vec<(String, usize, f64)> = Vec::new();
    for (d, t) in ds.iter().zip(&times) {
        match by.iter_mut().find(|(k, _, _)| *k == d.label) {
            Some(row) => {
                row.1 += 1;
                row.2 += t;
            }
            None => by.push((d.label.clone(), 1, *t)),
        }
    }
    by.sort_by(|a, b| b.2.total_cmp(&a.2));
    let total: f64 = times.iter().sum();
    let rows = by
        .into_iter()
        .map(|(k, n, t)| {
            serde_json::json!({
                "kernel": k,
                "calls": n,
                "ms": (t * 1e5).round() / 100.0,
                "share": if total > 0.0 { (t / total * 1e4).round() / 1e4 } else { 0.0 },
            })
        })
        .collect();
    Ok(Some(serde_json::Value::Array(rows)))
}
