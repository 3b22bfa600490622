//! GGUF: dequantization of hand-made blocks against values computed by hand, a synthetic file with every
//! metadata type, corrupted files, the RoPE un-permutation, and the real SmolLM2 Q4_1 file (config, every
//! tensor, tokenizer ids against the golden prompt).

mod common;

use rime_io::gguf::{
    dequantize, dequantize_block_q4_0, dequantize_block_q4_1, dequantize_block_q4_k, dequantize_block_q6_k,
    dequantize_block_q8_0, hf_name, reverse_permute,
};
use rime_io::{Checkpoint, GgmlType, GgufFile, GgufValue, Padding};

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

#[test]
fn q8_0_block_matches_hand_computed_values() {
    let mut blk = f16_bytes(0.5).to_vec();
    let qs: [i8; 32] = core::array::from_fn(|i| match i {
        0 => -128,
        1 => 127,
        2 => -1,
        _ => i as i8 - 16,
    });
    blk.extend(qs.iter().map(|&q| q as u8));
    let mut y = Vec::new();
    dequantize_block_q8_0(&blk, &mut y);
    assert_eq!(&y[..4], &[-64.0, 63.5, -0.5, -6.5]);
    assert_eq!(y[31], 7.5);
    assert_eq!(y.len(), 32);
}

#[test]
fn q4_0_block_matches_hand_computed_values() {
    let mut blk = f16_bytes(2.0).to_vec();
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut y = Vec::new();
    dequantize_block_q4_0(&blk, &mut y);
    // Low nibble j -> (j - 8) * 2 at position j; high nibble 15 - j -> (7 - j) * 2 at position j + 16.
    assert_eq!(&y[..3], &[-16.0, -14.0, -12.0]);
    assert_eq!(y[15], 14.0);
    assert_eq!(&y[16..18], &[14.0, 12.0]);
    assert_eq!(y[31], -16.0);
}

#[test]
fn q4_1_block_matches_hand_computed_values() {
    let mut blk = f16_bytes(0.25).to_vec();
    blk.extend(f16_bytes(-1.0));
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut y = Vec::new();
    dequantize_block_q4_1(&blk, &mut y);
    // y = q * 0.25 - 1: low nibbles 0..15 first, then high nibbles 15..0.
    let want: Vec<f32> =
        (0..16).map(|j| j as f32 * 0.25 - 1.0).chain((0..16).map(|j| (15 - j) as f32 * 0.25 - 1.0)).collect();
    assert_eq!(y, want);
    assert_eq!((y[0], y[15], y[16], y[31]), (-1.0, 2.75, 2.75, -1.0));
}

#[test]
fn q4_k_block_unpacks_6_bit_scales_and_mins_by_hand() {
    let mut blk = f16_bytes(1.0).to_vec();
    blk.extend(f16_bytes(0.5));
    // scales[0..4]: sc 1..4 (the top 2 bits of byte 0 feed sc4's high bits);
    // scales[4..8]: m 5..8 (the top 2 bits of byte 7 = 2 feed m7's high bits);
    // scales[8..12]: low nibble = sc4..7 low bits, high nibble = m4..7 low bits.
    blk.extend([1 | (1 << 6), 2, 3, 4, 5, 6, 7, 8 | (2 << 6), 0x21, 0x43, 0x65, 0x87]);
    blk.extend((0..128u32).map(|i| ((i & 0xF) | ((15 - (i & 0xF)) << 4)) as u8));
    assert_eq!(blk.len(), 144);
    // (scale, min) per sub-block, unpacked by hand from the bytes above.
    let sm = [(1.0, 5.0), (2.0, 6.0), (3.0, 7.0), (4.0, 8.0), (17.0, 2.0), (3.0, 4.0), (5.0, 6.0), (7.0, 40.0)];
    let mut y = Vec::new();
    dequantize_block_q4_k(&blk, &mut y);
    assert_eq!(y.len(), 256);
    for c in 0..4 {
        for l in 0..32 {
            let q = (32 * c + l) as u32 & 0xF;
            let (s0, m0) = sm[2 * c];
            let (s1, m1) = sm[2 * c + 1];
            assert_eq!(y[64 * c + l], 1.0 * s0 * q as f32 - 0.5 * m0, "c {c} l {l}");
            assert_eq!(y[64 * c + 32 + l], 1.0 * s1 * (15 - q) as f32 - 0.5 * m1, "c {c} l {l}");
        }
    }
    // Spot values: sub-block 7 (high nibbles of bytes 96..128), byte 96 has q = 15: 7*15 - 20 = 85.
    assert_eq!(y[224], 85.0);
    assert_eq!(y[0], -2.5);
}

#[test]
fn q6_k_block_matches_hand_computed_values() {
    let mut blk = vec![0u8; 210];
    // ql: low nibble 1 and high nibble 2 everywhere; qh: all bits set to pattern 0b11_10_01_00.
    for b in &mut blk[..128] {
        *b = 0x21;
    }
    for b in &mut blk[128..192] {
        *b = 0b1110_0100;
    }
    for k in 0..16 {
        blk[192 + k] = (k as i8 - 8) as u8;
    }
    blk[208..210].copy_from_slice(&f16_bytes(0.5));
    let mut y = Vec::new();
    dequantize_block_q6_k(&blk, &mut y);
    assert_eq!(y.len(), 256);
    // Group g of 32 in each half of 128 takes its 2 high bits from (qh >> 2g) & 3 = g, and its low 4 bits from
    // ql's low nibble (= 1) for g = 0, 1 or high nibble (= 2) for g = 2, 3: q = low | g << 4, minus 32.
    for (e, &got) in y.iter().enumerate() {
        let (n, r) = (e / 128, e % 128);
        let (g, l) = (r / 32, r % 32);
        let low = if g < 2 { 1 } else { 2 };
        let q = (low | ((g as i32) << 4)) - 32;
        let sc = (n * 8 + l / 16 + 2 * g) as f32 - 8.0;
        assert_eq!(got, 0.5 * sc * q as f32, "element {e}");
    }
    // By hand: element 0: q = 1 - 32 = -31, scale -8 -> 0.5 * -8 * -31 = 124.
    assert_eq!(y[0], 124.0);
    // Element 255: half 1, group 3, l 31: q = 2 | 3 << 4 = 50 - 32 = 18; scale index 8 + 1 + 6 = 15 -> 7.
    assert_eq!(y[255], 0.5 * 7.0 * 18.0);
}

#[test]
fn reverse_permute_matches_transformers_reshape_swapaxes() {
    // rows = 8, 2 heads, dim = 2: head rows [r0 r1 r2 r3] = (d0 j0, d0 j1, d1 j0, d1 j1) -> (j0 d0, j0 d1, j1 d0, j1 d1).
    let w: Vec<f32> = (0..8).flat_map(|r| [r as f32, r as f32 + 0.5]).collect();
    let out = reverse_permute(&w, &[8, 2], 2).unwrap();
    let rows: Vec<f32> = out.chunks(2).map(|c| c[0]).collect();
    assert_eq!(rows, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    assert_eq!(out[1], 0.5);
    assert!(reverse_permute(&w, &[8, 2], 3).is_none());
}

#[test]
fn llama_tensor_names_map_to_hugging_face() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.12.attn_k.weight", "model.layers.12.self_attn.k_proj.weight"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"),
        ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
        ("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ];
    for (g, h) in cases {
        assert_eq!(hf_name(g).as_deref(), Some(h), "{g}");
    }
    assert_eq!(hf_name("rope_freqs.weight"), None);
    assert_eq!(hf_name("blk.x.attn_q.weight"), None);
}

/// Writes a small GGUF v3 file: every metadata type, and tensors of several types.
struct GgufBuilder {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufBuilder {
    fn new() -> Self {
        GgufBuilder { kv: Vec::new(), n_kv: 0, tensors: Vec::new() }
    }
    fn s(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) {
        Self::s(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
    }
    fn kv_str(&mut self, key: &str, v: &str) {
        let mut b = Vec::new();
        Self::s(&mut b, v);
        self.kv(key, 8, &b);
    }
    fn kv_u32(&mut self, key: &str, v: u32) {
        self.kv(key, 4, &v.to_le_bytes());
    }
    fn kv_str_array(&mut self, key: &str, items: &[&str]) {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((items.len() as u64).to_le_bytes());
        for it in items {
            Self::s(&mut b, it);
        }
        self.kv(key, 9, &b);
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
    }
    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            Self::s(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend(data);
        }
        out
    }
}

fn sample_gguf() -> Vec<u8> {
    let mut g = GgufBuilder::new();
    g.kv_str("general.architecture", "llama");
    g.kv("t.u8", 0, &[200]);
    g.kv("t.i8", 1, &[0xFE]);
    g.kv("t.u16", 2, &500u16.to_le_bytes());
    g.kv("t.i16", 3, &(-500i16).to_le_bytes());
    g.kv_u32("t.u32", 70000);
    g.kv("t.i32", 5, &(-70000i32).to_le_bytes());
    g.kv("t.f32", 6, &1.5f32.to_le_bytes());
    g.kv("t.bool", 7, &[1]);
    g.kv("t.u64", 10, &(1u64 << 40).to_le_bytes());
    g.kv("t.i64", 11, &(-(1i64 << 40)).to_le_bytes());
    g.kv("t.f64", 12, &0.25f64.to_le_bytes());
    let mut nested = 9u32.to_le_bytes().to_vec(); // array of arrays of i32
    nested.extend(2u64.to_le_bytes());
    for row in [[1i32, 2], [3, 4]] {
        nested.extend(5u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        for x in row {
            nested.extend(x.to_le_bytes());
        }
    }
    g.kv("t.nested", 9, &nested);
    g.kv_str_array("t.strings", &["a", "bc", ""]);
    // F32 [rows 2, cols 3] in PyTorch order = ggml dims [3, 2].
    let f: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    g.tensor("w.f32", &[3, 2], 0, f);
    let h: Vec<u8> = [0.5f32, -2.0].iter().flat_map(|&x| f16_bytes(x)).collect();
    g.tensor("w.f16", &[2], 1, h);
    let mut q8 = f16_bytes(0.5).to_vec();
    q8.extend((0..32).map(|i| i as u8));
    g.tensor("w.q8_0", &[32], 8, q8);
    let mut q41 = f16_bytes(0.25).to_vec();
    q41.extend(f16_bytes(-1.0));
    q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    g.tensor("w.q4_1", &[32, 1], 3, q41);
    g.tensor("w.q5_1", &[32], 7, vec![0; 24]);
    g.build()
}

#[test]
fn synthetic_gguf_reads_every_metadata_type_and_tensor_type() {
    let dir = common::scratch("gguf_synth");
    let p = dir.join("tiny.gguf");
    std::fs::write(&p, sample_gguf()).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!((g.version(), g.alignment()), (3, 32));
    assert_eq!(g.get("t.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(g.get("t.i8"), Some(&GgufValue::I8(-2)));
    assert_eq!(g.get("t.u16"), Some(&GgufValue::U16(500)));
    assert_eq!(g.get("t.i16"), Some(&GgufValue::I16(-500)));
    assert_eq!(g.get("t.u32").unwrap().as_u64(), Some(70000));
    assert_eq!(g.get("t.i32").unwrap().as_i64(), Some(-70000));
    assert_eq!(g.get("t.f32"), Some(&GgufValue::F32(1.5)));
    assert_eq!(g.get("t.bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(g.get("t.u64"), Some(&GgufValue::U64(1 << 40)));
    assert_eq!(g.get("t.i64"), Some(&GgufValue::I64(-(1 << 40))));
    assert_eq!(g.get("t.f64").unwrap().as_f64(), Some(0.25));
    let nested = g.get("t.nested").unwrap().as_array().unwrap();
    assert_eq!(nested[1], GgufValue::Array(vec![GgufValue::I32(3), GgufValue::I32(4)]));
    let strs: Vec<&str> = g.get("t.strings").unwrap().as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(strs, vec!["a", "bc", ""]);

    let t = g.tensor_info("w.f32").unwrap();
    assert_eq!((t.ggml_type, t.dims.clone(), t.shape()), (GgmlType::F32, vec![3, 2], vec![2, 3]));
    assert_eq!(g.dequantize("w.f32").unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(g.dequantize("w.f16").unwrap(), vec![0.5, -2.0]);
    let q8 = g.dequantize("w.q8_0").unwrap();
    assert_eq!((q8[0], q8[1], q8[31]), (0.0, 0.5, 15.5));
    assert_eq!(g.tensor_info("w.q4_1").unwrap().shape(), vec![1, 32]);
    assert_eq!(g.dequantize("w.q4_1").unwrap()[15], 2.75);

    let e = g.dequantize("w.q5_1").unwrap_err().to_string();
    assert!(e.contains("tiny.gguf") && e.contains("w.q5_1") && e.contains("Q5_1"), "{e}");
    let e = g.dequantize("w.nope").unwrap_err().to_string();
    assert!(e.contains("w.nope") && e.contains("w.f32"), "{e}");
    // Not a llama file as far as config is concerned: missing keys are named.
    let e = g.model_config().unwrap_err().to_string();
    assert!(e.contains("llama.embedding_length") && e.contains("missing"), "{e}");
}

#[test]
fn corrupted_gguf_files_are_errors_naming_the_file() {
    let dir = common::scratch("gguf_fuzz");
    let good = sample_gguf();
    let mut n = 0;
    for len in (0..good.len()).step_by(3) {
        let p = dir.join(format!("trunc_{len}.gguf"));
        std::fs::write(&p, &good[..len]).unwrap();
        match GgufFile::open(&p) {
            Ok(_) => panic!("truncated to {len} bytes opened"),
            Err(e) => assert!(e.to_string().contains(&format!("trunc_{len}.gguf")), "{e}"),
        }
        n += 1;
    }
    let patch = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let cases = [
        ("magic", patch(0, b"GGML")),
        ("version1", patch(4, &1u32.to_le_bytes())),
        ("version9", patch(4, &9u32.to_le_bytes())),
        ("tensor_count", patch(8, &u64::MAX.to_le_bytes())),
        ("kv_count", patch(16, &(1u64 << 40).to_le_bytes())),
        ("key_len", patch(24, &u64::MAX.to_le_bytes())),
        ("value_type", patch(24 + 8 + 20, &99u32.to_le_bytes())),
    ];
    for (name, bytes) in cases {
        let p = dir.join(format!("{name}.gguf"));
        std::fs::write(&p, &bytes).unwrap();
        let e = GgufFile::open(&p).err().unwrap_or_else(|| panic!("{name} opened")).to_string();
        assert!(e.contains(&format!("{name}.gguf")), "{e}");
        n += 1;
    }
    // Random byte flips anywhere before the data: never a panic, errors name the file.
    let mut state = 11u64;
    for i in 0..300 {
        let mut b = good.clone();
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let at = (state >> 33) as usize % 700.min(b.len());
        b[at] = (state >> 20) as u8;
        let p = dir.join(format!("flip_{i}.gguf"));
        std::fs::write(&p, &b).unwrap();
        if let Err(e) = GgufFile::open(&p) {
            assert!(e.to_string().contains(&format!("flip_{i}.gguf")), "{e}");
        }
        n += 1;
    }
    assert!(n > 300);
    // The unsupported-type path is also hit through the free function.
    assert!(dequantize(GgmlType::Q5K, &[0; 176], 256).is_none());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn real_smollm2_gguf_opens_dequantizes_and_matches_its_config() {
    let Some(path) = common::model("smollm2-135m-instruct.Q4_1.gguf") else { return };
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    let cfg = g.model_config().unwrap();
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size), (576, 30, 1536));
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim()), (9, 3, 64));
    assert_eq!((cfg.vocab_size, cfg.max_position_embeddings), (49152, 8192));
    assert_eq!((cfg.rope_theta, cfg.rms_norm_eps), (100000.0, 1e-5));
    assert!(cfg.tie_word_embeddings);
    assert_eq!((cfg.bos_token_id, cfg.eos_token_id.clone(), cfg.pad_token_id), (Some(1), vec![2], Some(2)));
    g.check_config(&cfg).unwrap();
    assert!(g.unmapped_tensors().is_empty(), "{:?}", g.unmapped_tensors());

    let mut types = std::collections::BTreeSet::new();
    for t in g.tensors() {
        types.insert(t.ggml_type.to_string());
        let data = g.dequantize(&t.name).unwrap();
        assert_eq!(data.len(), t.numel(), "{}", t.name);
        assert!(data.iter().all(|x| x.is_finite()), "{}", t.name);
    }
    assert_eq!(types.into_iter().collect::<Vec<_>>(), vec!["F32", "Q4_1", "Q8_0"]);

    let (name, shape, q) = g.load_hf_tensor("blk.0.attn_q.weight", &cfg).unwrap();
    assert_eq!((name.as_str(), shape.clone()), ("model.layers.0.self_attn.q_proj.weight", vec![576, 576]));
    let raw = g.dequantize("blk.0.attn_q.weight").unwrap();
    // Row 1 of head 0 after un-permuting is row 2 of the GGUF layout (dim 32: out[0, 0, 1] = in[0, 1, 0]).
    assert_eq!(&q[576..1152], &raw[2 * 576..3 * 576]);
    assert_eq!(&q[32 * 576..33 * 576], &raw[576..1152]);
    let (name, shape, _) = g.load_hf_tensor("blk.0.attn_k.weight", &cfg).unwrap();
    assert_eq!((name.as_str(), shape), ("model.layers.0.self_attn.k_proj.weight", vec![192, 576]));

    // A config that disagrees is an error naming the Hugging Face tensor.
    let mut bad = cfg.clone();
    bad.intermediate_size = 1024;
    let e = g.check_config(&bad).unwrap_err().to_string();
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("1536"), "{e}");
}

#[test]
fn real_smollm2_gguf_tokenizer_matches_the_golden_prompt_ids() {
    let Some(path) = common::model("smollm2-135m-instruct.Q4_1.gguf") else { return };
    let Some(golden) = common::golden_file("smollm2_forward.safetensors") else { return };
    let g = GgufFile::open(&path).unwrap();
    let tok = g.tokenizer().unwrap();
    let gold = Checkpoint::open(&golden).unwrap();
    let prompt: String = serde_json::from_str(gold.metadata().get("prompt").unwrap()).unwrap();
    let want: Vec<u32> = gold.get_i64("input_ids").unwrap().iter().map(|&x| x as u32).collect();
    let b = tok.encode_batch(&[&prompt], None, Padding::Longest).unwrap();
    assert_eq!(b.input_ids, want);
    assert_eq!(tok.decode(&b.input_ids, false).unwrap(), prompt);
    assert_eq!(tok.vocab_size(), 49152);
    // Control tokens are special: they encode as one id and are skipped on decode.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    // Digits are split one by one, as SmolLM2's own tokenizer does.
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5);
    let tmpl = g.chat_template().unwrap();
    assert!(tmpl.contains("<|im_start|>"), "{tmpl}");
}

/// A tiny Llama GGUF (hidden 8, 2 heads, 1 KV head, FFN 16, vocab 10, `blocks` blocks of F32 tensors), with
/// `block_count` in the metadata and `edit` applied to the builder before it is written.
fn tiny_llama(block_count: u64, blocks: usize, edit: impl Fn(&mut GgufBuilder)) -> Vec<u8> {
    let mut g = GgufBuilder::new();
    g.kv_str("general.architecture", "llama");
    g.kv("llama.block_count", 10, &block_count.to_le_bytes());
    g.kv_u32("llama.embedding_length", 8);
    g.kv_u32("llama.attention.head_count", 2);
    g.kv_u32("llama.attention.head_count_kv", 1);
    g.kv_u32("llama.feed_forward_length", 16);
    let f32s = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| ((i % 5) as f32 * 0.1).to_le_bytes()).collect() };
    let t = |g: &mut GgufBuilder, name: &str, dims: &[u64]| {
        let n = dims.iter().product::<u64>() as usize;
        g.tensor(name, dims, 0, f32s(n));
    };
    t(&mut g, "token_embd.weight", &[8, 10]);
    t(&mut g, "output_norm.weight", &[8]);
    for b in 0..blocks {
        for (m, dims) in [
            ("attn_q", vec![8, 8]),
            ("attn_k", vec![8, 4]),
            ("attn_v", vec![8, 4]),
            ("attn_output", vec![8, 8]),
            ("ffn_gate", vec![8, 16]),
            ("ffn_up", vec![8, 16]),
            ("ffn_down", vec![16, 8]),
            ("attn_norm", vec![8]),
            ("ffn_norm", vec![8]),
        ] {
            t(&mut g, &format!("blk.{b}.{m}.weight"), &dims);
        }
    }
    edit(&mut g);
    g.build()
}

/// model_config, check_config and every tensor dequantized: what load_gguf does before the device.
fn load_tiny(dir: &std::path::Path, bytes: Vec<u8>) -> rime_io::Result<()> {
    let p = dir.join("tiny-llama.gguf");
    std::fs::write(&p, bytes).unwrap();
    let g = GgufFile::open(&p)?;
    let cfg = g.model_config()?;
    g.load_hf(&cfg)?;
    Ok(())
}

#[test]
fn gguf_bad_input_corpus_names_the_key_or_tensor() {
    let dir = common::scratch("gguf_corpus");
    load_tiny(&dir, tiny_llama(2, 2, |_| {})).unwrap();
    let err = |bytes| load_tiny(&dir, bytes).unwrap_err().to_string();
    // fewer blocks in the metadata than in the file: the unused blocks are named
    let e = err(tiny_llama(1, 2, |_| {}));
    assert!(e.contains("tiny-llama.gguf") && e.contains("`model.layers.1.input_layernorm.weight`"), "{e}");
    // an absurd block count is refused before anything is sized by it
    for n in [3u64, 1 << 40, u64::MAX] {
        let e = err(tiny_llama(n, 2, |_| {}));
        assert!(e.contains("`llama.block_count`") && e.contains("tensors for 2"), "{n}: {e}");
    }
    // a tensor nothing maps
    let e = err(tiny_llama(2, 2, |g| g.tensor("blk.0.attn_q_norm.weight", &[8], 0, vec![0; 32])));
    assert!(e.contains("`blk.0.attn_q_norm.weight`") && e.contains("does not use"), "{e}");
    // rope scaling and partial rotary are not computed
    let e = err(tiny_llama(2, 2, |g| g.kv_str("llama.rope.scaling.type", "linear")));
    assert!(e.contains("`llama.rope.scaling.type`") && e.contains("linear"), "{e}");
    let e = err(tiny_llama(2, 2, |g| g.kv_u32("llama.rope.dimension_count", 2)));
    assert!(e.contains("`llama.rope.dimension_count`"), "{e}");
    // non-finite weights are refused by name
    let e = err(tiny_llama(2, 2, |g| {
        let t = g.tensors.iter_mut().find(|t| t.0 == "blk.1.ffn_norm.weight").unwrap();
        t.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    }));
    assert!(e.contains("`blk.1.ffn_norm.weight`") && e.contains("non-finite"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Opens a GGUF and walks it as the loaders and inspect do; any outcome but a panic is fine.
    fn walk(p: &std::path::Path) {
        if let Ok(g) = GgufFile::open(p) {
            if let Ok(cfg) = g.model_config() {
                let _ = g.load_hf(&cfg);
            }
            let _ = g.tokenizer();
            for t in g.tensors() {
                let _ = g.dequantize(&t.name);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let p = std::env::temp_dir().join(format!("rime-io-gguf-prop-{}-any.gguf", std::process::id()));
            std::fs::write(&p, &bytes).unwrap();
            walk(&p);
        }

        #[test]
        fn damaged_files_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u64>(), 0u8..3), 1..4),
            llama in any::<bool>(),
        ) {
            let mut b = if llama { tiny_llama(2, 2, |_| {}) } else { sample_gguf() };
            for (i, v, kind) in edits {
                let n = b.len();
                match kind {
                    0 => b[i % n] = v as u8,
                    1 => b.truncate(i % n),
                    _ => {
                        let at = i % (n - 7);
                        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
                if b.len() < 8 {
                    break;
                }
            }
            let p = std::env::temp_dir().join(format!("rime-io-gguf-prop-{}-dmg.gguf", std::process::id()));
            std::fs::write(&p, &b).unwrap();
            walk(&p);
        }
    }
}

/// A tiny Gemma 3 GGUF: hidden 8, 2 query heads / 1 KV head of size 8 (not hidden / heads), FFN 16, two blocks,
/// window 4, and a sentencepiece vocabulary without merges (a two-space token, a control token).
fn tiny_gemma(edit: impl Fn(&mut GgufBuilder)) -> Vec<u8> {
    let mut g = GgufBuilder::new();
    g.kv_str("general.architecture", "gemma3");
    g.kv_u32("gemma3.block_count", 2);
    g.kv_u32("gemma3.embedding_length", 8);
    g.kv_u32("gemma3.attention.head_count", 2);
    g.kv_u32("gemma3.attention.head_count_kv", 1);
    g.kv_u32("gemma3.attention.key_length", 8);
    g.kv_u32("gemma3.attention.value_length", 8);
    g.kv_u32("gemma3.attention.sliding_window", 4);
    g.kv_u32("gemma3.feed_forward_length", 16);
    g.kv_u32("gemma3.context_length", 128);
    let tokens =
        ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "▁", "▁a", "  ", "<start_of_turn>", "<end_of_turn>"];
    g.kv_str("tokenizer.ggml.model", "llama");
    g.kv_str_array("tokenizer.ggml.tokens", &tokens);
    let mut types = 5u32.to_le_bytes().to_vec();
    types.extend((tokens.len() as u64).to_le_bytes());
    for t in [3i32, 3, 3, 2, 1, 1, 1, 1, 1, 1, 3, 3] {
        types.extend(t.to_le_bytes());
    }
    g.kv("tokenizer.ggml.token_type", 9, &types);
    g.kv_u32("tokenizer.ggml.bos_token_id", 2);
    g.kv_u32("tokenizer.ggml.eos_token_id", 1);
    g.kv_u32("tokenizer.ggml.unknown_token_id", 3);
    g.kv("tokenizer.ggml.add_bos_token", 7, &[1]);
    let f32s = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| ((i % 7) as f32 * 0.1 - 0.2).to_le_bytes()).collect() };
    let t = |g: &mut GgufBuilder, name: &str, dims: &[u64]| {
        let n = dims.iter().product::<u64>() as usize;
        g.tensor(name, dims, 0, f32s(n));
    };
    t(&mut g, "token_embd.weight", &[8, 12]);
    t(&mut g, "output_norm.weight", &[8]);
    for b in 0..2 {
        for (m, dims) in [
            ("attn_q", vec![8, 16]),
            ("attn_k", vec![8, 8]),
            ("attn_v", vec![8, 8]),
            ("attn_output", vec![16, 8]),
            ("attn_q_norm", vec![8]),
            ("attn_k_norm", vec![8]),
            ("ffn_gate", vec![8, 16]),
            ("ffn_up", vec![8, 16]),
            ("ffn_down", vec![16, 8]),
            ("attn_norm", vec![8]),
            ("post_attention_norm", vec![8]),
            ("ffn_norm", vec![8]),
            ("post_ffw_norm", vec![8]),
        ] {
            t(&mut g, &format!("blk.{b}.{m}.weight"), &dims);
        }
    }
    edit(&mut g);
    g.build()
}

#[test]
fn gemma3_gguf_config_names_and_tokenizer() {
    let dir = common::scratch("gguf_gemma3");
    let p = dir.join("tiny-gemma.gguf");
    std::fs::write(&p, tiny_gemma(|_| {})).unwrap();
    let g = GgufFile::open(&p).unwrap();
    let c = g.model_config().unwrap();
    assert_eq!(c.architecture, rime_io::Architecture::Gemma3);
    let gm = c.gemma3.clone().unwrap();
    assert_eq!((c.head_dim(), gm.sliding_window, gm.sliding_window_pattern), (8, 4, 6));
    assert_eq!((gm.query_pre_attn_scalar, gm.rope_local_base_freq, c.rope_theta), (8.0, 10000.0, 1e6));
    assert!(gm.is_sliding(0) && gm.is_sliding(4) && !gm.is_sliding(5) && gm.is_sliding(6));
    assert_eq!(c.hidden_act, "gelu_pytorch_tanh");
    assert!(c.tie_word_embeddings);
    assert_eq!(c.eos_token_id, vec![1, 11], "<eos> and <end_of_turn>");
    let ts = g.load_hf(&c).unwrap();
    let names: Vec<&str> = ts.iter().map(|t| t.0.as_str()).collect();
    for n in [
        "model.layers.1.pre_feedforward_layernorm.weight",
        "model.layers.1.post_feedforward_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    // q is not un-permuted (llama.cpp permutes Llama's q/k only); norm gains are kept as stored (1 + w)
    let q = ts.iter().find(|t| t.0 == "model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.1, vec![16, 8]);
    assert_eq!(q.2, g.dequantize("blk.0.attn_q.weight").unwrap());
    let n = ts.iter().find(|t| t.0 == "model.layers.0.input_layernorm.weight").unwrap();
    assert_eq!(n.2, g.dequantize("blk.0.attn_norm.weight").unwrap());

    // sentencepiece BPE with merges recovered from the vocabulary, the two-space token respelled, BOS added
    let tok = g.tokenizer().unwrap();
    assert_eq!(tok.encode("ab a", true).unwrap(), vec![2, 6, 8]);
    assert_eq!(tok.encode("a  b", false).unwrap(), vec![4, 9, 5]);
    assert_eq!(tok.encode("<start_of_turn>ab", false).unwrap(), vec![10, 6]);
    assert_eq!(tok.decode(&[6, 8, 9, 5], true).unwrap(), "ab a  b");

    // bad input names the key
    let err = |edit: &dyn Fn(&mut GgufBuilder)| {
        std::fs::write(&p, tiny_gemma(edit)).unwrap();
        GgufFile::open(&p).and_then(|g| g.model_config()).unwrap_err().to_string()
    };
    let e = err(&|g| g.kv_str("gemma3.rope.scaling.type", "linear"));
    assert!(e.contains("`gemma3.rope.scaling.type`"), "{e}");
    let e = err(&|g| g.kv("gemma3.final_logit_softcapping", 6, &30f32.to_le_bytes()));
    assert!(e.contains("`gemma3.final_logit_softcapping`") && e.contains("soft-capping"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
