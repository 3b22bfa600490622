//! Generation with a KV cache. The training graph recomputes every position; generating one token at a time
//! that way costs O(T²). [`Decoder`] instead keeps the rotated keys and the values of every layer in cache
//! buffers [1, S_max, NKV, HS] and records the kernels directly, walking the one Llama definition
//! ([`crate::llama::define`]) with a recorder that writes each value into a fixed scratch buffer: a prompt
//! chunk of T tokens runs with causal attention over the cache prefix [1, pos + T, ..]; one decoded token
//! attends over the whole cache with a padding mask [1, S_max] marking the filled positions, so its dispatches
//! are built once and replayed. Scratch buffers are shared by all layers (the layers run in order), and each
//! step is one submit. Only the last position's logits are computed and read back. A LoRA or DoRA adapter
//! whose factors are in the store ([`crate::lora`]) is applied by the adapted linears on the GPU.
//! For Gemma 3 the sliding layers attend causally within their window during the prompt, and under a second
//! padding mask that keeps only the last `window` positions when decoding; their RoPE uses the local base.

use std::collections::HashMap;
use std::sync::Arc;

use rime_graph::ParamStore;

use rime_kernels::ops::{attention, concat, elementwise, embedding, lora, matmul, norm, rope};
use rime_kernels::{wgpu, DType, Device, Dispatch, Tensor};

use crate::llama::{define, lm_head_name, row_parts, Block, Error, LlamaConfig, LlamaOps, Proj, Result};
use crate::lora::factor_name;

/// A LoRA adapter on one linear, applied on the GPU (see [`crate::lora`]): y = W·x + sB·(A·x), then for
/// DoRA y ⊙ g.
struct Adapted {
    a: Tensor,
    sb: Tensor,
    g: Option<Tensor>,
}

/// Buffers of one chunk size T (activations of one layer at a time); the linears' outputs are [T, features].
struct Scratch {
    ids: Tensor,  // [T] U32
    x: Tensor,    // [T, C] residual stream
    h: Tensor,    // [T, C]
    rstd: Tensor, // [T]
    q: Tensor,    // [T, NH·HS]
    k: Tensor,    // [T, NKV·HS]
    q4: Tensor,   // q (Gemma: q normed per head) as [1, T, NH, HS] (RoPE's input)
    k4: Tensor,   // k (Gemma: k normed) as [1, T, NKV, HS]
    /// Gemma: q and k after their per-head RMSNorm, and its rstd scratch [T·max(NH, NKV)].
    qn: Option<Tensor>,
    kn: Option<Tensor>,
    rstd_h: Option<Tensor>,
    v: Tensor,      // [T, NKV·HS]
    qr: Tensor,     // [1, T, NH, HS]
    kr: Tensor,     // [1, T, NKV, HS]
    att: Tensor,    // [T, NH·HS]
    lse: Tensor,    // [1, NH, T]
    o: Tensor,      // [T, C]
    gate: Tensor,   // [T, I]
    up: Tensor,     // [T, I]
    act: Tensor,    // [T, I]
    x_last: Tensor, // [1, C]
    h_last: Tensor, // [1, C]
    rstd1: Tensor,  // [1]
    logits: Tensor, // [1, V]
    /// One part of the logits when the head is split by rows ([1, largest part]).
    logits_part: Option<Tensor>,
    /// A·x of an adapted linear ([T, r] views), and its output before DoRA's scale ([T, out] views).
    lora_h: Option<Tensor>,
    dora_y: Option<Tensor>,
}

/// Where a value of the decode pass lives (the recorder's [`LlamaOps::V`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    X,
    H,
    Q,
    K,
    V,
    Qn,
    Kn,
    Att,
    O,
    Gate,
    Up,
    HLast,
    Logits,
}

impl Scratch {
    fn slot(&self, s: Slot) -> &Tensor {
        match s {
            Slot::Qn => self.qn.as_ref().unwrap_or(&self.h),
            Slot::Kn => self.kn.as_ref().unwrap_or(&self.h),
            Slot::X => &self.x,
            Slot::H => &self.h,
            Slot::Q => &self.q,
            Slot::K => &self.k,
            Slot::V => &self.v,
            Slot::Att => &self.att,
            Slot::O => &self.o,
            Slot::Gate => &self.gate,
            Slot::Up => &self.up,
            Slot::HLast => &self.h_last,
            Slot::Logits => &self.logits,
        }
    }
}

/// The buffer a projection writes.
fn output_slot(p: Proj) -> Slot {
    match p {
        Proj::Q => Slot::Q,
        Proj::K => Slot::K,
        Proj::V => Slot::V,
        Proj::O | Proj::Down => Slot::O,
        Proj::Gate => Slot::Gate,
        Proj::Up => Slot::Up,
        Proj::Head => Slot::Logits,
    }
}

enum Item {
    D(Dispatch),
    /// The RoPE of q or k, built per step because the position is one of its parameters; `local`: with
    /// Gemma's sliding-layer base.
    RopeQ {
        local: bool,
    },
    RopeK {
        local: bool,
    },
    /// A buffer copy; `dst_off + pos * dst_pos_stride` is where it lands.
    Copy {
        src: Arc<wgpu::Buffer>,
        src_off: u64,
        dst: Arc<wgpu::Buffer>,
        dst_off: u64,
        dst_pos_stride: u64,
        size: u64,
    },
}

struct Plan {
    scratch: Scratch,
    items: Vec<Item>,
}

/// A Llama model ready to generate: weights (shared with the store), adapters, KV cache, the replayable
/// decode plan.
pub struct Decoder {
    cfg: LlamaConfig,
    max_seq: usize,
    len: usize,
    weights: HashMap<String, Tensor>,
    /// Weights split by rows (see [`crate::llama::upload_split`]): name -> (part, first row) in order.
    parts: HashMap<String, Vec<(Tensor, u32)>>,
    head: &'static str,
    adapters: HashMap<String, Adapted>,
    k_cache: Vec<Tensor>,
    v_cache: Vec<Tensor>,
    mask: Tensor,
    /// Gemma: the decode-step mask of the sliding layers (the last `window` cached positions).
    mask_local: Option<Tensor>,
    decode: Option<Plan>,
    staging: wgpu::Buffer,
}

/// Prompt chunks above this many tokens run in several steps (bounds the scratch buffers).
const MAX_CHUNK: usize = 256;

/// [`LlamaOps`] that only lists the weights and linear modules the model reads.
#[derive(Default)]
struct Names {
    weights: Vec<String>,
    modules: Vec<String>,
}

impl LlamaOps for Names {
    type V = ();
    type E = Error;
    fn embed(&mut self, weight: &str) -> Result<()> {
        self.weights.push(weight.into());
        Ok(())
    }
    fn rmsnorm(&mut self, _: (), weight: &str) -> Result<()> {
        self.embed(weight)
    }
    fn linear(&mut self, _: (), module: &str, weight: &str, _: Proj) -> Result<()> {
        self.modules.push(module.into());
        self.embed(weight)
    }
    fn attention(&mut self, _: usize, _: (), _: (), _: ()) -> Result<()> {
        Ok(())
    }
    fn silu_mul(&mut self, _: usize, _: (), _: ()) -> Result<()> {
        Ok(())
    }
    fn gelu_mul(&mut self, _: usize, _: (), _: ()) -> Result<()> {
        Ok(())
    }
    fn scale(&mut self, _: (), _: f32) -> Result<()> {
        Ok(())
    }
    fn head_norm(&mut self, _: usize, _: (), weight: &str, _: usize) -> Result<()> {
        self.embed(weight)
    }
    fn residual(&mut self, _: usize, _: Block, _: (), _: (), _: ()) -> Result<()> {
        Ok(())
    }
    fn final_norm(&mut self, _: (), weight: &str) -> Result<()> {
        self.embed(weight)
    }
}

/// The adapter of each linear module that has one in `store` (tensors named by [`factor_name`]).
fn adapters_in(store: &ParamStore, modules: &[String]) -> Result<HashMap<String, Adapted>> {
    let get = |name: &str| store.find(name).map(|id| store.get(id).tensor.clone());
    let mut out = HashMap::new();
    for m in modules {
        match (get(&factor_name(m, "A")), get(&factor_name(m, "sB"))) {
            (Some(a), Some(sb)) => {
                out.insert(m.clone(), Adapted { a, sb, g: get(&factor_name(m, "g")) });
            }
            (None, None) => {}
            _ => return Err(Error::Invalid(format!("module `{m}`: the store holds only one of its LoRA factors"))),
        }
    }
    Ok(out)
}

impl Decoder {
    /// A decoder over the weights in `store` (HF names, see [`crate::llama`]) for sequences of up to `max_seq`
    /// tokens (prompt and generated). A LoRA adapter whose factors are in the store (as
    /// [`crate::llama::load_gguf`] puts them) is applied on the GPU.
    pub fn new(dev: &Device, store: &ParamStore, cfg: &LlamaConfig, max_seq: usize) -> Result<Decoder> {
        if max_seq == 0 || max_seq > cfg.max_positions {
            return Err(Error::Invalid(format!(
                "max sequence {max_seq} must be between 1 and max_position_embeddings {}",
                cfg.max_positions
            )));
        }
        let head = lm_head_name(store, cfg);
        let mut names = Names::default();
        define(&mut names, cfg, Some(head))?;
        let mut weights = HashMap::new();
        let mut parts = HashMap::new();
        for n in names.weights {
            if store.find(&n).is_none() {
                if let Some(ps) = row_parts(store, &n) {
                    let ts = ps.iter().map(|(p, off)| -> Result<(Tensor, u32)> {
                        Ok((store.get(store.id(p)?).tensor.clone(), *off))
                    });
                    parts.insert(n, ts.collect::<Result<Vec<_>>>()?);
                    continue;
                }
            }
            let t = store.get(store.id(&n)?).tensor.clone();
            weights.insert(n, t);
        }
        let (nkv, hs) = (cfg.kv_heads, cfg.head_dim());
        let mut k_cache = Vec::with_capacity(cfg.layers);
        let mut v_cache = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            k_cache.push(dev.zeros(&[1, max_seq, nkv, hs], DType::F32)?);
            v_cache.push(dev.zeros(&[1, max_seq, nkv, hs], DType::F32)?);
        }
        let staging = dev.wgpu_device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("rime logits readback"),
            size: (cfg.vocab * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Decoder {
            cfg: cfg.clone(),
            max_seq,
            len: 0,
            weights,
            parts,
            head,
            adapters: adapters_in(store, &names.modules)?,
            k_cache,
            v_cache,
            mask: dev.zeros(&[1, max_seq], DType::F32)?,
            mask_local: match cfg.gemma {
                Some(_) => Some(dev.zeros(&[1, max_seq], DType::F32)?),
                None => None,
            },
            decode: None,
            staging,
        })
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }
    /// Linear modules a LoRA adapter adapts.
    pub fn adapted_modules(&self) -> Vec<String> {
        let mut v: Vec<String> = self.adapters.keys().cloned().collect();
        v.sort();
        v
    }

    /// Forget the cached sequence.
    pub fn reset(&mut self, dev: &Device) -> Result<()> {
        self.len = 0;
        dev.write_f32(&self.mask, &vec![0.0; self.max_seq])?;
        if let Some(m) = &self.mask_local {
            dev.write_f32(m, &vec![0.0; self.max_seq])?;
        }
        Ok(())
    }

    /// Scratch for the adapters of a chunk of `t` tokens: the largest A·x ([t, r]) and, if any module is DoRA,
    /// the largest pre-scale output ([t, out]; one row for the head).
    fn adapter_scratch(&self, dev: &Device, t: usize) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rows = |m: &str| if m == Proj::Head.module() { 1 } else { t };
        let h = self.adapters.iter().map(|(m, a)| rows(m) * a.a.shape[0]).max();
        let y = self.adapters.iter().filter(|(_, a)| a.g.is_some()).map(|(m, a)| rows(m) * a.sb.shape[0]).max();
        let f = |n: Option<usize>| n.map(|n| dev.empty(&[n], DType::F32)).transpose();
        Ok((f(h)?, f(y)?))
    }

    fn scratch(&self, dev: &Device, t: usize) -> Result<Scratch> {
        let c = &self.cfg;
        let (nh, nkv, hs, i) = (c.heads, c.kv_heads, c.head_dim(), c.intermediate);
        let f = |s: &[usize]| dev.empty(s, DType::F32);
        let (lora_h, dora_y) = self.adapter_scratch(dev, t)?;
        let (q, k) = (f(&[t, nh * hs])?, f(&[t, nkv * hs])?);
        let gemma = c.gemma.is_some();
        let (qn, kn, rstd_h) = if gemma {
            (Some(f(&[t, nh * hs])?), Some(f(&[t, nkv * hs])?), Some(f(&[t * nh.max(nkv)])?))
        } else {
            (None, None, None)
        };
        let (q4, k4) = (qn.as_ref().unwrap_or(&q), kn.as_ref().unwrap_or(&k));
        Ok(Scratch {
            ids: dev.empty(&[t], DType::U32)?,
            x: f(&[t, c.hidden])?,
            h: f(&[t, c.hidden])?,
            rstd: f(&[t])?,
            q4: q4.view(&[1, t, nh, hs], DType::F32),
            k4: k4.view(&[1, t, nkv, hs], DType::F32),
            qn,
            kn,
            rstd_h,
            q,
            k,
            v: f(&[t, nkv * hs])?,
            qr: f(&[1, t, nh, hs])?,
            kr: f(&[1, t, nkv, hs])?,
            att: f(&[t, nh * hs])?,
            lse: f(&[1, nh, t])?,
            o: f(&[t, c.hidden])?,
            gate: f(&[t, i])?,
            up: f(&[t, i])?,
            act: f(&[t, i])?,
            x_last: f(&[1, c.hidden])?,
            h_last: f(&[1, c.hidden])?,
            rstd1: f(&[1])?,
            logits: f(&[1, c.vocab])?,
            logits_part: match self.parts.get(self.head) {
                Some(ps) => Some(f(&[1, ps.iter().map(|(t, _)| t.shape[0]).max().unwrap_or(1)])?),
                None => None,
            },
            lora_h,
            dora_y,
        })
    }

    /// The kernels of one chunk of `t` tokens, recorded from [`define`]. `prefix`: Some(pos + t) attends
    /// causally over that cache prefix (prompt chunks); None attends over the whole cache under the padding
    /// mask (one decoded token).
    fn plan(&self, dev: &Device, t: usize, prefix: Option<usize>) -> Result<Plan> {
        let scratch = self.scratch(dev, t)?;
        let mut rec = Recorder { dec: self, dev, s: &scratch, t, prefix, items: Vec::new() };
        define(&mut rec, &self.cfg, Some(self.head))?;
        let items = rec.items;
        Ok(Plan { scratch, items })
    }

    /// Record and submit one chunk at position `pos`, then read back the last position's logits.
    fn execute(&self, dev: &Device, plan: &Plan, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let s = &plan.scratch;
        let theta = self.cfg.rope_theta;
        let rq = rope::rope_forward(dev, &s.qr, &s.q4, pos as u32, theta)?;
        let rk = rope::rope_forward(dev, &s.kr, &s.k4, pos as u32, theta)?;
        let (rq_local, rk_local) = match &self.cfg.gemma {
            Some(g) => (
                rope::rope_forward(dev, &s.qr, &s.q4, pos as u32, g.rope_local_theta)?,
                rope::rope_forward(dev, &s.kr, &s.k4, pos as u32, g.rope_local_theta)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        let q = dev.queue();
        q.write_buffer(&s.ids.buffer, 0, bytemuck::cast_slice(tokens));
        let ones = vec![1.0f32; tokens.len()];
        q.write_buffer(&self.mask.buffer, (pos * 4) as u64, bytemuck::cast_slice(&ones));
        if let (Some(m), Some(g)) = (&self.mask_local, &self.cfg.gemma) {
            // the sliding layers' decode mask: the last `window` positions of the cache after this chunk
            let end = pos + tokens.len();
            let local: Vec<f32> =
                (0..self.max_seq).map(|j| if j < end && j + g.sliding_window >= end { 1.0 } else { 0.0 }).collect();
            q.write_buffer(&m.buffer, 0, bytemuck::cast_slice(&local));
        }
        let mut enc =
            dev.wgpu_device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rime decode") });
        let mut i = 0;
        let items = &plan.items;
        while i < items.len() {
            if let Item::Copy { src, src_off, dst, dst_off, dst_pos_stride, size } = &items[i] {
                enc.copy_buffer_to_buffer(src, *src_off, dst, dst_off + pos as u64 * dst_pos_stride, *size);
                i += 1;
                continue;
            }
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("rime decode"),
                timestamp_writes: None,
            });
            while i < items.len() {
                match &items[i] {
                    Item::D(d) => d.record(&mut pass),
                    Item::RopeQ { local: false } => rq.iter().for_each(|d| d.record(&mut pass)),
                    Item::RopeK { local: false } => rk.iter().for_each(|d| d.record(&mut pass)),
                    Item::RopeQ { local: true } => rq_local.iter().for_each(|d| d.record(&mut pass)),
                    Item::RopeK { local: true } => rk_local.iter().for_each(|d| d.record(&mut pass)),
                    Item::Copy { .. } => break,
                }
                i += 1;
            }
        }
        enc.copy_buffer_to_buffer(&s.logits.buffer, 0, &self.staging, 0, (self.cfg.vocab * 4) as u64);
        q.submit([enc.finish()]);
        let bytes = dev.map_read(&self.staging)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes[..self.cfg.vocab * 4]))
    }

    fn check_room(&self, n: usize) -> Result<()> {
        if self.len + n > self.max_seq {
            return Err(Error::Invalid(format!(
                "{} cached + {n} new tokens exceed the decoder's maximum sequence of {}",
                self.len, self.max_seq
            )));
        }
        Ok(())
    }

    fn check_ids(&self, tokens: &[u32]) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.cfg.vocab) {
            return Err(Error::Invalid(format!("token id {bad} is outside the vocabulary of {}", self.cfg.vocab)));
        }
        Ok(())
    }

    /// Append prompt tokens (causal attention over everything cached) and return the logits \[V\] that
    /// predict the token after the last one.
    pub fn prefill(&mut self, dev: &Device, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::Invalid("prefill needs at least one token".into()));
        }
        self.check_ids(tokens)?;
        self.check_room(tokens.len())?;
        let mut logits = Vec::new();
        for chunk in tokens.chunks(MAX_CHUNK) {
            let pos = self.len;
            let plan = self.plan(dev, chunk.len(), Some(pos + chunk.len()))?;
            logits = self.execute(dev, &plan, chunk, pos)?;
            self.len += chunk.len();
        }
        Ok(logits)
    }

    /// Append one token and return the logits \[V\] for the next.
    pub fn decode(&mut self, dev: &Device, token: u32) -> Result<Vec<f32>> {
        self.check_ids(&[token])?;
        self.check_room(1)?;
        if self.decode.is_none() {
            self.decode = Some(self.plan(dev, 1, None)?);
        }
        let plan = self.decode.as_ref().ok_or_else(|| Error::Invalid("decode plan".into()))?;
        let logits = self.execute(dev, plan, &[token], self.len)?;
        self.len += 1;
        Ok(logits)
    }
}

/// [`LlamaOps`] for the KV-cache decoder: records the kernels of one chunk into fixed scratch buffers.
struct Recorder<'a> {
    dec: &'a Decoder,
    dev: &'a Device,
    s: &'a Scratch,
    t: usize,
    prefix: Option<usize>,
    items: Vec<Item>,
}

impl Recorder<'_> {
    fn push(&mut self, ds: Vec<Dispatch>) {
        self.items.extend(ds.into_iter().map(Item::D));
    }

    fn weight(&self, name: &str) -> Result<&Tensor> {
        self.dec.weights.get(name).ok_or_else(|| Error::Invalid(format!("decoder has no weight `{name}`")))
    }

    /// Copies `size` bytes of `src` from `src_off` into `dst` at `dst_off + pos * dst_pos_stride`.
    fn copy(&mut self, src: &Tensor, src_off: u64, dst: &Tensor, dst_pos_stride: u64, size: u64) {
        let (src, dst) = (src.buffer.clone(), dst.buffer.clone());
        self.items.push(Item::Copy { src, src_off, dst, dst_off: 0, dst_pos_stride, size });
    }

    /// out = x·Wᵀ + sB·(A·x) (⊙ g for DoRA) for an adapted linear.
    fn adapted(&self, out: &Tensor, x: &Tensor, w: &Tensor, ad: &Adapted) -> Result<Vec<Dispatch>> {
        let (dev, rows) = (self.dev, x.rows());
        let scratch = |t: &Option<Tensor>, cols: usize| {
            t.as_ref()
                .map(|t| t.view(&[rows, cols], DType::F32))
                .ok_or_else(|| Error::Invalid("adapter scratch".into()))
        };
        let h = scratch(&self.s.lora_h, ad.a.shape[0])?;
        let Some(g) = &ad.g else {
            return Ok(lora::lora_forward(dev, out, &h, x, w, None, &ad.a, &ad.sb, 1.0)?);
        };
        let y = scratch(&self.s.dora_y, out.last_dim())?;
        let mut ds = lora::lora_forward(dev, &y, &h, x, w, None, &ad.a, &ad.sb, 1.0)?;
        ds.extend(elementwise::mul_forward(dev, out, &y, g)?);
        Ok(ds)
    }
}

impl LlamaOps for Recorder<'_> {
    type V = Slot;
    type E = Error;

    fn embed(&mut self, weight: &str) -> Result<Slot> {
        let s = self.s;
        if let Some(ps) = self.dec.parts.get(weight) {
            // a table split by rows: the first part writes x, each other one adds its rows through h
            for (k, (t, off)) in ps.iter().enumerate() {
                let out = if k == 0 { &s.x } else { &s.h };
                let mut ds = embedding::embedding_forward_offset(self.dev, out, &s.ids, t, *off)?;
                if k > 0 {
                    ds.extend(elementwise::add_inplace_forward(self.dev, &s.x, &s.h, 1.0)?);
                }
                self.push(ds);
            }
            return Ok(Slot::X);
        }
        let ds = embedding::embedding_forward(self.dev, &s.x, &s.ids, self.weight(weight)?)?;
        self.push(ds);
        Ok(Slot::X)
    }

    fn rmsnorm(&mut self, x: Slot, weight: &str) -> Result<Slot> {
        let s = self.s;
        let ds = norm::rmsnorm_forward(self.dev, &s.h, &s.rstd, s.slot(x), self.weight(weight)?, self.dec.cfg.eps)?;
        self.push(ds);
        Ok(Slot::H)
    }

    fn linear(&mut self, x: Slot, module: &str, weight: &str, proj: Proj) -> Result<Slot> {
        let (s, out) = (self.s, output_slot(proj));
        if let Some(ps) = self.dec.parts.get(weight) {
            // a weight split by rows (the output head of a large vocabulary): each part's product, then its
            // columns of the output
            if self.dec.adapters.contains_key(module) {
                return Err(Error::Invalid(format!(
                    "`{module}`: an adapter on a weight split by rows is not supported"
                )));
            }
            let part =
                s.logits_part.as_ref().filter(|_| proj == Proj::Head).ok_or_else(|| {
                    Error::Invalid(format!("`{weight}` is split by rows; only the output head may be"))
                })?;
            let rows = s.slot(x).rows();
            for (t, off) in ps {
                let pv = part.view(&[rows, t.shape[0]], DType::F32);
                let mut ds = matmul::matmul_forward(self.dev, &pv, s.slot(x), t, None, false, true)?;
                ds.extend(concat::concat_cols(self.dev, s.slot(out), &pv, *off as usize)?);
                self.push(ds);
            }
            return Ok(out);
        }
        let w = self.weight(weight)?;
        let ds = match self.dec.adapters.get(module) {
            Some(ad) => self.adapted(s.slot(out), s.slot(x), w, ad)?,
            None => matmul::matmul_forward(self.dev, s.slot(out), s.slot(x), w, None, false, true)?,
        };
        self.push(ds);
        Ok(out)
    }

    fn attention(&mut self, layer: usize, q: Slot, k: Slot, v: Slot) -> Result<Slot> {
        let (s, dec, t) = (self.s, self.dec, self.t);
        let (nh, nkv, hs) = (dec.cfg.heads, dec.cfg.kv_heads, dec.cfg.head_dim());
        let want = if dec.cfg.gemma.is_some() { (Slot::Qn, Slot::Kn, Slot::V) } else { (Slot::Q, Slot::K, Slot::V) };
        if (q, k, v) != want {
            return Err(Error::Invalid(format!("attention of layer {layer} reads {q:?}, {k:?}, {v:?}")));
        }
        // RoPE (recorded per step: the position is one of its parameters), then the rotated keys and the
        // values appended to the cache at the chunk's position.
        let window = dec.cfg.window(layer);
        let local = dec.cfg.rope_theta_at(layer) != dec.cfg.rope_theta;
        self.items.push(Item::RopeQ { local });
        self.items.push(Item::RopeK { local });
        let row = (nkv * hs * 4) as u64;
        let (kc, vc) = (&dec.k_cache[layer], &dec.v_cache[layer]);
        self.copy(&s.kr, 0, kc, row, row * t as u64);
        self.copy(&s.v, 0, vc, row, row * t as u64);
        let att = s.att.view(&[1, t, nh, hs], DType::F32);
        let scale = dec.cfg.attn_scale();
        let ds = match self.prefix {
            Some(n) => {
                let view = |b: &Tensor| b.view(&[1, n, nkv, hs], DType::F32);
                let (kv, vv) = (view(kc), view(vc));
                attention::attention_forward_window(self.dev, &att, &s.lse, &s.qr, &kv, &vv, None, true, scale, window)?
            }
            None => {
                let mask = match (&dec.mask_local, window) {
                    (Some(m), w) if w > 0 => m,
                    _ => &dec.mask,
                };
                attention::attention_forward(self.dev, &att, &s.lse, &s.qr, kc, vc, Some(mask), false, scale)?
            }
        };
        self.push(ds);
        Ok(Slot::Att)
    }

    fn silu_mul(&mut self, _: usize, gate: Slot, up: Slot) -> Result<Slot> {
        let s = self.s;
        let mut ds = elementwise::silu_forward(self.dev, &s.act, s.slot(gate))?;
        ds.extend(elementwise::mul_forward(self.dev, s.slot(gate), &s.act, s.slot(up))?);
        self.push(ds);
        Ok(gate)
    }

    fn gelu_mul(&mut self, _: usize, gate: Slot, up: Slot) -> Result<Slot> {
        let s = self.s;
        let mut ds = elementwise::gelu_forward(self.dev, &s.act, s.slot(gate), true)?;
        ds.extend(elementwise::mul_forward(self.dev, s.slot(gate), &s.act, s.slot(up))?);
        self.push(ds);
        Ok(gate)
    }

    fn scale(&mut self, x: Slot, f: f32) -> Result<Slot> {
        // out of place into h, then copied back (the kernels do not bind one buffer twice)
        let (s, t, c) = (self.s, self.t, self.dec.cfg.hidden);
        let ds = elementwise::scale_forward(self.dev, &s.h, s.slot(x), f)?;
        self.push(ds);
        self.copy(&s.h, 0, s.slot(x), 0, (t * c * 4) as u64);
        Ok(x)
    }

    fn head_norm(&mut self, layer: usize, x: Slot, weight: &str, heads: usize) -> Result<Slot> {
        let (s, t, hs) = (self.s, self.t, self.dec.cfg.head_dim());
        let (out, slot) = match (x, &s.qn, &s.kn) {
            (Slot::Q, Some(qn), _) => (qn, Slot::Qn),
            (Slot::K, _, Some(kn)) => (kn, Slot::Kn),
            _ => return Err(Error::Invalid(format!("head norm of layer {layer} reads {x:?}"))),
        };
        let rstd = s.rstd_h.as_ref().ok_or_else(|| Error::Invalid("head norm scratch".into()))?;
        let rows = t * heads;
        let v = |b: &Tensor| b.view(&[rows, hs], DType::F32);
        let ds = norm::rmsnorm_forward(
            self.dev,
            &v(out),
            &rstd.view(&[rows], DType::F32),
            &v(s.slot(x)),
            self.weight(weight)?,
            self.dec.cfg.eps,
        )?;
        self.push(ds);
        Ok(slot)
    }

    fn residual(&mut self, _: usize, _: Block, x: Slot, _: Slot, y: Slot) -> Result<Slot> {
        let ds = elementwise::add_inplace_forward(self.dev, self.s.slot(x), self.s.slot(y), 1.0)?;
        self.push(ds);
        Ok(x)
    }

    fn final_norm(&mut self, x: Slot, weight: &str) -> Result<Slot> {
        let (s, t, c) = (self.s, self.t, self.dec.cfg.hidden);
        self.copy(s.slot(x), ((t - 1) * c * 4) as u64, &s.x_last, 0, (c * 4) as u64);
        let ds =
            norm::rmsnorm_forward(self.dev, &s.h_last, &s.rstd1, &s.x_last, self.weight(weight)?, self.dec.cfg.eps)?;
        self.push(ds);
        Ok(Slot::HLast)
    }
}

/// Index of the largest logit (the first on ties, as torch.argmax); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Refuses logits holding NaN or ±Inf (weights or an adapter that overflow): greedy decoding would pick a
/// token from them and print garbage; `step` counts the tokens generated before.
pub fn check_logits(logits: &[f32], step: usize) -> Result<()> {
    let Some(i) = logits.iter().position(|x| !x.is_finite()) else { return Ok(()) };
    let count = logits.iter().filter(|x| !x.is_finite()).count();
    Err(Error::Invalid(format!(
        "the logits after {step} generated token(s) hold {count} non-finite value(s) of {} (first: {} for token id \
         {i}); the model's weights or adapter produce NaN/Inf",
        logits.len(),
        logits[i]
    )))
}

/// What a generation did.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub stopped_at_eos: bool,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl GenStats {
    /// Decoded tokens per second (the first generated token comes from the prefill and is not counted).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let n = self.generated.len().saturating_sub(1);
        if self.decode_secs > 0.0 {
            n as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

/// Greedy decoding: prefill `prompt`, then pick the argmax token until an `eos` token, `max_new` tokens or the
/// cache is full. `on_token` sees each token as it is chosen (an eos token is not passed).
pub fn generate_greedy(
    dev: &Device,
    dec: &mut Decoder,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<GenStats> {
    let mut st = GenStats { prompt_tokens: prompt.len(), ..Default::default() };
    if max_new == 0 {
        return Err(Error::Invalid("max_new_tokens must be at least 1".into()));
    }
    let t0 = std::time::Instant::now();
    let mut logits = dec.prefill(dev, prompt)?;
    st.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    loop {
        check_logits(&logits, st.generated.len())?;
        let next = argmax(&logits);
        if eos.contains(&next) {
            st.stopped_at_eos = true;
            break;
        }
        st.generated.push(next);
        on_token(next)?;
        if st.generated.len() >= max_new || dec.len() >= dec.max_seq() {
            break;
        }
        logits = dec.decode(dev, next)?;
    }
    st.decode_secs = t1.elapsed().as_secs_f64();
    Ok(st)
}

/// One message of a conversation in the OpenAI / Hugging Face chat format (`{"role": ..., "content": ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (the template decides what it accepts).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// Renders a Hugging Face chat template (Jinja, through minijinja) for a conversation, as
/// `tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=False)` does: the messages as
/// `messages` (each with `role` and `content`), `add_generation_prompt`, `bos_token` and `eos_token`, and
/// `raise_exception`; blocks trimmed as transformers' environment does (`trim_blocks`, `lstrip_blocks`). The text
/// is then tokenized without adding special tokens (the template writes them).
pub fn render_messages(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // transformers defines raise_exception for templates that reject a conversation.
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let bad = |what: &str, e: minijinja::Error| Error::Invalid(format!("chat template {what}: {e:#}"));
    env.add_template("chat_template", template).map_err(|e| bad("does not parse", e))?;
    let tmpl = env.get_template("chat_template").map_err(|e| bad("does not parse", e))?;
    let messages: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() })
        .collect();
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    tmpl.render(ctx).map_err(|e| bad("failed", e))
}

/// [`render_messages`] for one user message with the generation prompt added (what `rime generate --chat`
/// sends).
pub fn render_chat(template: &str, prompt: &str, bos_token: &str, eos_token: &str) -> Result<String> {
    render_messages(template, &[ChatMessage::new("user", prompt)], true, bos_token, eos_token)
}
