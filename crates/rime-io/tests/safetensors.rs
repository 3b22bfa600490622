//! safetensors reading, writing and validation: round trips, sharded checkpoints, dtype conversion, a
//! programmatic fuzz of corrupted headers, and the real MiniLM checkpoint against its config.json.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use rime_io::{Checkpoint, Dtype, Error, ModelConfig, StoreDtype};

fn sample_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        ("a.weight".into(), vec![2, 3], vec![1.0, -2.0, 3.5, 0.25, -0.125, 100.0]),
        ("b.bias".into(), vec![3], vec![0.5, 1.5, -7.0]),
        ("c.scalar".into(), vec![], vec![42.0]),
    ]
}

fn write_sample(path: &Path, dtype: StoreDtype) {
    let t = sample_tensors();
    let refs: Vec<(String, Vec<usize>, &[f32])> =
        t.iter().map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice())).collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    rime_io::write_safetensors_as(path, &refs, &meta, dtype).expect("write");
}

#[test]
fn f32_round_trip_keeps_names_shapes_values_and_metadata() {
    let dir = common::scratch("st_roundtrip");
    let p = dir.join("m.safetensors");
    write_sample(&p, StoreDtype::F32);
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.names(), vec!["a.weight", "b.bias", "c.scalar"]);
    assert_eq!(ck.metadata().get("format").map(String::as_str), Some("pt"));
    for (n, s, d) in sample_tensors() {
        let (dt, shape) = ck.info(&n).unwrap();
        assert_eq!(dt, Dtype::F32);
        assert_eq!(shape, s.as_slice());
        assert_eq!(ck.get_f32(&n).unwrap(), d);
    }
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn f16_and_bf16_outputs_read_back_as_f32() {
    let dir = common::scratch("st_half");
    for (dtype, want) in [(StoreDtype::F16, Dtype::F16), (StoreDtype::BF16, Dtype::BF16)] {
        let p = dir.join(format!("{want}.safetensors"));
        write_sample(&p, dtype);
        let ck = Checkpoint::open(&p).unwrap();
        let raw = ck.get_raw("a.weight").unwrap();
        assert_eq!(raw.dtype, want);
        assert_eq!(raw.bytes.len(), 12);
        // All sample values are exact in both half formats.
        assert_eq!(ck.get_f32("a.weight").unwrap(), sample_tensors()[0].2);
    }
}

#[test]
fn sharded_index_opens_every_shard() {
    let dir = common::scratch("st_sharded");
    let t = sample_tensors();
    let meta = BTreeMap::new();
    rime_io::write_safetensors(
        dir.join("model-00001-of-00002.safetensors"),
        &[(t[0].0.clone(), t[0].1.clone(), &t[0].2)],
        &meta,
    )
    .unwrap();
    rime_io::write_safetensors(
        dir.join("model-00002-of-00002.safetensors"),
        &[(t[1].0.clone(), t[1].1.clone(), &t[1].2), (t[2].0.clone(), t[2].1.clone(), &t[2].2)],
        &meta,
    )
    .unwrap();
    let index = serde_json::json!({
        "metadata": {"total_size": 40},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.bias": "model-00002-of-00002.safetensors",
            "c.scalar": "model-00002-of-00002.safetensors"
        }
    });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.len(), 3);
    assert_eq!(ck.get_f32("b.bias").unwrap(), t[1].2);
    assert!(ck.file_of("a.weight").unwrap().ends_with("model-00001-of-00002.safetensors"));

    // An index naming a tensor its shard lacks is an error naming the shard and the tensor.
    let bad = serde_json::json!({"weight_map": {"zzz": "model-00001-of-00002.safetensors"}});
    std::fs::write(dir.join("bad.index.json"), bad.to_string()).unwrap();
    let e = Checkpoint::open(dir.join("bad.index.json")).unwrap_err().to_string();
    assert!(e.contains("model-00001-of-00002.safetensors") && e.contains("zzz"), "{e}");
}

#[test]
fn missing_tensor_lists_names_that_exist() {
    let dir = common::scratch("st_missing");
    let p = dir.join("m.safetensors");
    write_sample(&p, StoreDtype::F32);
    let ck = Checkpoint::open(&p).unwrap();
    let e = ck.get_f32("a.weigth").unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }));
    let msg = e.to_string();
    assert!(msg.contains("m.safetensors") && msg.contains("a.weigth") && msg.contains("`a.weight`"), "{msg}");
}

#[test]
fn integer_tensors_read_as_i64_and_refuse_f32() {
    let dir = common::scratch("st_int");
    let p = dir.join("ids.safetensors");
    let ids: Vec<i64> = vec![0, 1, 2, -5, i64::MAX];
    rime_io::write_safetensors_raw(
        &p,
        &[rime_io::RawTensorOwned {
            name: "position_ids".into(),
            dtype: Dtype::I64,
            shape: vec![1, 5],
            bytes: ids.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }],
        &BTreeMap::new(),
    )
    .unwrap();
    let ck = Checkpoint::open(&p).unwrap();
    assert_eq!(ck.get_i64("position_ids").unwrap(), ids);
    let e = ck.get_f32("position_ids").unwrap_err().to_string();
    assert!(e.contains("position_ids") && e.contains("I64") && e.contains("ids.safetensors"), "{e}");
}

#[test]
fn writer_rejects_shape_data_mismatch_and_leaves_no_file() {
    let dir = common::scratch("st_badwrite");
    let p = dir.join("out.safetensors");
    let data = [1.0f32, 2.0];
    let e = rime_io::write_safetensors(&p, &[("w".into(), vec![3], &data[..])], &BTreeMap::new()).unwrap_err();
    assert!(e.to_string().contains("out.safetensors") && e.to_string().contains("`w`"), "{e}");
    assert!(!p.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

/// A tiny deterministic generator so the fuzz is the same on every run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data_len));
    v
}

fn assert_err_names_file(path: &Path, what: &str) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    match Checkpoint::open(path) {
        Ok(_) => panic!("{what}: corrupted file {name} opened without error"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&name), "{what}: message does not name the file: {msg}");
        }
    }
}

#[test]
fn corrupted_headers_are_errors_naming_the_file() {
    let dir = common::scratch("st_fuzz");
    let good = dir.join("good.safetensors");
    write_sample(&good, StoreDtype::F32);
    let bytes = std::fs::read(&good).unwrap();
    Checkpoint::open(&good).unwrap();
    let mut n = 0usize;

    // 1. Every truncation of a valid file.
    for len in 0..bytes.len() {
        let p = dir.join(format!("trunc_{len}.safetensors"));
        std::fs::write(&p, &bytes[..len]).unwrap();
        assert_err_names_file(&p, &format!("truncated to {len} bytes"));
        n += 1;
    }

    // 2. Header lengths that lie.
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    for (i, lie) in [u64::MAX, u64::MAX / 2, bytes.len() as u64, bytes.len() as u64 - 7, 0, 1, 2, hlen - 1, hlen + 1]
        .iter()
        .enumerate()
    {
        let mut b = bytes.clone();
        b[..8].copy_from_slice(&lie.to_le_bytes());
        let p = dir.join(format!("hlen_{i}.safetensors"));
        std::fs::write(&p, &b).unwrap();
        assert_err_names_file(&p, &format!("header length {lie}"));
        n += 1;
    }

    // 3. Hand-written bad headers, each with the data section it claims or a wrong one.
    let entry = |name: &str, dtype: &str, shape: &str, offs: &str| {
        format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offs}}}"#)
    };
    let cases: Vec<(String, usize)> = vec![
        ("".into(), 0),
        ("{".into(), 0),
        ("[]".into(), 0),
        ("null".into(), 0),
        ("\"x\"".into(), 0),
        ("{\"a\":1}".into(), 0),
        ("{\"a\":{}}".into(), 0),
        (format!("{{{}}}", entry("a", "F99", "[2]", "[0,8]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[-2]", "[0,8]")), 8),
        (format!("{{{}}}", entry("a", "F32", "\"2\"", "[0,8]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[2.5]", "[0,8]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[2]", "[8,0]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[2]", "[0,8,9]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[2]", "[0]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[2]", "[0,-8]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[2]", "[0,16]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[3]", "[0,8]")), 8),
        (format!("{{{}}}", entry("a", "F16", "[2]", "[0,8]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[2]", "[0,8]")), 12),
        (format!("{{{}}}", entry("a", "F32", "[2]", "[4,12]")), 12),
        (format!("{{{}}}", entry("a", "F32", "[4294967296,4294967296,4294967296]", "[0,8]")), 8),
        (format!("{{{}}}", entry("a", "F32", "[18446744073709551615]", "[0,8]")), 8),
        (format!("{{{},{}}}", entry("a", "F32", "[2]", "[0,8]"), entry("b", "F32", "[2]", "[4,12]")), 12),
        (format!("{{{},{}}}", entry("a", "F32", "[2]", "[0,8]"), entry("b", "F32", "[2]", "[0,8]")), 8),
        (format!("{{{},{}}}", entry("a", "F32", "[2]", "[0,8]"), entry("b", "F32", "[1]", "[12,16]")), 16),
        (format!("{{\"__metadata__\":{{\"k\":1}},{}}}", entry("a", "F32", "[2]", "[0,8]")), 8),
        (format!("{{\"__metadata__\":[],{}}}", entry("a", "F32", "[2]", "[0,8]")), 8),
        (format!("{{{}}}", r#""a":{"dtype":3,"shape":[2],"data_offsets":[0,8]}"#), 8),
        (format!("{{{}}}", r#""a":{"shape":[2],"data_offsets":[0,8]}"#), 8),
        (format!("{{{}}}", r#""a":{"dtype":"F32","data_offsets":[0,8]}"#), 8),
        (format!("{{{}}}", r#""a":{"dtype":"F32","shape":[2]}"#), 8),
        ("{\"a\":{\"dtype\":\"F32\"".into(), 8),
        ("\u{feff}{}".into(), 0),
    ];
    for (i, (header, data_len)) in cases.iter().enumerate() {
        let p = dir.join(format!("case_{i}.safetensors"));
        std::fs::write(&p, file_with_header(header, *data_len)).unwrap();
        assert_err_names_file(&p, &format!("case {i}: {header}"));
        n += 1;
    }
    // Invalid UTF-8 in the header.
    let mut b = file_with_header("{\"a\":1}", 0);
    b[9] = 0xff;
    let p = dir.join("utf8.safetensors");
    std::fs::write(&p, &b).unwrap();
    assert_err_names_file(&p, "invalid UTF-8");

    // 4. Random byte flips in the header: never a panic; every error names the file.
    let mut rng = Lcg(7);
    let header_end = 8 + hlen as usize;
    for i in 0..400 {
        let mut b = bytes.clone();
        let flips = 1 + rng.next() % 4;
        for _ in 0..flips {
            let at = 8 + (rng.next() as usize) % (header_end - 8);
            b[at] = (rng.next() & 0xff) as u8;
        }
        let p = dir.join(format!("flip_{i}.safetensors"));
        std::fs::write(&p, &b).unwrap();
        if let Err(e) = Checkpoint::open(&p) {
            let msg = e.to_string();
            assert!(msg.contains(&format!("flip_{i}.safetensors")), "{msg}");
        }
        n += 1;
    }
    assert!(n > 600, "only {n} corrupted files tried");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn real_minilm_checkpoint_matches_its_config() {
    let Some(dir) = common::model("all-minilm-l6-v2") else { return };
    let ck = Checkpoint::open(&dir).unwrap();
    let cfg = ModelConfig::from_file(&dir).unwrap();
    assert_eq!(cfg.architecture, rime_io::Architecture::Bert);
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads), (384, 6, 12));
    assert_eq!((cfg.intermediate_size, cfg.vocab_size, cfg.type_vocab_size), (1536, 30522, 2));
    assert_eq!(cfg.layer_norm_eps, 1e-12);
    assert_eq!(cfg.pad_token_id, Some(0));
    cfg.check_checkpoint(&ck).unwrap();
    let (dt, shape) = ck.info("embeddings.word_embeddings.weight").unwrap();
    assert_eq!((dt, shape), (Dtype::F32, &[30522usize, 384][..]));
    let w = ck.get_f32("embeddings.word_embeddings.weight").unwrap();
    assert_eq!(w.len(), 30522 * 384);
    assert!(w.iter().all(|x| x.is_finite()));
    // position_ids is an I64 buffer: readable as integers.
    let pos = ck.get_i64("embeddings.position_ids").unwrap();
    assert_eq!(&pos[..4], &[0, 1, 2, 3]);

    // A config that disagrees is an error naming the tensor.
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("30522", "30000");
    let bad = ModelConfig::from_json_str(&text, &dir.join("config.json")).unwrap();
    let e = bad.check_checkpoint(&ck).unwrap_err().to_string();
    assert!(e.contains("embeddings.word_embeddings.weight") && e.contains("30522") && e.contains("vocab_size"), "{e}");
}

#[test]
fn config_errors_name_the_field() {
    let p = Path::new("/x/config.json");
    let e = ModelConfig::from_json_str(r#"{"model_type":"gpt_neox","architectures":["GPTNeoXForCausalLM"]}"#, p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/x/config.json") && e.contains("gpt_neox") && e.contains("unknown architecture"), "{e}");
    let e = ModelConfig::from_json_str(r#"{"model_type":"llama","hidden_size":64}"#, p).unwrap_err().to_string();
    assert!(e.contains("num_hidden_layers") && e.contains("missing"), "{e}");
    let e = ModelConfig::from_json_str("{not json", p).unwrap_err().to_string();
    assert!(e.contains("/x/config.json") && e.contains("JSON"), "{e}");
    let llama = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,"num_hidden_layers":30,"num_attention_heads":9,
        "num_key_value_heads":3,"intermediate_size":1536,"vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000.0,
        "tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":[2,0],"pad_token_id":null}"#;
    let c = ModelConfig::from_json_str(llama, p).unwrap();
    assert_eq!(c.architecture, rime_io::Architecture::Llama);
    assert_eq!((c.num_key_value_heads, c.head_dim(), c.rope_theta), (3, 64, 100000.0));
    assert_eq!((c.bos_token_id, c.eos_token_id.clone(), c.pad_token_id), (Some(1), vec![2, 0], None));
    assert_eq!(c.hidden_act, "silu");
    assert!(!c.expected_shapes().iter().any(|(n, _)| n == "lm_head.weight"));
}

#[test]
fn read_f32_into_reads_slices_and_release_keeps_the_data() {
    let dir = common::scratch("st_slices");
    for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::BF16] {
        let p = dir.join(format!("m_{dtype:?}.safetensors"));
        write_sample(&p, dtype);
        let ck = Checkpoint::open(&p).unwrap();
        for (n, _, _) in sample_tensors() {
            let whole = ck.get_f32(&n).unwrap();
            for first in 0..whole.len() {
                for len in 0..=whole.len() - first {
                    let mut buf = vec![f32::NAN; len];
                    ck.read_f32_into(&n, first, &mut buf).unwrap();
                    assert_eq!(buf, whole[first..first + len], "{n} {dtype:?} [{first}, +{len})");
                }
            }
            // Dropping the resident pages (all, a middle range, an empty one) leaves the bytes readable.
            let size = ck.info(&n).unwrap().0.size();
            ck.release(&n, size..2 * size).unwrap();
            ck.release(&n, 3..3).unwrap();
            ck.release(&n, ..).unwrap();
            assert_eq!(ck.get_f32(&n).unwrap(), whole, "{n} after release");
            let mut buf = vec![0.0; whole.len() + 1];
            let e = ck.read_f32_into(&n, 0, &mut buf).unwrap_err().to_string();
            assert!(e.contains(&n) && e.contains("elements"), "{e}");
        }
        assert!(ck.release("missing", ..).is_err());
    }
    let ip = dir.join("int.safetensors");
    let raw = rime_io::RawTensorOwned { name: "pos".into(), dtype: Dtype::I64, shape: vec![2], bytes: vec![0; 16] };
    rime_io::write_safetensors_raw(&ip, &[raw], &BTreeMap::new()).unwrap();
    let e = Checkpoint::open(&ip).unwrap().read_f32_into("pos", 0, &mut [0.0]).unwrap_err().to_string();
    assert!(e.contains("is I64") && e.contains("needs a float type"), "{e}");
}
