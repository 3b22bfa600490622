//! The merge config: mergekit's YAML shape (`merge_method`, `base_model`, `models`, `parameters`, `dtype`),
//! parsed into a checked [`MergeConfig`]. Defaults follow mergekit 0.1.5 (`normalize` true for linear, TIES
//! and DELLA, false for task_arithmetic, DARE, breadcrumbs and della_linear; `rescale` true for DARE and DELLA;
//! `lambda` 1; `density` 1; `gamma` 0.01; `epsilon` 0.15; `select_topk` 1). Whatever rime cannot honour is an error
//! naming the key, never silently ignored; the one exception is `int8_mask`, a mergekit memory saving with no
//! effect on the result here (masks are never materialised in a model dtype).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// The merge methods rime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    Slerp,
    /// Model soup by greedy selection on held-out accuracy (rime adapters with heads).
    GreedySoup,
    /// aTLAS: one learned coefficient per task vector per tensor.
    Atlas,
    /// Model breadcrumbs: each task vector keeps the magnitudes between its largest `gamma` share and its
    /// smallest, `density` of them (mergekit's `magnitude_outliers`), then a weighted sum.
    Breadcrumbs,
    /// Breadcrumbs' sparsification, then TIES' sign consensus.
    BreadcrumbsTies,
    /// DELLA: drop probabilities by magnitude rank within each row (density ± epsilon), L1 rescale, TIES'
    /// sign consensus.
    Della,
    /// DELLA's sparsification, then a weighted sum.
    DellaLinear,
    /// SCE: select the elements of largest variance across the task vectors, weight each task vector by its
    /// mean square, elect signs.
    Sce,
}

impl Method {
    pub const ALL: [(&'static str, Method); 13] = [
        ("linear", Method::Linear),
        ("task_arithmetic", Method::TaskArithmetic),
        ("ties", Method::Ties),
        ("dare_linear", Method::DareLinear),
        ("dare_ties", Method::DareTies),
        ("slerp", Method::Slerp),
        ("greedy_soup", Method::GreedySoup),
        ("atlas", Method::Atlas),
        ("breadcrumbs", Method::Breadcrumbs),
        ("breadcrumbs_ties", Method::BreadcrumbsTies),
        ("della", Method::Della),
        ("della_linear", Method::DellaLinear),
        ("sce", Method::Sce),
    ];

    pub fn parse(s: &str) -> Option<Method> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, m)| *m)
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(_, m)| *m == self).map(|(n, _)| *n).unwrap_or("?")
    }

    /// Methods that merge task vectors (model - base) and so need `base_model`.
    pub fn needs_base(self) -> bool {
        !matches!(self, Method::Linear)
    }

    /// Per-model parameters the method reads.
    fn model_params(self) -> &'static [&'static str] {
        match self {
            Method::Linear | Method::TaskArithmetic => &["weight"],
            Method::Ties | Method::DareLinear | Method::DareTies => &["weight", "density"],
            Method::Breadcrumbs | Method::BreadcrumbsTies => &["weight", "density", "gamma"],
            Method::Della | Method::DellaLinear => &["weight", "density", "epsilon"],
            Method::Slerp | Method::GreedySoup | Method::Atlas | Method::Sce => &[],
        }
    }

    /// Global parameters whose value is a path (resolved like model paths) or a word.
    fn string_params(self) -> &'static [&'static str] {
        match self {
            Method::GreedySoup => &["eval_data", "combination", "text_column", "label_column", "task"],
            Method::Atlas => &["train_data", "eval_data", "text_column", "label_column", "task"],
            _ => &[],
        }
    }

    /// Global parameters the method reads (besides the per-model ones, which may also be given globally).
    fn global_params(self) -> &'static [&'static str] {
        match self {
            Method::Linear => &["normalize"],
            Method::TaskArithmetic => &["normalize", "lambda", "int8_mask", "rescale"],
            Method::Ties | Method::Breadcrumbs | Method::BreadcrumbsTies => {
                &["normalize", "lambda", "int8_mask", "rescale"]
            }
            Method::DareLinear | Method::DareTies | Method::Della | Method::DellaLinear => {
                &["normalize", "lambda", "int8_mask", "rescale", "seed"]
            }
            Method::Sce => &["int8_mask", "select_topk"],
            Method::Slerp => &["t"],
            Method::GreedySoup => &["batch_size", "max_length", "eval_limit"],
            Method::Atlas => &["batch_size", "max_length", "steps", "lr", "examples", "seed", "eval_limit"],
        }
    }

    fn default_normalize(self) -> bool {
        matches!(self, Method::Linear | Method::Ties | Method::Della)
    }

    /// mergekit's default for `rescale` (the L1-norm rescale after sparsifying).
    pub fn default_rescale(self) -> bool {
        matches!(self, Method::DareLinear | Method::DareTies | Method::Della | Method::DellaLinear)
    }

    /// mergekit's generalized task arithmetic family (task vectors, optional sparsification and sign consensus).
    pub fn is_gta(self) -> bool {
        matches!(
            self,
            Method::TaskArithmetic
                | Method::Ties
                | Method::DareLinear
                | Method::DareTies
                | Method::Breadcrumbs
                | Method::BreadcrumbsTies
                | Method::Della
                | Method::DellaLinear
        )
    }
}

/// Output element type of floating-point tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    F16,
    BF16,
}

impl OutDtype {
    fn parse(s: &str) -> Option<OutDtype> {
        match s {
            "float32" | "fp32" | "f32" => Some(OutDtype::F32),
            "float16" | "fp16" | "f16" | "half" => Some(OutDtype::F16),
            "bfloat16" | "bf16" => Some(OutDtype::BF16),
            _ => None,
        }
    }
}

/// A parameter value: a number (or bool), or mergekit's per-tensor list
/// `[{filter: "attention", value: 0.3}, {value: 0.7}]` (first entry whose filter is a substring of the tensor
/// name wins; an entry without filter matches every tensor).
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Num(f64),
    Filtered(Vec<(Option<String>, f64)>),
}

impl Param {
    /// The value for one tensor, or None when no filter matches.
    pub fn for_tensor(&self, tensor: &str) -> Option<f64> {
        match self {
            Param::Num(x) => Some(*x),
            Param::Filtered(v) => {
                v.iter().find(|(f, _)| f.as_deref().is_none_or(|f| tensor.contains(f))).map(|(_, x)| *x)
            }
        }
    }

    fn values(&self) -> Vec<f64> {
        match self {
            Param::Num(x) => vec![*x],
            Param::Filtered(v) => v.iter().map(|(_, x)| *x).collect(),
        }
    }
}

/// One input model: its resolved path and its parameters (`weight`, `density`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// As written in the config.
    pub name: String,
    /// A folder or a `.safetensors` file.
    pub path: PathBuf,
    pub weight: Option<Param>,
    pub density: Option<Param>,
    /// breadcrumbs: the share of largest magnitudes dropped (mergekit default 0.01).
    pub gamma: Option<Param>,
    /// DELLA: the spread of keep probabilities around `density` (mergekit default 0.15).
    pub epsilon: Option<Param>,
}

/// A checked merge config.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    /// The config file, for messages.
    pub source: PathBuf,
    pub method: Method,
    pub base: Option<ModelEntry>,
    /// The models listed under `models`, base included if listed there.
    pub models: Vec<ModelEntry>,
    pub normalize: bool,
    pub lambda: Param,
    pub t: Option<Param>,
    pub seed: u64,
    /// Output dtype of float tensors (`out_dtype`, else `dtype`); None keeps each tensor's dtype as stored in
    /// the base (or first) model.
    pub dtype: Option<OutDtype>,
    /// mergekit's `dtype`: inputs are rounded to it on load and the merge rounds where torch would compute in
    /// it. None: each tensor computes in the common type of its stored inputs (float16 or bfloat16 when all
    /// inputs store it, else f32).
    pub compute_dtype: Option<OutDtype>,
    /// The L1-norm rescale after sparsifying (`rescale`; mergekit's default per method).
    pub rescale: bool,
    /// SCE's `select_topk` (share of the elements of largest variance kept; 1 keeps all).
    pub select_topk: f64,
    /// Keys accepted but without effect (e.g. `int8_mask`), for the report.
    pub notes: Vec<String>,
    /// Word- or path-valued parameters of greedy_soup / atlas (`eval_data`, `train_data`, ...), as written.
    pub strings: std::collections::BTreeMap<String, String>,
    /// Numeric parameters of greedy_soup / atlas (`steps`, `lr`, `batch_size`, ...).
    pub numbers: std::collections::BTreeMap<String, f64>,
}

impl MergeConfig {
    /// Reads and checks a YAML config; relative model paths are looked up as given, then next to the config
    /// file, then in the models folder (`rime_io::locate_model`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<MergeConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config { file: path.display().to_string(), msg: format!("cannot read: {e}") })?;
        Self::from_yaml_str(&text, path)
    }

    /// Parses config text; `source` names it in messages and anchors relative model paths.
    pub fn from_yaml_str(text: &str, source: &Path) -> Result<MergeConfig> {
        let file = source.display().to_string();
        let err = |msg: String| Error::Config { file: file.clone(), msg };
        let doc: Value = serde_norway::from_str(text).map_err(|e| err(format!("not valid YAML: {e}")))?;
        let top = doc.as_object().ok_or_else(|| err("expected a mapping at the top level".into()))?;
        const TOP: [&str; 8] =
            ["merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"];
        for k in top.keys() {
            if k == "slices" {
                return Err(err("`slices` is not supported: rime merges whole models tensor by tensor by name; list \
                                the models under `models`"
                    .into()));
            }
            if !TOP.contains(&k.as_str()) {
                return Err(err(format!("unknown key `{k}` (known: {})", TOP.join(", "))));
            }
        }
        let method_name = top
            .get("merge_method")
            .and_then(Value::as_str)
            .ok_or_else(|| err("`merge_method` is missing or not a string".into()))?;
        let method = Method::parse(method_name).ok_or_else(|| {
            let known: Vec<&str> = Method::ALL.iter().map(|(n, _)| *n).collect();
            err(format!("unknown merge_method `{method_name}` (rime knows: {})", known.join(", ")))
        })?;
        let mut notes = Vec::new();
        match top.get("tokenizer_source") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "base" => {}
            Some(v) => return Err(err(format!("tokenizer_source {v} is not supported (only `base`)"))),
        }
        let dtype_of = |key: &str| -> Result<Option<OutDtype>> {
            match top.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => OutDtype::parse(s)
                    .map(Some)
                    .ok_or_else(|| err(format!("`{key}: {s}` is not one of float32, float16, bfloat16"))),
                Some(v) => Err(err(format!("`{key}` must be a string, found {v}"))),
            }
        };
        // mergekit: `dtype` is the compute type and `out_dtype` the output type (default: dtype).
        let compute_dtype = dtype_of("dtype")?;
        let dtype = dtype_of("out_dtype")?.or(compute_dtype);

        let base_dir = source.parent().unwrap_or(Path::new("."));
        let base_name = match top.get("base_model") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => return Err(err(format!("`base_model` must be a path, found {v}"))),
        };
        // Global parameters; per-model parameter names given globally act as defaults for every model.
        let allowed_global: Vec<&str> = method.global_params().iter().chain(method.model_params()).copied().collect();
        let mut strings = std::collections::BTreeMap::new();
        let mut params_v = top.get("parameters").cloned();
        if let Some(Value::Object(m)) = params_v.as_mut() {
            for k in method.string_params() {
                match m.remove(*k) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(v)) => {
                        strings.insert(k.to_string(), v);
                    }
                    Some(v) => return Err(err(format!("parameters: `{k}` must be a string, found {v}"))),
                }
            }
            if !method.string_params().is_empty() {
                for k in m.keys() {
                    if !allowed_global.contains(&k.as_str()) {
                        let mut known: Vec<&str> = allowed_global.clone();
                        known.extend(method.string_params());
                        return Err(err(format!(
                            "parameters: unknown parameter `{k}` for merge_method `{}` (it reads: {})",
                            method.as_str(),
                            known.join(", ")
                        )));
                    }
                }
            }
        }
        let gparams = parse_params(params_v.as_ref(), "parameters", &allowed_global, method, &err)?;
        let mut numbers = std::collections::BTreeMap::new();
        if matches!(method, Method::GreedySoup | Method::Atlas) {
            for (k, v) in &gparams {
                match v {
                    Param::Num(x) if x.is_finite() => {
                        numbers.insert(k.clone(), *x);
                    }
                    _ => return Err(err(format!("parameters: `{k}` must be a number"))),
                }
            }
        }
        let gget = |k: &str| gparams.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mut models = Vec::new();
        let list = match top.get("models") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(v) => return Err(err(format!("`models` must be a list, found {v}"))),
        };
        for (i, m) in list.iter().enumerate() {
            let (name, params) = match m {
                Value::String(s) => (s.clone(), None),
                Value::Object(o) => {
                    for k in o.keys() {
                        if k != "model" && k != "parameters" {
                            return Err(err(format!("models[{i}]: unknown key `{k}` (known: model, parameters)")));
                        }
                    }
                    let name = o
                        .get("model")
                        .and_then(Value::as_str)
                        .ok_or_else(|| err(format!("models[{i}]: `model` is missing or not a string")))?;
                    (name.to_string(), o.get("parameters"))
                }
                v => return Err(err(format!("models[{i}]: expected `{{model: PATH, parameters: ...}}`, found {v}"))),
            };
            let what = format!("models[{i}] (`{name}`) parameters");
            let p = parse_params(params, &what, method.model_params(), method, &err)?;
            let pget = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).or_else(|| gget(k));
            let path = resolve_model(&name, base_dir).ok_or_else(|| {
                err(format!(
                    "models[{i}]: model `{name}` not found (as a path, next to the config, or in the models \
                     folder){}",
                    hub_hint(&name)
                ))
            })?;
            models.push(ModelEntry {
                name,
                path,
                weight: pget("weight"),
                density: pget("density"),
                gamma: pget("gamma"),
                epsilon: pget("epsilon"),
            });
        }
        let base = match base_name {
            None => None,
            Some(name) => {
                let path = resolve_model(&name, base_dir).ok_or_else(|| {
                    err(format!(
                        "base_model `{name}` not found (as a path, next to the config, or in the models folder){}",
                        hub_hint(&name)
                    ))
                })?;
                Some(ModelEntry { name, path, weight: None, density: None, gamma: None, epsilon: None })
            }
        };
        if method.needs_base() && base.is_none() {
            return Err(err(format!("merge_method `{}` needs `base_model` (it merges model - base)", method.as_str())));
        }
        for m in &models {
            if let Some(d) = &m.density {
                for x in d.values() {
                    if !(x > 0.0 && x <= 1.0) {
                        return Err(err(format!("model `{}`: density {x} is outside (0, 1]", m.name)));
                    }
                }
            }
        }
        let normalize = match gget("normalize") {
            None => method.default_normalize(),
            Some(Param::Num(x)) => x != 0.0,
            Some(_) => return Err(err("`normalize` must be true or false, not a per-tensor list".into())),
        };
        if gget("int8_mask").is_some() {
            notes.push(
                "int8_mask: no effect on the result (mergekit stores its 0/1 masks as int8 instead of the compute \
                 dtype, which saves memory and changes no value; rime's masks are never stored in a model dtype)"
                    .into(),
            );
        }
        let rescale = match gget("rescale") {
            None => method.default_rescale(),
            Some(Param::Num(x)) => x != 0.0,
            Some(_) => return Err(err("`rescale` must be true or false, not a per-tensor list".into())),
        };
        let select_topk = match gget("select_topk") {
            None => 1.0,
            Some(Param::Num(x)) if (0.0..=1.0).contains(&x) => x,
            Some(v) => return Err(err(format!("parameters: `select_topk` must be a number in [0, 1], found {v:?}"))),
        };
        let seed = match gget("seed") {
            None => 0,
            Some(Param::Num(x)) if x >= 0.0 && x.fract() == 0.0 => x as u64,
            Some(v) => return Err(err(format!("`seed` must be a non-negative integer, found {v:?}"))),
        };
        let t = gget("t");
        if let Some(t) = &t {
            if t.values().iter().any(|x| !x.is_finite()) {
                return Err(err("`t` must be finite".into()));
            }
        }
        let cfg = MergeConfig {
            source: source.to_path_buf(),
            method,
            base,
            models,
            normalize,
            lambda: gget("lambda").unwrap_or(Param::Num(1.0)),
            t,
            seed,
            dtype,
            compute_dtype,
            rescale,
            select_topk,
            notes,
            strings,
            numbers,
        };
        cfg.check_inputs()?;
        Ok(cfg)
    }

    /// Checks that the config names the inputs its method needs (a YAML config is checked when read; a
    /// config built in code should be checked with this before merging).
    pub fn check_inputs(&self) -> Result<()> {
        let err = |msg: String| Error::Config { file: self.source.display().to_string(), msg };
        self.check_values()?;
        match self.method {
            Method::Linear if self.models.is_empty() => {
                Err(err("linear needs at least one model under `models`".into()))
            }
            Method::Slerp => {
                if self.t.is_none() {
                    return Err(err("slerp needs `parameters: {t: ...}`".into()));
                }
                let others = self.task_models();
                if others.len() != 1 {
                    return Err(err(format!(
                        "slerp interpolates base_model and exactly one other model; {} others listed",
                        others.len()
                    )));
                }
                Ok(())
            }
            m if m.needs_base() && self.task_models().is_empty() => {
                Err(err(format!("{} needs at least one model besides base_model", m.as_str())))
            }
            _ => Ok(()),
        }
    }

    /// Every numeric parameter is finite and representable in f32 (the merge computes in f32: a weight of 1e39
    /// would be Inf there and write a NaN model); `density` is in (0, 1] and slerp's `t` in [0, 1].
    pub fn check_values(&self) -> Result<()> {
        let err = |msg: String| Error::Config { file: self.source.display().to_string(), msg };
        let f32_ok = |x: f64| x.is_finite() && x.abs() <= f32::MAX as f64;
        let mut all: Vec<(String, &Param)> = vec![("`lambda`".into(), &self.lambda)];
        if let Some(t) = &self.t {
            all.push(("`t`".into(), t));
        }
        for m in self.models.iter().chain(self.base.iter()) {
            for (k, p) in [("weight", &m.weight), ("density", &m.density), ("gamma", &m.gamma), ("epsilon", &m.epsilon)]
            {
                if let Some(p) = p {
                    all.push((format!("model `{}`: `{k}`", m.name), p));
                }
            }
        }
        for (what, p) in &all {
            if let Some(x) = p.values().into_iter().find(|&x| !f32_ok(x)) {
                return Err(err(format!(
                    "{what} {} is not a finite number within ±{:e} (f32)",
                    crate::show(x),
                    f32::MAX
                )));
            }
            let range = if what == "`t`" {
                Some((0.0, 1.0, "[0, 1] (slerp interpolates between base_model, t = 0, and the other model, t = 1)"))
            } else if what.ends_with(": `density`") {
                Some((f64::MIN_POSITIVE, 1.0, "(0, 1]"))
            } else if what.ends_with(": `gamma`") {
                Some((0.0, 1.0, "[0, 1] (the share of largest magnitudes breadcrumbs drops)"))
            } else if what.ends_with(": `epsilon`") {
                Some((0.0, 1.0, "[0, 1) (DELLA keeps with probabilities density ± epsilon)"))
            } else {
                None
            };
            if let Some((lo, hi, text)) = range {
                if let Some(x) = p.values().into_iter().find(|&x| !(lo..=hi).contains(&x)) {
                    return Err(err(format!("{what} {x} is outside {text}")));
                }
            }
        }
        for (k, &x) in &self.numbers {
            if !f32_ok(x) {
                return Err(err(format!(
                    "parameters: `{k}` {} is not a finite number within ±{:e}",
                    crate::show(x),
                    f32::MAX
                )));
            }
            // greedy_soup / atlas counts (which would otherwise be clamped) and the learning rate.
            let least = match k.as_str() {
                "batch_size" | "examples" | "eval_limit" => Some(1.0),
                "max_length" => Some(8.0),
                "steps" => Some(0.0),
                _ => None,
            };
            if let Some(lo) = least {
                if x < lo || x.fract() != 0.0 {
                    return Err(err(format!("parameters: `{k}` {x} must be an integer of at least {lo}")));
                }
            }
            if k == "lr" && x <= 0.0 {
                return Err(err(format!("parameters: `lr` {x} must be positive")));
            }
        }
        Ok(())
    }

    /// The models that contribute task vectors: those listed, the base excluded (mergekit does the same).
    pub fn task_models(&self) -> Vec<&ModelEntry> {
        let base = self.base.as_ref().map(|b| canon(&b.path));
        self.models.iter().filter(|m| Some(canon(&m.path)) != base).collect()
    }
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// For a name shaped like a Hugging Face Hub id (`org/name`, not a path that exists): how to use a local copy,
/// since rime never downloads.
fn hub_hint(name: &str) -> String {
    let parts: Vec<&str> = name.split('/').collect();
    let hub_like = parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
        && !name.starts_with('/')
        && !name.starts_with('~');
    if !hub_like {
        return String::new();
    }
    format!(
        "; `{name}` looks like a Hugging Face Hub id, and rime reads local files only: download it where a hub is \
         reachable (e.g. `huggingface-cli download {name} --local-dir models/{}`) and write that folder's path \
         (relative paths are taken from the config's folder, then the models folder)",
        parts[1]
    )
}

fn resolve_model(name: &str, config_dir: &Path) -> Option<PathBuf> {
    let p = PathBuf::from(name);
    if p.exists() {
        return Some(p);
    }
    let q = config_dir.join(name);
    if q.exists() {
        return Some(q);
    }
    rime_io::locate_model(name).ok()
}

fn parse_params(
    v: Option<&Value>,
    what: &str,
    allowed: &[&str],
    method: Method,
    err: &dyn Fn(String) -> Error,
) -> Result<Vec<(String, Param)>> {
    let map = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(v) => return Err(err(format!("{what}: expected a mapping, found {v}"))),
    };
    let mut out = Vec::new();
    for (k, v) in map {
        if !allowed.contains(&k.as_str()) {
            return Err(err(format!(
                "{what}: unknown parameter `{k}` for merge_method `{}` (it reads: {})",
                method.as_str(),
                allowed.join(", ")
            )));
        }
        let p = match v {
            Value::Bool(b) => Param::Num(*b as u8 as f64),
            Value::Number(n) => Param::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::Array(a) if a.iter().all(Value::is_number) => {
                return Err(err(format!(
                "{what}: `{k}` is a gradient list; rime does not interpolate values across layers, give a number or \
                     [{{filter: ..., value: ...}}] entries"
            )))
            }
            Value::Array(a) => {
                let mut entries = Vec::new();
                for e in a {
                    let o = e
                        .as_object()
                        .ok_or_else(|| err(format!("{what}: `{k}`: expected {{filter, value}}, found {e}")))?;
                    if let Some(u) = o.keys().find(|u| *u != "filter" && *u != "value") {
                        return Err(err(format!("{what}: `{k}`: unknown key `{u}` in {e} (known: filter, value)")));
                    }
                    let value = o
                        .get("value")
                        .and_then(|x| x.as_f64().or(x.as_bool().map(|b| b as u8 as f64)))
                        .ok_or_else(|| err(format!("{what}: `{k}`: entry {e} has no numeric `value`")))?;
                    let filter = match o.get("filter") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(f) => return Err(err(format!("{what}: `{k}`: filter {f} must be a string"))),
                    };
                    entries.push((filter, value));
                }
                Param::Filtered(entries)
            }
            v => return Err(err(format!("{what}: `{k}` must be a number, found {v}"))),
        };
        out.push((k.clone(), p));
    }
    Ok(out)
}
