//! Generation with a KV cache. The training graph recomputes every position; generating one token at a time
//! that way costs O(T²). [`Decoder`] instead keeps the rotated keys and the values of every layer in cache
//! buffers [1, S_max, NKV, HS] and records the kernels directly: a prompt chunk of T tokens runs with causal
//! attention over the cache prefix [1, pos + T, ..]; one decoded token attends over the whole cache with a
//! padding mask [1, S_max] marking the filled positions, so its dispatches are built once and replayed. Scratch
//! buffers are shared by all layers (the layers run in order), and each step is one submit. Only the last
//! position's logits are computed and read back.

use std::sync::Arc;

use rime_graph::ParamStore;
use rime_kernels::ops::{attention, elementwise, embedding, matmul, norm, rope};
use rime_kernels::{wgpu, DType, Device, Dispatch, Tensor};

use crate::llama::{lm_head_name, Error, LlamaConfig, Result};

struct LayerWeights {
    ln1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ln2: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// Buffers of one chunk size T (activations of one layer at a time).
struct Scratch {
    ids: Tensor,    // [T] U32
    x: Tensor,      // [T, C] residual stream
    h: Tensor,      // [T, C]
    rstd: Tensor,   // [T]
    q: Tensor,      // [1, T, NH, HS]
    k: Tensor,      // [1, T, NKV, HS]
    v: Tensor,      // [1, T, NKV, HS]
    qr: Tensor,     // [1, T, NH, HS]
    kr: Tensor,     // [1, T, NKV, HS]
    att: Tensor,    // [1, T, NH, HS]
    lse: Tensor,    // [1, NH, T]
    o: Tensor,      // [T, C]
    gate: Tensor,   // [T, I]
    up: Tensor,     // [T, I]
    act: Tensor,    // [T, I]
    x_last: Tensor, // [1, C]
    h_last: Tensor, // [1, C]
    rstd1: Tensor,  // [1]
    logits: Tensor, // [1, V]
}

enum Item {
    D(Dispatch),
    /// The RoPE of q or k, built per step because the position is one of its parameters.
    RopeQ,
    RopeK,
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

/// A Llama model ready to generate: weights (shared with the store), KV cache, the replayable decode plan.
pub struct Decoder {
    cfg: LlamaConfig,
    max_seq: usize,
    len: usize,
    embed: Tensor,
    lm_head: Tensor,
    norm: Tensor,
    layers: Vec<LayerWeights>,
    k_cache: Vec<Tensor>,
    v_cache: Vec<Tensor>,
    mask: Tensor,
    decode: Option<Plan>,
    staging: wgpu::Buffer,
}

/// Prompt chunks above this many tokens run in several steps (bounds the scratch buffers).
const MAX_CHUNK: usize = 256;

impl Decoder {
    /// A decoder over the weights in `store` (HF names, see [`crate::llama`]) for sequences of up to `max_seq`
    /// tokens (prompt and generated).
    pub fn new(dev: &Device, store: &ParamStore, cfg: &LlamaConfig, max_seq: usize) -> Result<Decoder> {
        if max_seq == 0 || max_seq > cfg.max_positions {
            return Err(Error::Invalid(format!(
                "max sequence {max_seq} must be between 1 and max_position_embeddings {}",
                cfg.max_positions
            )));
        }
        let get = |name: &str| -> Result<Tensor> { Ok(store.get(store.id(name)?).tensor.clone()) };
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let n = |s: &str| format!("model.layers.{l}.{s}.weight");
            layers.push(LayerWeights {
                ln1: get(&n("input_layernorm"))?,
                q: get(&n("self_attn.q_proj"))?,
                k: get(&n("self_attn.k_proj"))?,
                v: get(&n("self_attn.v_proj"))?,
                o: get(&n("self_attn.o_proj"))?,
                ln2: get(&n("post_attention_layernorm"))?,
                gate: get(&n("mlp.gate_proj"))?,
                up: get(&n("mlp.up_proj"))?,
                down: get(&n("mlp.down_proj"))?,
            });
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
            embed: get("model.embed_tokens.weight")?,
            lm_head: get(lm_head_name(store, cfg))?,
            norm: get("model.norm.weight")?,
            layers,
            k_cache,
            v_cache,
            mask: dev.zeros(&[1, max_seq], DType::F32)?,
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

    /// Forget the cached sequence.
    pub fn reset(&mut self, dev: &Device) -> Result<()> {
        self.len = 0;
        dev.write_f32(&self.mask, &vec![0.0; self.max_seq])?;
        Ok(())
    }

    fn scratch(&self, dev: &Device, t: usize) -> Result<Scratch> {
        let c = &self.cfg;
        let (nh, nkv, hs, i) = (c.heads, c.kv_heads, c.head_dim(), c.intermediate);
        let f = |s: &[usize]| dev.empty(s, DType::F32);
        Ok(Scratch {
            ids: dev.empty(&[t], DType::U32)?,
            x: f(&[t, c.hidden])?,
            h: f(&[t, c.hidden])?,
            rstd: f(&[t])?,
            q: f(&[1, t, nh, hs])?,
            k: f(&[1, t, nkv, hs])?,
            v: f(&[1, t, nkv, hs])?,
            qr: f(&[1, t, nh, hs])?,
            kr: f(&[1, t, nkv, hs])?,
            att: f(&[1, t, nh, hs])?,
            lse: f(&[1, nh, t])?,
            o: f(&[t, c.hidden])?,
            gate: f(&[t, i])?,
            up: f(&[t, i])?,
            act: f(&[t, i])?,
            x_last: f(&[1, c.hidden])?,
            h_last: f(&[1, c.hidden])?,
            rstd1: f(&[1])?,
            logits: f(&[1, c.vocab])?,
        })
    }

    /// The kernels of one chunk of `t` tokens. `prefix`: Some(pos + t) attends causally over that cache
    /// prefix (prompt chunks); None attends over the whole cache under the padding mask (one decoded token).
    fn plan(&self, dev: &Device, t: usize, prefix: Option<usize>) -> Result<Plan> {
        let s = self.scratch(dev, t)?;
        let c = &self.cfg;
        let (cc, nh, nkv, hs) = (c.hidden, c.heads, c.kv_heads, c.head_dim());
        let row = (nkv * hs * 4) as u64;
        let mut items = Vec::new();
        let push = |items: &mut Vec<Item>, ds: Vec<Dispatch>| items.extend(ds.into_iter().map(Item::D));
        let x2 = |t: &Tensor, shape: &[usize]| t.reshape(shape);
        push(&mut items, embedding::embedding_forward(dev, &s.x, &s.ids, &self.embed)?);
        let scale = 1.0 / (hs as f32).sqrt();
        for (l, w) in self.layers.iter().enumerate() {
            push(&mut items, norm::rmsnorm_forward(dev, &s.h, &s.rstd, &s.x, &w.ln1, c.eps)?);
            push(&mut items, matmul::matmul_forward(dev, &x2(&s.q, &[t, nh * hs])?, &s.h, &w.q, None, false, true)?);
            push(&mut items, matmul::matmul_forward(dev, &x2(&s.k, &[t, nkv * hs])?, &s.h, &w.k, None, false, true)?);
            push(&mut items, matmul::matmul_forward(dev, &x2(&s.v, &[t, nkv * hs])?, &s.h, &w.v, None, false, true)?);
            items.push(Item::RopeQ);
            items.push(Item::RopeK);
            let size = row * t as u64;
            items.push(Item::Copy {
                src: s.kr.buffer.clone(),
                src_off: 0,
                dst: self.k_cache[l].buffer.clone(),
                dst_off: 0,
                dst_pos_stride: row,
                size,
            });
            items.push(Item::Copy {
                src: s.v.buffer.clone(),
                src_off: 0,
                dst: self.v_cache[l].buffer.clone(),
                dst_off: 0,
                dst_pos_stride: row,
                size,
            });
            let ds = match prefix {
                Some(n) => {
                    let view = |b: &Tensor| b.view(&[1, n, nkv, hs], DType::F32);
                    let (kv, vv) = (view(&self.k_cache[l]), view(&self.v_cache[l]));
                    attention::attention_forward(dev, &s.att, &s.lse, &s.qr, &kv, &vv, None, true, scale)?
                }
                None => attention::attention_forward(
                    dev,
                    &s.att,
                    &s.lse,
                    &s.qr,
                    &self.k_cache[l],
                    &self.v_cache[l],
                    Some(&self.mask),
                    false,
                    scale,
                )?,
            };
            push(&mut items, ds);
            push(&mut items, matmul::matmul_forward(dev, &s.o, &x2(&s.att, &[t, cc])?, &w.o, None, false, true)?);
            push(&mut items, elementwise::add_inplace_forward(dev, &s.x, &s.o, 1.0)?);
            push(&mut items, norm::rmsnorm_forward(dev, &s.h, &s.rstd, &s.x, &w.ln2, c.eps)?);
            push(&mut items, matmul::matmul_forward(dev, &s.gate, &s.h, &w.gate, None, false, true)?);
            push(&mut items, matmul::matmul_forward(dev, &s.up, &s.h, &w.up, None, false, true)?);
            push(&mut items, elementwise::silu_forward(dev, &s.act, &s.gate)?);
            push(&mut items, elementwise::mul_forward(dev, &s.gate, &s.act, &s.up)?);
            push(&mut items, matmul::matmul_forward(dev, &s.o, &s.gate, &w.down, None, false, true)?);
            push(&mut items, elementwise::add_inplace_forward(dev, &s.x, &s.o, 1.0)?);
        }
        items.push(Item::Copy {
            src: s.x.buffer.clone(),
            src_off: ((t - 1) * cc * 4) as u64,
            dst: s.x_last.buffer.clone(),
            dst_off: 0,
            dst_pos_stride: 0,
            size: (cc * 4) as u64,
        });
        push(&mut items, norm::rmsnorm_forward(dev, &s.h_last, &s.rstd1, &s.x_last, &self.norm, c.eps)?);
        push(&mut items, matmul::matmul_forward(dev, &s.logits, &s.h_last, &self.lm_head, None, false, true)?);
        Ok(Plan { scratch: s, items })
    }

    /// Record and submit one chunk at position `pos`, then read back the last position's logits.
    fn execute(&self, dev: &Device, plan: &Plan, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let s = &plan.scratch;
        let theta = self.cfg.rope_theta;
        let rq = rope::rope_forward(dev, &s.qr, &s.q, pos as u32, theta)?;
        let rk = rope::rope_forward(dev, &s.kr, &s.k, pos as u32, theta)?;
        let q = dev.queue();
        q.write_buffer(&s.ids.buffer, 0, bytemuck::cast_slice(tokens));
        let ones = vec![1.0f32; tokens.len()];
        q.write_buffer(&self.mask.buffer, (pos * 4) as u64, bytemuck::cast_slice(&ones));
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
                    Item::RopeQ => rq.iter().for_each(|d| d.record(&mut pass)),
                    Item::RopeK => rk.iter().for_each(|d| d.record(&mut pass)),
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

    /// Append prompt tokens (causal attention over everything cached) and return the logits [V] that
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

    /// Append one token and return the logits [V] for the next.
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
        return Ok(st);
    }
    let t0 = std::time::Instant::now();
    let mut logits = dec.prefill(dev, prompt)?;
    st.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    loop {
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

/// Renders a Hugging Face chat template (Jinja, through minijinja) for one user message with the generation
/// prompt added, as `tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`
/// does. The text is then tokenized without adding special tokens (the template writes them).
pub fn render_chat(template: &str, prompt: &str, bos_token: &str, eos_token: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // transformers defines raise_exception for templates that reject a conversation.
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let bad = |what: &str, e: minijinja::Error| Error::Invalid(format!("chat template {what}: {e:#}"));
    env.add_template("chat_template", template).map_err(|e| bad("does not parse", e))?;
    let tmpl = env.get_template("chat_template").map_err(|e| bad("does not parse", e))?;
    let ctx = minijinja::context! {
        messages => vec![minijinja::context! { role => "user", content => prompt }],
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    tmpl.render(ctx).map_err(|e| bad("failed", e))
}
