//! Hugging Face PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`), read and written
//! so that peft loads what rime writes and rime writes back what it read unchanged. The config keeps every
//! field peft wrote (unknown ones included) and exposes the ones rime uses; tensor names stay peft's
//! (`base_model.model.<module>.lora_A.weight`, without the adapter name).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{display, format_err, io_err, Error, Result};
use crate::safetensors::{write_atomically, write_safetensors_as, Checkpoint, Dtype, StoreDtype};

/// File names peft uses.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// rime's own adapter settings (the `rime_*` keys: class labels, image settings, ...), beside adapter_config.json
/// so that peft, which warns on keys its config classes lack, never sees them.
pub const RIME_JSON: &str = "rime.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// `adapter_config.json`: the fields rime reads, plus all fields as written (kept for the round trip).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `LORA`, `IA3`, ...
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub fan_in_fan_out: bool,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub bias: String,
    pub base_model_name_or_path: Option<String>,
    pub task_type: Option<String>,
    pub modules_to_save: Vec<String>,
    /// Per-module overrides of `r` and `lora_alpha`.
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Every field of the file; [`AdapterConfig::to_json`] starts from it and overwrites the typed fields.
    pub raw: Map<String, Value>,
}

impl AdapterConfig {
    /// A LoRA config with peft's defaults for the fields not given.
    pub fn lora(r: usize, lora_alpha: f64, target_modules: Vec<String>) -> AdapterConfig {
        AdapterConfig {
            peft_type: "LORA".into(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules,
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            bias: "none".into(),
            base_model_name_or_path: None,
            task_type: None,
            modules_to_save: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            raw: Map::new(),
        }
    }

    /// The LoRA scale `lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA).
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Reads `adapter_config.json`, and the `rime_*` keys of the [`RIME_JSON`] beside it when there is one
    /// (they land in [`AdapterConfig::raw`], as older adapters that kept them in adapter_config.json have them).
    pub fn from_file(path: impl AsRef<Path>) -> Result<AdapterConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(io_err(path, "cannot read"))?;
        let mut config = Self::from_json_str(&text, path)?;
        let extra = path.with_file_name(RIME_JSON);
        if extra.is_file() {
            let text = std::fs::read_to_string(&extra).map_err(io_err(&extra, "cannot read"))?;
            let json: Value =
                serde_json::from_str(&text).map_err(|e| format_err(&extra, format!("not valid JSON: {e}")))?;
            let Value::Object(m) = json else { return Err(format_err(&extra, "not a JSON object")) };
            for (k, v) in m {
                if !k.starts_with("rime_") {
                    return Err(format_err(&extra, format!("key `{k}`: only rime_* settings belong here")));
                }
                if config.raw.get(&k).is_some_and(|old| *old != v) {
                    return Err(format_err(
                        &extra,
                        format!("`{k}` differs from the `{k}` of {}; keep one of them", display(path)),
                    ));
                }
                config.raw.insert(k, v);
            }
        }
        Ok(config)
    }

    /// The `rime_*` keys of [`AdapterConfig::raw`], which [`PeftAdapter::save`] writes to [`RIME_JSON`].
    pub fn rime_json(&self) -> serde_json::Map<String, Value> {
        self.raw.iter().filter(|(k, _)| k.starts_with("rime_")).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Parses adapter_config.json text; `source` names it in messages.
    pub fn from_json_str(text: &str, source: &Path) -> Result<AdapterConfig> {
        let json: Value = serde_json::from_str(text).map_err(|e| format_err(source, format!("not valid JSON: {e}")))?;
        let raw = json.as_object().cloned().ok_or_else(|| format_err(source, "not a JSON object"))?;
        let file = display(source);
        let err = |field: &str, msg: String| Error::Config { file: file.clone(), field: field.into(), msg };
        let get = |k: &str| raw.get(k).filter(|v| !v.is_null());
        let string = |k: &str| -> Result<Option<String>> {
            match get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(err(k, format!("expected a string, found {v}"))),
            }
        };
        let boolean = |k: &str| -> Result<bool> {
            match get(k) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(err(k, format!("expected true/false, found {v}"))),
            }
        };
        let number = |k: &str, default: f64| -> Result<f64> {
            match get(k) {
                None => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| err(k, format!("expected a number, found {v}"))),
            }
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            match get(k) {
                None => Ok(Vec::new()),
                Some(Value::String(s)) => Ok(vec![s.clone()]), // peft allows a regex string
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_str().map(String::from).ok_or_else(|| err(k, format!("expected strings, found {v}"))))
                    .collect(),
                Some(v) => Err(err(k, format!("expected a list of strings, found {v}"))),
            }
        };
        let peft_type = string("peft_type")?.ok_or_else(|| err("peft_type", "missing".into()))?;
        let r = match get("r") {
            None if peft_type != "LORA" => 0,
            None => return Err(err("r", "missing".into())),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .filter(|&x| x > 0)
                .ok_or_else(|| err("r", format!("expected a positive integer, found {v}")))?,
        };
        let mut rank_pattern = BTreeMap::new();
        if let Some(Value::Object(m)) = get("rank_pattern") {
            for (k, v) in m {
                let x =
                    v.as_u64().ok_or_else(|| err("rank_pattern", format!("`{k}`: expected an integer, found {v}")))?;
                rank_pattern.insert(k.clone(), x as usize);
            }
        }
        let mut alpha_pattern = BTreeMap::new();
        if let Some(Value::Object(m)) = get("alpha_pattern") {
            for (k, v) in m {
                let x =
                    v.as_f64().ok_or_else(|| err("alpha_pattern", format!("`{k}`: expected a number, found {v}")))?;
                alpha_pattern.insert(k.clone(), x);
            }
        }
        let config = AdapterConfig {
            r,
            lora_alpha: number("lora_alpha", 8.0)?,
            lora_dropout: number("lora_dropout", 0.0)?,
            target_modules: strings("target_modules")?,
            fan_in_fan_out: boolean("fan_in_fan_out")?,
            use_rslora: boolean("use_rslora")?,
            use_dora: boolean("use_dora")?,
            bias: string("bias")?.unwrap_or_else(|| "none".into()),
            base_model_name_or_path: string("base_model_name_or_path")?,
            task_type: string("task_type")?,
            modules_to_save: strings("modules_to_save")?,
            rank_pattern,
            alpha_pattern,
            peft_type,
            raw,
        };
        config.check_values(source)?;
        Ok(config)
    }

    /// The JSON peft reads: the fields as read, with the typed fields written over them, less rime's own
    /// `rime_*` keys ([`AdapterConfig::rime_json`]) and the LoRA fields that the type's peft config class has
    /// not (peft warns on each): IA3 keeps `target_modules` and `fan_in_fan_out`, prompt learning none of them.
    pub fn to_json(&self) -> Value {
        let mut m = self.raw.clone();
        m.retain(|k, _| !k.starts_with("rime_"));
        let num = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 9.0e15 {
                Value::from(x as i64)
            } else {
                Value::from(x)
            }
        };
        let opt = |s: &Option<String>| s.clone().map(Value::String).unwrap_or(Value::Null);
        m.insert("peft_type".into(), Value::String(self.peft_type.clone()));
        m.insert("r".into(), Value::from(self.r));
        m.insert("lora_alpha".into(), num(self.lora_alpha));
        m.insert("lora_dropout".into(), Value::from(self.lora_dropout));
        m.insert("target_modules".into(), Value::from(self.target_modules.clone()));
        m.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        m.insert("use_rslora".into(), Value::Bool(self.use_rslora));
        m.insert("use_dora".into(), Value::Bool(self.use_dora));
        m.insert("bias".into(), Value::String(self.bias.clone()));
        m.insert("base_model_name_or_path".into(), opt(&self.base_model_name_or_path));
        m.insert("task_type".into(), opt(&self.task_type));
        m.insert(
            "modules_to_save".into(),
            if self.modules_to_save.is_empty() { Value::Null } else { Value::from(self.modules_to_save.clone()) },
        );
        m.insert(
            "rank_pattern".into(),
            Value::Object(self.rank_pattern.iter().map(|(k, v)| (k.clone(), Value::from(*v))).collect()),
        );
        m.insert(
            "alpha_pattern".into(),
            Value::Object(self.alpha_pattern.iter().map(|(k, v)| (k.clone(), num(*v))).collect()),
        );
        if !m.contains_key("inference_mode") {
            m.insert("inference_mode".into(), Value::Bool(true));
        }
        const NOT_IA3: [&str; 8] =
            ["r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "rank_pattern", "alpha_pattern"];
        const NOT_PROMPT: [&str; 10] = [
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "fan_in_fan_out",
            "use_rslora",
            "use_dora",
            "bias",
            "rank_pattern",
            "alpha_pattern",
        ];
        let drop: &[&str] = match self.peft_type.as_str() {
            "IA3" => &NOT_IA3,
            "PROMPT_TUNING" | "PREFIX_TUNING" => &NOT_PROMPT,
            _ => &[],
        };
        for k in drop {
            m.remove(*k);
        }
        Value::Object(m)
    }
}

/// One adapter tensor, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A PEFT adapter folder in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter {
    pub config: AdapterConfig,
    /// Sorted by name.
    pub tensors: Vec<AdapterTensor>,
    /// The safetensors `__metadata__` (peft writes `{"format": "pt"}`).
    pub metadata: BTreeMap<String, String>,
    /// How tensors are stored on save (as loaded; F32 for a new adapter).
    pub store_dtype: StoreDtype,
}

/// The two factors of one LoRA-adapted module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraPair {
    /// Module path without peft's prefix, e.g. `encoder.layer.0.attention.self.query`.
    pub module: String,
    /// Tensor names of A `[r, in]` and B `[out, r]`.
    pub a: String,
    pub b: String,
}

/// peft's prefix on saved tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

impl PeftAdapter {
    /// An adapter from tensors named as peft saves them; metadata `{"format": "pt"}`.
    pub fn new(config: AdapterConfig, mut tensors: Vec<AdapterTensor>) -> PeftAdapter {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        PeftAdapter { config, tensors, metadata, store_dtype: StoreDtype::F32 }
    }

    /// Reads an adapter folder.
    pub fn load(dir: impl AsRef<Path>) -> Result<PeftAdapter> {
        let dir = dir.as_ref();
        let config = AdapterConfig::from_file(dir.join(ADAPTER_CONFIG))?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        let ck = Checkpoint::open(&weights)?;
        let mut tensors = Vec::with_capacity(ck.len());
        let mut store_dtype = StoreDtype::F32;
        for name in ck.names() {
            let (dtype, shape) = ck.info(name)?;
            store_dtype = match dtype {
                Dtype::F16 => StoreDtype::F16,
                Dtype::BF16 => StoreDtype::BF16,
                _ => StoreDtype::F32,
            };
            tensors.push(AdapterTensor { name: name.to_string(), shape: shape.to_vec(), data: ck.get_f32(name)? });
        }
        let adapter = PeftAdapter { config, tensors, metadata: ck.metadata().clone(), store_dtype };
        adapter.validate(&weights)?;
        adapter.check_self(dir, &weights)?;
        Ok(adapter)
    }

    /// Checks that every LoRA pair is complete and that A and B agree on the rank.
    fn validate(&self, file: &Path) -> Result<()> {
        for t in &self.tensors {
            let (is_a, module) = match lora_module(&t.name) {
                Some(x) => x,
                None => continue,
            };
            let other =
                if is_a { t.name.replace(".lora_A.", ".lora_B.") } else { t.name.replace(".lora_B.", ".lora_A.") };
            let o = self.get(&other).ok_or_else(|| Error::Tensor {
                file: display(file),
                tensor: t.name.clone(),
                msg: format!("LoRA factor of `{module}` has no partner `{other}`"),
            })?;
            if t.shape.len() != 2 || o.shape.len() != 2 {
                return Err(Error::Tensor {
                    file: display(file),
                    tensor: t.name.clone(),
                    msg: format!("LoRA factors must be 2-D, found {:?} and {:?}", t.shape, o.shape),
                });
            }
            let (a, b) = if is_a { (t, o) } else { (o, t) };
            if a.shape[0] != b.shape[1] {
                return Err(Error::Tensor {
                    file: display(file),
                    tensor: t.name.clone(),
                    msg: format!("rank disagrees: lora_A is {:?}, lora_B is {:?}", a.shape, b.shape),
                });
            }
        }
        Ok(())
    }

    /// Renames `base_model.model.<from><rest>` to `base_model.model.<to><rest>` (e.g. `from` = `bert.`, `to`
    /// empty: a `PeftModel(BertForSequenceClassification)` adapter applied to a bare `BertModel` checkpoint).
    /// Returns how many tensors were renamed.
    pub fn rebase_modules(&mut self, from: &str, to: &str) -> usize {
        let mut n = 0;
        for t in &mut self.tensors {
            if let Some(rest) = t.name.strip_prefix(PEFT_PREFIX).and_then(|r| r.strip_prefix(from)) {
                t.name = format!("{PEFT_PREFIX}{to}{rest}");
                n += 1;
            }
        }
        self.tensors.sort_by(|a, b| a.name.cmp(&b.name));
        n
    }

    /// A tensor by its saved name.
    pub fn get(&self, name: &str) -> Option<&AdapterTensor> {
        self.tensors.binary_search_by(|t| t.name.as_str().cmp(name)).ok().map(|i| &self.tensors[i])
    }

    /// The LoRA pairs, sorted by module.
    pub fn lora_pairs(&self) -> Vec<LoraPair> {
        self.tensors
            .iter()
            .filter_map(|t| match lora_module(&t.name) {
                Some((true, module)) => Some(LoraPair {
                    module: module.strip_prefix(PEFT_PREFIX).unwrap_or(module).to_string(),
                    a: t.name.clone(),
                    b: t.name.replace(".lora_A.", ".lora_B."),
                }),
                _ => None,
            })
            .collect()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if needed), each
    /// atomically.
    /// Refuses (before writing anything) an adapter with a NaN/Inf tensor, naming it.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let weights = dir.join(ADAPTER_WEIGHTS);
        for t in &self.tensors {
            crate::error::check_finite(&display(&weights), &t.name, &t.data)?;
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir, "cannot create folder"))?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        let list: Vec<(String, Vec<usize>, &[f32])> =
            self.tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.data.as_slice())).collect();
        write_safetensors_as(&weights, &list, &self.metadata, self.store_dtype)?;
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&self.config.to_json())
            .map_err(|e| format_err(&cfg_path, format!("cannot serialize: {e}")))?;
        write_atomically(&cfg_path, |w| {
            use std::io::Write;
            w.write_all(text.as_bytes())
        })?;
        let extra = dir.join(RIME_JSON);
        let rime = self.config.rime_json();
        if rime.is_empty() {
            if extra.is_file() {
                std::fs::remove_file(&extra).map_err(io_err(&extra, "cannot remove"))?;
            }
            return Ok(());
        }
        let text = serde_json::to_string_pretty(&Value::Object(rime))
            .map_err(|e| format_err(&extra, format!("cannot serialize: {e}")))?;
        write_atomically(&extra, |w| {
            use std::io::Write;
            w.write_all(text.as_bytes())
        })
    }
}

/// For a `...<module>.lora_A.weight` / `lora_B` name: (is A, module path with prefix).
fn lora_module(name: &str) -> Option<(bool, &str)> {
    if let Some(i) = name.find(".lora_A.") {
        Some((true, &name[..i]))
    } else {
        name.find(".lora_B.").map(|i| (false, &name[..i]))
    }
}
