//! Gemma 3 decoder: a small random model against a plain-Rust f64 forward written from transformers'
//! `Gemma3ForCausalLM` (scaled embeddings, q/k norms, pre- and post-norms, GELU-tanh MLP, sliding-window
//! layers with their own RoPE base), the KV-cache decoder against the graph, LoRA gradients against finite
//! differences, and parity with transformers on the real Gemma 3 270M GGUF (skipped when absent).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

mod common;
use common::ModuleLora;

use rand::{Rng, SeedableRng};
use rime_graph::{Executor, Graph, OptimConfig, ParamStore};
use rime_io::Checkpoint;
use rime_kernels::{DType, Device, DeviceOptions};
use rime_models::generate::{argmax, generate_greedy, Decoder};
use rime_models::llama::{self, GemmaConfig, LlamaConfig};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe in CI)"))
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// A small random Gemma 3: head size 16 (not hidden / heads = 8), GQA 4/2, three layers (sliding, sliding,
/// global), window 3. Norm gains are stored as 1 + w (as llama.cpp writes them); `raw` keeps w.
struct Tiny {
    cfg: LlamaConfig,
    tensors: Vec<rime_io::NamedTensor>,
    raw: HashMap<String, Vec<f32>>,
}

fn tiny(seed: u64) -> Tiny {
    let cfg = LlamaConfig {
        hidden: 32,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        intermediate: 40,
        vocab: 53,
        max_positions: 64,
        eps: 1e-6,
        rope_theta: 1_000_000.0,
        tie_word_embeddings: true,
        gemma: Some(GemmaConfig {
            head_dim: 16,
            query_pre_attn_scalar: 12.0,
            sliding_window: 3,
            sliding: vec![true, true, false],
            rope_local_theta: 10000.0,
        }),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (c, hd, i) = (cfg.hidden, 16, cfg.intermediate);
    let (q, kv) = (cfg.heads * hd, cfg.kv_heads * hd);
    let mut tensors = Vec::new();
    let mut raw = HashMap::new();
    let mut add = |name: String, shape: &[usize], std: f32, norm: bool| {
        let n: usize = shape.iter().product();
        let w: Vec<f32> = (0..n).map(|_| std * (rng.random::<f32>() * 2.0 - 1.0)).collect();
        let stored = if norm { w.iter().map(|x| 1.0 + x).collect() } else { w.clone() };
        tensors.push((name.clone(), shape.to_vec(), stored));
        raw.insert(name, w);
    };
    add("model.embed_tokens.weight".into(), &[cfg.vocab, c], 0.3, false);
    for l in 0..cfg.layers {
        let n = |s: &str| format!("model.layers.{l}.{s}.weight");
        add(n("input_layernorm"), &[c], 0.3, true);
        add(n("self_attn.q_proj"), &[q, c], 0.3, false);
        add(n("self_attn.k_proj"), &[kv, c], 0.3, false);
        add(n("self_attn.v_proj"), &[kv, c], 0.3, false);
        add(n("self_attn.q_norm"), &[hd], 0.3, true);
        add(n("self_attn.k_norm"), &[hd], 0.3, true);
        add(n("self_attn.o_proj"), &[c, q], 0.3, false);
        add(n("post_attention_layernorm"), &[c], 0.3, true);
        add(n("pre_feedforward_layernorm"), &[c], 0.3, true);
        add(n("mlp.gate_proj"), &[i, c], 0.3, false);
        add(n("mlp.up_proj"), &[i, c], 0.3, false);
        add(n("mlp.down_proj"), &[c, i], 0.3, false);
        add(n("post_feedforward_layernorm"), &[c], 0.3, true);
    }
    add("model.norm.weight".into(), &[c], 0.3, true);
    Tiny { cfg, tensors, raw }
}

fn upload(d: &Device, tensors: &[rime_io::NamedTensor]) -> ParamStore {
    let mut store = ParamStore::new();
    for (name, shape, data) in tensors {
        store.add_f32(d, name, data, shape, false).unwrap();
    }
    store
}

// ---- the plain-Rust reference (f64), following transformers' modeling_gemma3 ----

/// Gemma3RMSNorm over rows of `n`: x / sqrt(mean(x²) + eps) · (1 + w).
fn rms(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let n = w.len();
    x.chunks(n)
        .flat_map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            r.iter().zip(w).map(move |(v, &g)| v * inv * (1.0 + g as f64)).collect::<Vec<_>>()
        })
        .collect()
}

/// x [T, in] · Wᵀ with W [out, in].
fn lin(x: &[f64], w: &[f32], out: usize) -> Vec<f64> {
    let inn = w.len() / out;
    x.chunks(inn)
        .flat_map(|r| (0..out).map(move |o| (0..inn).map(|k| r[k] * w[o * inn + k] as f64).sum::<f64>()))
        .collect()
}

/// rotate_half RoPE on [T, H, D] at positions 0..T.
fn rope(x: &mut [f64], heads: usize, d: usize, theta: f64) {
    let half = d / 2;
    for (t, row) in x.chunks_mut(heads * d).enumerate() {
        for h in row.chunks_mut(d) {
            let old = h.to_vec();
            for i in 0..half {
                let inv = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
                let (s, c) = (t as f64 * inv).sin_cos();
                h[i] = old[i] * c - old[i + half] * s;
                h[i + half] = old[i + half] * c + old[i] * s;
            }
        }
    }
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn reference_logits(m: &Tiny, ids: &[u32]) -> Vec<f32> {
    let cfg = &m.cfg;
    let g = cfg.gemma.as_ref().unwrap();
    let w = |n: &str| m.raw.get(n).unwrap_or_else(|| panic!("{n}"));
    let (c, hd, t, eps) = (cfg.hidden, g.head_dim, ids.len(), cfg.eps as f64);
    let (nh, nkv) = (cfg.heads, cfg.kv_heads);
    let emb = w("model.embed_tokens.weight");
    let scale = (c as f64).sqrt() as f32 as f64;
    let mut x: Vec<f64> = ids
        .iter()
        .flat_map(|&id| emb[id as usize * c..(id as usize + 1) * c].iter().map(|&v| v as f64 * scale))
        .collect();
    for l in 0..cfg.layers {
        let n = |s: &str| format!("model.layers.{l}.{s}.weight");
        let h = rms(&x, w(&n("input_layernorm")), eps);
        let mut q = rms(&lin(&h, w(&n("self_attn.q_proj")), nh * hd), w(&n("self_attn.q_norm")), eps);
        let mut k = rms(&lin(&h, w(&n("self_attn.k_proj")), nkv * hd), w(&n("self_attn.k_norm")), eps);
        let v = lin(&h, w(&n("self_attn.v_proj")), nkv * hd);
        let sliding = g.sliding[l];
        let theta = if sliding { g.rope_local_theta as f64 } else { cfg.rope_theta as f64 };
        rope(&mut q, nh, hd, theta);
        rope(&mut k, nkv, hd, theta);
        let sc = 1.0 / (g.query_pre_attn_scalar as f64).sqrt();
        let mut a = vec![0f64; t * nh * hd];
        for i in 0..t {
            for hh in 0..nh {
                let kh = hh / (nh / nkv);
                // causal, and on sliding layers i - j < window
                let keys: Vec<usize> = (0..=i).filter(|&j| !sliding || i - j < g.sliding_window).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| sc * (0..hd).map(|e| q[(i * nh + hh) * hd + e] * k[(j * nkv + kh) * hd + e]).sum::<f64>())
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                for (&j, sj) in keys.iter().zip(&s) {
                    let p = (sj - mx).exp() / z;
                    for e in 0..hd {
                        a[(i * nh + hh) * hd + e] += p * v[(j * nkv + kh) * hd + e];
                    }
                }
            }
        }
        let o = rms(&lin(&a, w(&n("self_attn.o_proj")), c), w(&n("post_attention_layernorm")), eps);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h2 = rms(&x, w(&n("pre_feedforward_layernorm")), eps);
        let gate = lin(&h2, w(&n("mlp.gate_proj")), cfg.intermediate);
        let up = lin(&h2, w(&n("mlp.up_proj")), cfg.intermediate);
        let act: Vec<f64> = gate.iter().zip(&up).map(|(gv, u)| gelu_tanh(*gv) * u).collect();
        let dn = rms(&lin(&act, w(&n("mlp.down_proj")), c), w(&n("post_feedforward_layernorm")), eps);
        x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
    }
    let h = rms(&x, w("model.norm.weight"), eps);
    lin(&h, emb, cfg.vocab).into_iter().map(|v| v as f32).collect()
}

fn graph_logits(d: &Device, store: &ParamStore, cfg: &LlamaConfig, ids: &[u32]) -> Vec<f32> {
    let mut g = Graph::new();
    let logits = llama::build(&mut g, store, cfg, 1, ids.len(), &rime_models::Plain).unwrap();
    let mut ex = Executor::new(d, g, store, None, &[logits], None).unwrap();
    ex.feed_u32(d, llama::INPUT_IDS, ids).unwrap();
    ex.forward(d).unwrap();
    ex.read(d, logits).unwrap()
}

const IDS: [u32; 9] = [3, 17, 52, 0, 42, 8, 8, 29, 45];

#[test]
fn tiny_gemma_graph_matches_reference() {
    let d = dev();
    let m = tiny(21);
    let store = upload(d, &m.tensors);
    let got = graph_logits(d, &store, &m.cfg, &IDS);
    let want = reference_logits(&m, &IDS);
    let diff = max_abs(&got, &want);
    println!("tiny gemma graph vs f64 reference: max |diff| {diff:.3e}");
    assert!(diff <= 1e-4, "graph logits differ from the reference by {diff}");
    // the reference itself: with a window as long as the sequence the sliding layers see every earlier
    // token, and the logits change from position `window` on (before it, nothing falls out of the window)
    let mut wide = tiny(21);
    wide.cfg.gemma.as_mut().unwrap().sliding_window = IDS.len();
    let other = reference_logits(&wide, &IDS);
    let (v, w) = (m.cfg.vocab, 3);
    assert!(max_abs(&other[..w * v], &want[..w * v]) < 1e-6, "the window changed positions it cannot reach");
    assert!(max_abs(&other[w * v..], &want[w * v..]) > 1e-3, "the sliding window changed nothing");
}

#[test]
fn tiny_gemma_kv_cache_matches_full_forward() {
    let d = dev();
    let m = tiny(22);
    let store = upload(d, &m.tensors);
    let full = graph_logits(d, &store, &m.cfg, &IDS);
    let v = m.cfg.vocab;
    let mut dec = Decoder::new(d, &store, &m.cfg, 12).unwrap();
    let mut worst = 0f32;
    dec.prefill(d, &IDS[..2]).unwrap();
    let l = dec.prefill(d, &IDS[2..5]).unwrap(); // a chunk after a cached prefix, past the window
    worst = worst.max(max_abs(&l, &full[4 * v..5 * v]));
    for (p, &id) in IDS.iter().enumerate().skip(5) {
        let l = dec.decode(d, id).unwrap();
        worst = worst.max(max_abs(&l, &full[p * v..(p + 1) * v]));
    }
    println!("tiny gemma KV-cache vs full forward: max |diff| {worst:.3e}");
    assert!(worst <= 1e-4, "KV-cache logits differ from the full forward by {worst}");
    dec.reset(d).unwrap();
    let again = dec.prefill(d, &IDS[..5]).unwrap();
    assert!(max_abs(&again, &full[4 * v..5 * v]) <= 1e-4);
}

const ADAPTED: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
/// LoRA on every projection kind through the hook.
const TEST_LORA: ModuleLora = ModuleLora { scale: 2.0, modules: &ADAPTED };

#[test]
fn tiny_gemma_lora_gradients_match_finite_differences() {
    let d = dev();
    let m = tiny(23);
    let cfg = &m.cfg;
    let mut store = upload(d, &m.tensors);
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let r = 2;
    let (c, hd, i) = (cfg.hidden, 16, cfg.intermediate);
    let dims = |p: &str| match p {
        "q_proj" => (c, cfg.heads * hd),
        "k_proj" | "v_proj" => (c, cfg.kv_heads * hd),
        "o_proj" => (cfg.heads * hd, c),
        "gate_proj" | "up_proj" => (c, i),
        _ => (i, c),
    };
    for l in 0..cfg.layers {
        for p in ADAPTED {
            let sub = if ["gate_proj", "up_proj", "down_proj"].contains(&p) { "mlp" } else { "self_attn" };
            let base = format!("model.layers.{l}.{sub}.{p}");
            let (inn, out) = dims(p);
            let a: Vec<f32> = (0..r * inn).map(|_| rng.random::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..out * r).map(|_| 0.3 * (rng.random::<f32>() - 0.5)).collect();
            store.add_f32(d, &format!("{base}.lora_A.weight"), &a, &[r, inn], true).unwrap();
            store.add_f32(d, &format!("{base}.lora_B.weight"), &b, &[out, r], true).unwrap();
        }
    }
    let ids: Vec<u32> = IDS.to_vec();
    let targets: Vec<i32> = IDS[1..].iter().map(|&x| x as i32).chain([-100]).collect();
    let t = ids.len();
    let probe = ["model.layers.0.self_attn.q_proj.lora_B.weight", "model.layers.1.mlp.down_proj.lora_B.weight"];
    let loss_of = |store: &ParamStore, grads: bool| -> (f32, Vec<Vec<f32>>) {
        let mut g = Graph::new();
        let logits = llama::build(&mut g, store, cfg, 1, t, &TEST_LORA).unwrap();
        let logits = g.reshape(logits, &[t, cfg.vocab]).unwrap();
        let tg = g.input("targets", &[t], DType::I32);
        let loss = g.cross_entropy(logits, tg, -100).unwrap();
        let mut ex = Executor::new(d, g, store, Some(loss), &[loss], Some(OptimConfig::sgd(0.0, 0.0, 0.0))).unwrap();
        ex.feed_u32(d, llama::INPUT_IDS, &ids).unwrap();
        ex.feed_i32(d, "targets", &targets).unwrap();
        ex.backward_only(d).unwrap();
        let l = ex.read(d, loss).unwrap()[0];
        let gr = if grads {
            probe.iter().map(|n| ex.read_param_grad(d, store.id(n).unwrap()).unwrap()).collect()
        } else {
            Vec::new()
        };
        (l, gr)
    };
    let (l0, grads) = loss_of(&store, true);
    assert!(l0.is_finite());
    let h = 1e-2f32;
    for (pi, name) in probe.iter().enumerate() {
        let id = store.id(name).unwrap();
        let b0 = store.read_f32(d, id).unwrap();
        for &k in &[0usize, 7, 19] {
            let k = k % b0.len();
            let mut bp = b0.clone();
            bp[k] += h;
            d.write_f32(&store.get(id).tensor, &bp).unwrap();
            let (lp, _) = loss_of(&store, false);
            bp[k] -= 2.0 * h;
            d.write_f32(&store.get(id).tensor, &bp).unwrap();
            let (lm, _) = loss_of(&store, false);
            d.write_f32(&store.get(id).tensor, &b0).unwrap();
            let fd = (lp - lm) / (2.0 * h);
            let g = grads[pi][k];
            println!("{name}[{k}]: autodiff {g:.5}, finite difference {fd:.5}");
            assert!((fd - g).abs() <= 2e-3 + 0.05 * fd.abs(), "{name}[{k}]: {g} vs fd {fd}");
        }
    }
}

// ---- the real model ----

fn gemma_gguf() -> Option<PathBuf> {
    match rime_io::locate_model("gemma-3-270m-q4_k_m.gguf") {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIPPED: Gemma 3 270M GGUF not found, run scripts/fetch-models.sh ({e})");
            None
        }
    }
}

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gemma3_270m_golden.safetensors")
}

/// The real model against transformers on the same file (scripts/gemma3_golden.py), loaded as `rime generate`
/// and `rime train` load it (`load_gguf`: on lavapipe the 262,144 × 640 embedding, 671 MB in f32, exceeds one
/// 128 MiB storage binding and is split by rows). Checked: the tokenizer's ids for the prompt, the argmax of
/// every position and the logits of the last three positions over the whole vocabulary (graph), and 8 greedy
/// tokens through the KV-cache decoder.
#[test]
fn gemma3_270m_matches_transformers() {
    let Some(model) = gemma_gguf() else { return };
    let d = dev();
    let ck = Checkpoint::open(golden()).unwrap();
    let ids: Vec<u32> = ck.get_i64("input_ids").unwrap().into_iter().map(|x| x as u32).collect();
    let m = llama::load_gguf(d, &model, None, DType::F32).unwrap();
    let cfg = &m.cfg;
    let (t, v) = (ids.len(), cfg.vocab);
    assert_eq!((v, cfg.layers, cfg.head_dim(), cfg.window(0), cfg.window(5)), (262_144, 18, 256, 512, 0));
    let prompt = ck.metadata().get("prompt").unwrap().clone();
    assert_eq!(m.tokenizer.encode(&prompt, true).unwrap(), ids, "tokenizer ids for {prompt:?}");

    let logits = graph_logits(d, &m.store, cfg, &ids);
    let want_argmax: Vec<u32> = ck.get_i64("argmax").unwrap().into_iter().map(|x| x as u32).collect();
    let got_argmax: Vec<u32> = (0..t).map(|r| argmax(&logits[r * v..(r + 1) * v])).collect();
    assert_eq!(got_argmax, want_argmax, "argmax per position differs from transformers");
    let diff = max_abs(&logits[(t - 3) * v..], &ck.get_f32("logits_last3").unwrap());
    println!("gemma3 270m max |diff| vs transformers, last 3 positions x 262,144 logits: {diff:.3e}");
    assert!(diff <= 2e-3, "logits differ from transformers by {diff} (tolerance 2e-3)");

    // greedy continuation through the KV cache equals transformers' generate(do_sample=False)
    let want: Vec<u32> = ck.get_i64("greedy").unwrap().into_iter().map(|x| x as u32).collect();
    let mut dec = Decoder::new(d, &m.store, cfg, t + want.len() + 1).unwrap();
    let st = generate_greedy(d, &mut dec, &ids, want.len(), &[], &mut |_| Ok(())).unwrap();
    println!("gemma3 270m greedy: {:?} ({:?})", st.generated, m.tokenizer.decode(&st.generated, true).unwrap());
    assert_eq!(st.generated, want, "greedy tokens differ from transformers");
}

/// Gemma 3 270M with its matrices held as the file's blocks (`GgufWeights::Quantized`: Q5_0, Q8_0, Q4_K, Q6_K;
/// the 178 MB Q8_0 embedding split into row parts of at most one binding) gives transformers' argmax and
/// logits like the f32 load, and the greedy tokens; its weights are a fraction of f32's.
#[test]
fn gemma3_270m_quantized_weights_match_transformers() {
    let Some(model) = gemma_gguf() else { return };
    let d = dev();
    let ck = Checkpoint::open(golden()).unwrap();
    let ids: Vec<u32> = ck.get_i64("input_ids").unwrap().into_iter().map(|x| x as u32).collect();
    let m = llama::load_gguf_with(d, &model, None, llama::GgufWeights::Quantized).unwrap();
    let bytes: u64 = m.store.iter().map(|(_, p)| p.tensor.bytes()).sum();
    let f32_bytes: u64 = m.store.iter().map(|(_, p)| 4 * p.tensor.numel() as u64).sum();
    println!("gemma3 270m weights: quantized {:.1} MB, as f32 {:.1} MB", bytes as f64 / 1e6, f32_bytes as f64 / 1e6);
    assert!((bytes as f64) <= 0.3 * f32_bytes as f64);
    assert!(m
        .store
        .iter()
        .any(|(_, p)| p.name.starts_with("model.embed_tokens.weight") && p.tensor.dtype.is_quantized()));
    let (t, v) = (ids.len(), m.cfg.vocab);
    let logits = graph_logits(d, &m.store, &m.cfg, &ids);
    let want_argmax: Vec<u32> = ck.get_i64("argmax").unwrap().into_iter().map(|x| x as u32).collect();
    let got_argmax: Vec<u32> = (0..t).map(|r| argmax(&logits[r * v..(r + 1) * v])).collect();
    assert_eq!(got_argmax, want_argmax, "argmax per position differs from transformers");
    let diff = max_abs(&logits[(t - 3) * v..], &ck.get_f32("logits_last3").unwrap());
    println!("gemma3 270m quantized max |diff| vs transformers, last 3 positions: {diff:.3e}");
    assert!(diff <= 2e-3, "logits differ from transformers by {diff} (tolerance 2e-3)");
    let want: Vec<u32> = ck.get_i64("greedy").unwrap().into_iter().map(|x| x as u32).collect();
    let mut dec = Decoder::new(d, &m.store, &m.cfg, t + want.len() + 1).unwrap();
    let st = generate_greedy(d, &mut dec, &ids, want.len(), &[], &mut |_| Ok(())).unwrap();
    assert_eq!(st.generated, want, "greedy tokens differ from transformers");

    // The training loss without the whole logits (llama::build_loss: chunks of 4 tokens, each through
    // linear_cross_entropy over the split head's quantized row parts) is the next-token loss of the logits above.
    let targets: Vec<i32> = (0..t).map(|r| if r + 1 < t { ids[r + 1] as i32 } else { -100 }).collect();
    let mut want_loss = 0f64;
    for (r, &tg) in targets.iter().enumerate().take(t - 1) {
        let row = &logits[r * v..(r + 1) * v];
        let mx = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        want_loss += (lse - row[tg as usize] as f64) / (t - 1) as f64;
    }
    assert!(llama::row_parts(&m.store, "model.embed_tokens.weight").is_some_and(|p| p.len() > 1));
    let mut g = Graph::new();
    let tg = g.input("targets", &[t], DType::I32);
    let block = 4 * m.cfg.vocab;
    let loss = llama::build_loss(&mut g, &m.store, &m.cfg, (1, t), &rime_models::Plain, false, tg, block).unwrap();
    let count = |name: &str| g.nodes.iter().filter(|n| n.op.name() == name).count();
    assert_eq!((count("rows"), count("linear_cross_entropy")), (t.div_ceil(4), t.div_ceil(4)));
    let mut ex = Executor::new(d, g, &m.store, Some(loss), &[loss], None).unwrap();
    ex.feed_u32(d, llama::INPUT_IDS, &ids).unwrap();
    ex.feed_i32(d, "targets", &targets).unwrap();
    ex.forward(d).unwrap();
    let got = ex.read(d, loss).unwrap()[0] as f64;
    println!("gemma3 270m quantized next-token loss: chunked {got:.6}, from the whole logits {want_loss:.6}");
    assert!((got - want_loss).abs() <= 1e-4 * want_loss.abs(), "chunked loss {got} vs {want_loss}");
}

/// A store with the embedding (and so the tied head) split by rows, as `upload_split` does for a table larger
/// than one storage binding.
fn upload_with_split_embedding(d: &Device, tensors: &[rime_io::NamedTensor], rows_per_part: usize) -> ParamStore {
    let mut store = ParamStore::new();
    for (name, shape, data) in tensors {
        if name == "model.embed_tokens.weight" {
            let c = shape[1];
            for (k, start) in (0..shape[0]).step_by(rows_per_part).enumerate() {
                let end = (start + rows_per_part).min(shape[0]);
                let part = llama::row_part_name(name, k);
                store.add_f32(d, &part, &data[start * c..end * c], &[end - start, c], false).unwrap();
            }
        } else {
            store.add_f32(d, name, data, shape, false).unwrap();
        }
    }
    store
}

/// The split table gives the logits of the whole one, in the graph (gather by parts, head as products side by
/// side) and in the KV-cache decoder, and the same LoRA gradients (the head's gradient flows back through the
/// column blocks).
#[test]
fn tiny_gemma_split_embedding_matches_whole() {
    let d = dev();
    let m = tiny(24);
    let whole = upload(d, &m.tensors);
    let split = upload_with_split_embedding(d, &m.tensors, 20); // 53 rows: parts of 20, 20, 13
    assert_eq!(llama::row_parts(&split, "model.embed_tokens.weight").unwrap().len(), 3);
    let a = graph_logits(d, &whole, &m.cfg, &IDS);
    let b = graph_logits(d, &split, &m.cfg, &IDS);
    let diff = max_abs(&a, &b);
    println!("tiny gemma split vs whole embedding: graph max |diff| {diff:.3e}");
    assert!(diff <= 1e-5, "{diff}");
    let v = m.cfg.vocab;
    let mut dec = Decoder::new(d, &split, &m.cfg, 12).unwrap();
    let mut worst = max_abs(&dec.prefill(d, &IDS[..4]).unwrap(), &a[3 * v..4 * v]);
    for (p, &id) in IDS.iter().enumerate().skip(4) {
        worst = worst.max(max_abs(&dec.decode(d, id).unwrap(), &a[p * v..(p + 1) * v]));
    }
    println!("tiny gemma split embedding: KV-cache decoder vs graph max |diff| {worst:.3e}");
    assert!(worst <= 1e-4, "{worst}");

    // gradients of a LoRA factor through the split head equal those through the whole one
    let grad = |store: &mut ParamStore| -> (f32, Vec<f32>) {
        let (c, q) = (m.cfg.hidden, m.cfg.heads * 16);
        let a: Vec<f32> = (0..2 * c).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.05).collect();
        let bm: Vec<f32> = (0..q * 2).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.03).collect();
        for l in 0..m.cfg.layers {
            let base = format!("model.layers.{l}.self_attn.q_proj");
            store.add_f32(d, &format!("{base}.lora_A.weight"), &a, &[2, c], true).unwrap();
            store.add_f32(d, &format!("{base}.lora_B.weight"), &bm, &[q, 2], true).unwrap();
        }
        let t = IDS.len();
        let mut g = Graph::new();
        let logits =
            llama::build(&mut g, store, &m.cfg, 1, t, &ModuleLora { scale: 2.0, modules: &["q_proj"] }).unwrap();
        let logits = g.reshape(logits, &[t, m.cfg.vocab]).unwrap();
        let tg = g.input("targets", &[t], DType::I32);
        let loss = g.cross_entropy(logits, tg, -100).unwrap();
        let mut ex = Executor::new(d, g, store, Some(loss), &[loss], Some(OptimConfig::sgd(0.0, 0.0, 0.0))).unwrap();
        ex.feed_u32(d, llama::INPUT_IDS, &IDS).unwrap();
        let targets: Vec<i32> = IDS[1..].iter().map(|&x| x as i32).chain([-100]).collect();
        ex.feed_i32(d, "targets", &targets).unwrap();
        ex.backward_only(d).unwrap();
        let id = store.id("model.layers.2.self_attn.q_proj.lora_A.weight").unwrap();
        (ex.read(d, loss).unwrap()[0], ex.read_param_grad(d, id).unwrap())
    };
    let (mut whole, mut split) = (whole, split);
    let (lw, gw) = grad(&mut whole);
    let (ls, gs) = grad(&mut split);
    println!("tiny gemma split embedding: loss {lw} vs {ls}, LoRA grad max |diff| {:.3e}", max_abs(&gw, &gs));
    assert!((lw - ls).abs() <= 1e-5 && max_abs(&gw, &gs) <= 1e-5);
    assert!(gw.iter().any(|&x| x != 0.0));
}

/// Gemma 3's chat template (the fallback for GGUF files without one) renders one user turn as transformers'
/// `apply_chat_template(add_generation_prompt=True)` does for Gemma 3.
#[test]
fn gemma3_chat_template_renders_a_user_turn() {
    let t = rime_io::gguf::GEMMA3_CHAT_TEMPLATE;
    let got = rime_models::generate::render_chat(t, "  What is rime? ", "<bos>", "<eos>").unwrap();
    assert_eq!(got, "<bos><start_of_turn>user\nWhat is rime?<end_of_turn>\n<start_of_turn>model\n");
}
