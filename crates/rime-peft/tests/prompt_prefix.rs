//! Prompt tuning and prefix tuning on a tiny random BERT: the GPU graph against a plain-Rust forward that
//! concatenates on the CPU (the prompt in front of the word embeddings, the prefixes in front of each layer's
//! keys and values, attention by the reference kernel over the concatenated K/V), gradients against finite
//! differences, the loss falling, the peft-layout adapter (names, shapes, config) and its round trip.

mod common;
use common::*;

use rime_graph::{OptimConfig, ParamStore};
use rime_kernels::reference::{attention as ra, elementwise as re, matmul as rm, norm as rn};
use rime_models::bert::{self, BertConfig};
use rime_models::VirtualTokens;
use rime_peft::classifier::{self, Method};
use rime_peft::prompt::{self, PrefixConfig, PromptConfig, PromptInit};

fn prompt_method(p: usize, init: PromptInit) -> Method {
    Method::Prompt(PromptConfig { num_virtual_tokens: p, init, seed: 3, layers: 0, heads: 0 }).for_model(&tiny_cfg())
}
fn prefix_method(p: usize) -> Method {
    Method::Prefix(PrefixConfig { num_virtual_tokens: p, seed: 4, layers: 0, heads: 0 }).for_model(&tiny_cfg())
}

fn read(st: &ParamStore, name: &str) -> Vec<f32> {
    st.read_f32(dev(), st.id(name).unwrap()).unwrap()
}

/// x [n, in] · W[out, in]ᵀ + b
fn linear(st: &ParamStore, x: &[f32], n: usize, module: &str) -> Vec<f32> {
    let (w, b) = (read(st, &format!("{module}.weight")), read(st, &format!("{module}.bias")));
    let (o, i) = (b.len(), w.len() / b.len());
    let d = rm::MatmulDims { batch: 1, m: n, k: i, n: o, b_batched: false, trans_a: false, trans_b: true };
    rm::matmul_forward(x, &w, Some(&b), &d)
}

fn layernorm(st: &ParamStore, x: &[f32], module: &str, eps: f32) -> Vec<f32> {
    rn::layernorm_forward(x, &read(st, &format!("{module}.weight")), &read(st, &format!("{module}.bias")), eps).0
}

/// rows [p, c] in front of each of the b sequences of x [b, t, c], on the CPU.
fn concat(rows: &[f32], x: &[f32], b: usize, c: usize) -> Vec<f32> {
    let t = x.len() / (b * c);
    (0..b).flat_map(|r| rows.iter().chain(&x[r * t * c..(r + 1) * t * c]).copied().collect::<Vec<_>>()).collect()
}

/// Logits [B, 3] of Hugging Face BertModel semantics with peft's virtual tokens, computed on the CPU:
/// `prompt` [P, C] joins the word embeddings (positions 0..P, token type 0), `prefix` holds per layer the key
/// and value rows [P, C] joined to the projected keys and values (real tokens at positions P..P+T); the mask
/// gets ones in front; the pool is the mean over the real tokens.
fn cpu_logits(
    st: &ParamStore,
    cfg: &BertConfig,
    prompt: Option<&[f32]>,
    prefix: Option<&[(Vec<f32>, Vec<f32>)]>,
) -> Vec<f32> {
    let (ids, types, mask, _) = batch();
    let (c, nh) = (cfg.hidden, cfg.heads);
    let hs = c / nh;
    let np = prompt.map_or(0, |p| p.len() / c);
    let nk = prefix.map_or(0, |p| p[0].0.len() / c);
    let tx = np + T;
    let s = nk + tx;
    let table = |name: &str, id: u32| read(st, name)[id as usize * c..(id as usize + 1) * c].to_vec();
    let mut x = vec![];
    for r in 0..B {
        for j in 0..tx {
            let (word, ty) = if j < np {
                (prompt.unwrap()[j * c..(j + 1) * c].to_vec(), 0)
            } else {
                (table("embeddings.word_embeddings.weight", ids[r * T + j - np]), types[r * T + j - np])
            };
            let pos = table("embeddings.position_embeddings.weight", (nk + j) as u32);
            let tt = table("embeddings.token_type_embeddings.weight", ty);
            x.extend((0..c).map(|i| word[i] + pos[i] + tt[i]));
        }
    }
    let mut x = layernorm(st, &x, "embeddings.LayerNorm", cfg.eps);
    let mask_ref = &mask;
    let keep: Vec<f32> = (0..B)
        .flat_map(|r| (0..s).map(move |j| if j < nk + np || mask_ref[r * T + j - nk - np] != 0 { 1.0 } else { 0.0 }))
        .collect();
    let n = B * tx;
    for l in 0..cfg.layers {
        let m = |s: &str| format!("encoder.layer.{l}.{s}");
        let q = linear(st, &x, n, &m("attention.self.query"));
        let mut k = linear(st, &x, n, &m("attention.self.key"));
        let mut v = linear(st, &x, n, &m("attention.self.value"));
        if let Some(pf) = prefix {
            k = concat(&pf[l].0, &k, B, c);
            v = concat(&pf[l].1, &v, B, c);
        }
        let d = ra::Dims { b: B, t: tx, s, nh, nkv: nh, hs };
        let (a, _) = ra::attention_forward(&d, &q, &k, &v, Some(&keep), false, 1.0 / (hs as f32).sqrt());
        let o = linear(st, &a, n, &m("attention.output.dense"));
        let x1 = layernorm(st, &re::add_forward(&o, &x), &m("attention.output.LayerNorm"), cfg.eps);
        let h = re::gelu_forward(&linear(st, &x1, n, &m("intermediate.dense")), cfg.gelu_tanh);
        let o2 = linear(st, &h, n, &m("output.dense"));
        x = layernorm(st, &re::add_forward(&o2, &x1), &m("output.LayerNorm"), cfg.eps);
    }
    let mut pooled = vec![0f32; B * c];
    for r in 0..B {
        let real: Vec<usize> = (0..T).filter(|&j| mask[r * T + j] != 0).collect();
        for &j in &real {
            for i in 0..c {
                pooled[r * c + i] += x[(r * tx + np + j) * c + i] / real.len() as f32;
            }
        }
    }
    linear(st, &pooled, B, "head")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn gpu_logits(st: &ParamStore, m: &Method) -> Vec<f32> {
    let mut se = exec(dev(), st, m, None);
    se.exec.forward(dev()).unwrap();
    se.exec.read(dev(), se.logits).unwrap()
}

#[test]
fn prompt_graph_matches_cpu_concatenation() {
    let d = dev();
    for (p, init) in [(3, PromptInit::RandomDiscrete), (1, PromptInit::Random)] {
        let m = prompt_method(p, init);
        let mut st = tiny_store(d);
        classifier::prepare_method(d, &mut st, &m).unwrap();
        let table = read(&st, prompt::PROMPT_EMBEDDINGS);
        assert_eq!(table.len(), p * 8);
        if init == PromptInit::RandomDiscrete {
            // every row is a row of the word embeddings
            let we = read(&st, "embeddings.word_embeddings.weight");
            assert!(table.chunks(8).all(|r| we.chunks(8).any(|w| w == r)), "prompt rows are not vocabulary rows");
        }
        let want = cpu_logits(&st, &tiny_cfg(), Some(&table), None);
        let got = gpu_logits(&st, &m);
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "prompt P={p}: GPU logits differ from the CPU reference by {diff}");
        // and the virtual tokens matter: without them the logits are the plain model's, which differ
        let plain = gpu_logits(&tiny_store(d), &Method::Probe);
        assert!(max_diff(&plain, &got) > 1e-3, "the prompt changed nothing");
    }
}

#[test]
fn prefix_graph_matches_attention_over_concatenated_kv() {
    let d = dev();
    for p in [1, 4] {
        let m = prefix_method(p);
        let mut st = tiny_store(d);
        classifier::prepare_method(d, &mut st, &m).unwrap();
        let pf: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
            .map(|l| (read(&st, &prompt::prefix_name(l, false)), read(&st, &prompt::prefix_name(l, true))))
            .collect();
        let want = cpu_logits(&st, &tiny_cfg(), None, Some(&pf));
        let got = gpu_logits(&st, &m);
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "prefix P={p}: GPU logits differ from the CPU reference by {diff}");
        let plain = gpu_logits(&tiny_store(d), &Method::Probe);
        assert!(max_diff(&plain, &got) > 1e-3, "the prefix changed nothing");
    }
}

#[test]
fn prompt_and_prefix_gradients_match_finite_differences() {
    let d = dev();
    for (m, n) in [(prompt_method(2, PromptInit::RandomDiscrete), 3), (prefix_method(2), 2 * 2 + 2)] {
        let mut st = tiny_store(d);
        classifier::prepare_method(d, &mut st, &m).unwrap();
        let mut se = exec(d, &st, &m, Some(OptimConfig::adamw(1e-2, 0.0)));
        // the prompt (or 4 prefix tables) and the head's weight and bias
        assert_eq!(se.exec.gradient_buffers(), n, "{}", m.name());
        assert!(check_grads(d, &st, &mut se) >= 3 * n);
    }
}

#[test]
fn prompt_loss_falls() {
    // three rows that act only through attention on a two-layer model with the head frozen: a modest fall
    loss_falls(&prompt_method(3, PromptInit::RandomDiscrete), 0.95);
}

#[test]
fn prefix_loss_falls() {
    loss_falls(&prefix_method(3), 0.9);
}

#[test]
fn prompt_adapter_round_trip_with_peft_names() {
    round_trip(
        &prompt_method(3, PromptInit::RandomDiscrete),
        "PROMPT_TUNING",
        &["prompt_embeddings", "base_model.head.weight"],
    );
}

#[test]
fn prefix_adapter_round_trip_with_peft_names() {
    round_trip(&prefix_method(2), "PREFIX_TUNING", &["prompt_embeddings", "base_model.head.bias"]);
}

/// The files as peft writes them: one `prompt_embeddings` tensor ([P, C], or [P, L·2·C] with layer l's key
/// prefix in column chunk 2l and its value prefix in chunk 2l+1), and the prompt-learning config fields.
#[test]
fn saved_adapters_have_peft_layout_and_config() {
    let d = dev();
    for m in [prompt_method(3, PromptInit::Random), prefix_method(2)] {
        let mut st = tiny_store(d);
        classifier::prepare_method(d, &mut st, &m).unwrap();
        let dir = std::env::temp_dir().join(format!("rime-prompt-prefix-{}-{}", m.name(), std::process::id()));
        classifier::save_adapter(d, &st, &m, "tiny", &["a".into(), "b".into(), "c".into()], &dir).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        let prefix = m.name() == "prefix";
        assert_eq!(cfg["peft_type"], if prefix { "PREFIX_TUNING" } else { "PROMPT_TUNING" });
        assert_eq!(cfg["task_type"], "SEQ_CLS");
        assert_eq!(cfg["num_virtual_tokens"], if prefix { 2 } else { 3 });
        assert_eq!((cfg["token_dim"].as_u64(), cfg["num_layers"].as_u64()), (Some(8), Some(2)));
        assert_eq!(
            (cfg["num_attention_heads"].as_u64(), cfg["num_transformer_submodules"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(cfg["modules_to_save"], serde_json::json!(["head"]));
        for lora_only in ["r", "lora_alpha", "target_modules", "use_dora"] {
            assert!(cfg.get(lora_only).is_none(), "{lora_only} in a {} config", cfg["peft_type"]);
        }
        if prefix {
            assert_eq!(cfg["prefix_projection"], false);
        } else {
            assert_eq!(cfg["prompt_tuning_init"], "RANDOM");
        }
        let ad = rime_io::peft::PeftAdapter::load(&dir).unwrap();
        let t = ad.get("prompt_embeddings").expect("prompt_embeddings");
        if prefix {
            assert_eq!(t.shape, [2, 2 * 2 * 8]);
            for l in 0..2 {
                for (kind, value) in [(0, false), (1, true)] {
                    let part = read(&st, &prompt::prefix_name(l, value));
                    for r in 0..2 {
                        let j = 2 * l + kind;
                        assert_eq!(
                            &t.data[r * 32 + j * 8..r * 32 + (j + 1) * 8],
                            &part[r * 8..(r + 1) * 8],
                            "chunk {j} row {r}"
                        );
                    }
                }
            }
        } else {
            assert_eq!(t.shape, [3, 8]);
            assert_eq!(t.data, read(&st, prompt::PROMPT_EMBEDDINGS));
        }
        let names: Vec<&str> = ad.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn virtual_tokens_must_fit_the_position_table() {
    let cfg = tiny_cfg(); // 16 positions
    let vt = VirtualTokens { prompt: 10, prefix: 0 };
    assert!(classifier::check_virtual_fit(vt, 6, &cfg).is_ok());
    let e = classifier::check_virtual_fit(vt, 7, &cfg).unwrap_err();
    assert!(matches!(e, rime_peft::Error::Invalid { field: "num_virtual_tokens", .. }), "{e}");
    let e = e.to_string();
    assert!(e.starts_with("num_virtual_tokens 10 ") && e.contains("max_length 7") && e.contains("16"), "{e}");
    assert!(!e.contains("--"), "the library names config fields, not CLI flags: {e}");
    // the graph builder refuses too: 12 prefix tokens + 5 real tokens need 17 positions
    let d = dev();
    let m = prefix_method(12);
    let mut st = tiny_store(d);
    classifier::prepare_method(d, &mut st, &m).unwrap();
    let hook = classifier::hook_for(&m);
    let e = classifier::build_exec(d, &st, &cfg, "", hook.as_ref(), B, T, None).err().unwrap().to_string();
    assert!(e.contains("12 virtual tokens") && e.contains("16"), "{e}");
    // peft's input layout: zeros/ones in front, positions from P, pooling over the real tokens only
    let (tt, pos, mask, pool) =
        bert::virtual_inputs(&[1, 1, 0], &[1, 1, 0], 1, 3, VirtualTokens { prompt: 2, prefix: 0 });
    assert_eq!((tt, pos), (vec![0, 0, 1, 1, 0], vec![0, 1, 2, 3, 4]));
    assert_eq!((mask, pool), (vec![1., 1., 1., 1., 0.], vec![0., 0., 0.5, 0.5, 0.]));
    let (tt, pos, mask, _) = bert::virtual_inputs(&[0, 0], &[1, 0], 1, 2, VirtualTokens { prompt: 0, prefix: 3 });
    assert_eq!((tt, pos, mask), (vec![0, 0], vec![3, 4], vec![1., 1., 1., 1., 0.]));
}
