//! The merge config: mergekit's YAML shape (`merge_method`, `base_model`, `models` or `slices`, `parameters`
//! with numbers, filters and gradient lists, `dtype`, `tokenizer_source` / `tokenizer`, `chat_template`),
//! parsed into a checked [`MergeConfig`]. A merge resolves every parameter per tensor with
//! [`MergeConfig::at_tensor`]; a method that reads a new `Param` field must resolve it there too. Defaults
//! follow mergekit 0.1.5 (`normalize` true for linear, TIES and DELLA, false for task_arithmetic, DARE,
//! breadcrumbs and della_linear; `rescale` true for DARE and DELLA; `lambda` 1; `density` 1; `gamma` 0.01;
//! `epsilon` 0.15; `select_topk` 1). Whatever rime cannot honour is an error
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
    /// One input per output tensor, optionally scaled (`scale`): layer stacking with `slices` (see `slices`).
    Passthrough,
    /// mergekit's Model Stock: base + t (mean - base), t from the mean angle between task vectors.
    ModelStock,
    /// mergekit's NuSLERP: SLERP of two models (or task vectors) by weight, whole tensor, rows or columns.
    Nuslerp,
    /// mergekit's Multi-SLERP: barycentric interpolation of N models (or task vectors) on the sphere.
    Multislerp,
    /// mergekit's Karcher mean of the models on the unit sphere.
    Karcher,
    /// mergekit's Arcee Fusion: the base plus the model's changes where their importance is an outlier.
    ArceeFusion,
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
    pub const ALL: [(&'static str, Method); 19] = [
        ("linear", Method::Linear),
        ("task_arithmetic", Method::TaskArithmetic),
        ("ties", Method::Ties),
        ("dare_linear", Method::DareLinear),
        ("dare_ties", Method::DareTies),
        ("slerp", Method::Slerp),
        ("greedy_soup", Method::GreedySoup),
        ("atlas", Method::Atlas),
        ("passthrough", Method::Passthrough),
        ("model_stock", Method::ModelStock),
        ("nuslerp", Method::Nuslerp),
        ("multislerp", Method::Multislerp),
        ("karcher", Method::Karcher),
        ("arcee_fusion", Method::ArceeFusion),
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
        !matches!(self, Method::Linear | Method::Passthrough | Method::Nuslerp | Method::Multislerp | Method::Karcher)
    }

    /// Per-model parameters the method reads.
    pub(crate) fn model_params(self) -> &'static [&'static str] {
        match self {
            Method::Linear | Method::TaskArithmetic => &["weight"],
            Method::Ties | Method::DareLinear | Method::DareTies => &["weight", "density"],
            Method::Slerp | Method::GreedySoup | Method::Atlas | Method::Sce => &[],
            Method::Passthrough => &["scale"],
            Method::Nuslerp | Method::Multislerp => &["weight"],
            Method::ModelStock | Method::Karcher | Method::ArceeFusion => &[],
            Method::Breadcrumbs | Method::BreadcrumbsTies => &["weight", "density", "gamma"],
            Method::Della | Method::DellaLinear => &["weight", "density", "epsilon"],
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
            Method::Passthrough => &[],
            Method::ModelStock => &["filter_wise"],
            Method::Nuslerp => &["nuslerp_flatten", "nuslerp_row_wise"],
            Method::Multislerp => &["normalize_weights", "eps"],
            Method::Karcher => &["max_iter", "tol"],
            Method::ArceeFusion => &[],
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

/// A parameter value as mergekit 0.1.5 reads one (`mergekit/config.py: evaluate_setting`): a number (or bool);
/// a gradient `[0, 0.5, 1]`, anchors spread evenly over the layers of a slice and interpolated linearly
/// ([`Param::at`]); or a per-tensor list `[{filter: "attention", value: 0.3}, {value: 0.7}]` (the first entry
/// whose filter is a substring of the tensor name, or `*`, or absent, gives the value, itself a number or a
/// gradient; when none matches, the next scope is asked: model, then slice, then global parameters).
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Num(f64),
    Gradient(Vec<f64>),
    Filtered(Vec<(Option<String>, Param)>),
}

impl Param {
    /// The value for one tensor at layer position `t` in [0, 1] (`layer / (layers - 1)` within its slice, 1 for
    /// a slice of one layer, 0 for tensors outside the layers), or None when no filter matches. A gradient
    /// `[v_0 .. v_{n-1}]` gives `(1 - f) v_i + f v_{i+1}` with `s = t (n - 1)`, `i = floor(s)`, `f = s - i`
    /// (`i + 1` clamped to `n - 1`), as mergekit computes it.
    pub fn at(&self, tensor: &str, t: f64) -> Option<f64> {
        match self {
            Param::Num(x) => Some(*x),
            Param::Gradient(v) => {
                if v.is_empty() {
                    return None;
                }
                let scaled = t * (v.len() - 1) as f64;
                let i0 = (scaled as usize).min(v.len() - 1);
                let i1 = (i0 + 1).min(v.len() - 1);
                let frac = scaled - i0 as f64;
                Some((1.0 - frac) * v[i0] + frac * v[i1])
            }
            Param::Filtered(v) => v
                .iter()
                .find(|(f, _)| f.as_deref().is_none_or(|f| f == "*" || (!tensor.is_empty() && tensor.contains(f))))
                .and_then(|(_, p)| p.at(tensor, t)),
        }
    }

    /// The value for one tensor at layer position 0 (what a tensor outside the layers gets); a merge resolves
    /// gradients per tensor first (`MergeConfig::at_tensor`), after which this is the value.
    pub fn for_tensor(&self, tensor: &str) -> Option<f64> {
        self.at(tensor, 0.0)
    }

    /// This parameter, asking `lower` (a lower-precedence scope) where no filter of this one matches.
    pub fn or_else(self, lower: Option<Param>) -> Param {
        let Some(lower) = lower else { return self };
        match self {
            Param::Filtered(mut v) if !v.iter().any(|(f, _)| f.as_deref().is_none_or(|f| f == "*")) => {
                match lower {
                    Param::Filtered(w) => v.extend(w),
                    p => v.push((None, p)),
                }
                Param::Filtered(v)
            }
            p => p,
        }
    }

    /// Whether the value can differ from layer to layer.
    pub fn has_gradient(&self) -> bool {
        match self {
            Param::Num(_) => false,
            Param::Gradient(v) => v.len() > 1,
            Param::Filtered(v) => v.iter().any(|(_, p)| p.has_gradient()),
        }
    }

    /// Every number written (anchors of gradients included): the range checks apply to each; interpolation
    /// stays between them.
    pub(crate) fn values(&self) -> Vec<f64> {
        match self {
            Param::Num(x) => vec![*x],
            Param::Gradient(v) => v.clone(),
            Param::Filtered(v) => v.iter().flat_map(|(_, p)| p.values()).collect(),
        }
    }
}

/// `a`, falling back to `b` where a's filters do not match.
pub(crate) fn chain(a: Option<Param>, b: Option<Param>) -> Option<Param> {
    match a {
        Some(a) => Some(a.or_else(b)),
        None => b,
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
    /// passthrough's `scale` (the tensor times it; none: the tensor as stored).
    pub scale: Option<Param>,
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
    /// `slices`, `tokenizer_source` / `tokenizer`, `chat_template` (empty / none when not given).
    pub layout: Layout,
}

/// What a mergekit config can say besides `models`: the output built from layer ranges of the inputs
/// (`slices`), and the output's tokenizer and chat template.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Layout {
    /// mergekit's `slices` (`crate::slices`); empty when the config lists `models`.
    pub slices: Vec<crate::slices::Slice>,
    /// `tokenizer_source` (or `tokenizer: {source}`).
    pub tokenizer: crate::tokenizer::TokenizerSpec,
    /// `chat_template`: a built-in name (`chatml`, `llama3`, `mistral`, `alpaca`, `exaone`, `auto`) or a Jinja
    /// template.
    pub chat_template: Option<String>,
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
        const TOP: [&str; 11] = [
            "merge_method",
            "base_model",
            "models",
            "slices",
            "parameters",
            "dtype",
            "out_dtype",
            "tokenizer_source",
            "tokenizer",
            "chat_template",
            "name",
        ];
        for k in top.keys() {
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
        let base_dir = source.parent().unwrap_or(Path::new("."));
        let resolve = |name: &str, what: &str| {
            resolve_model(name, base_dir).ok_or_else(|| {
                err(format!(
                    "{what}: model `{name}` not found (as a path, next to the config, or in the models folder){}",
                    hub_hint(name)
                ))
            })
        };
        let tokenizer = crate::tokenizer::parse(top, &resolve, &err)?;
        let chat_template = match top.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(crate::tokenizer::check_chat_template(s, &err)?),
            Some(v) => return Err(err(format!("`chat_template` must be a string, found {v}"))),
        };
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
        if matches!(method, Method::GreedySoup | Method::Atlas) || crate::geometric::handles(method) {
            for (k, v) in &gparams {
                if method.model_params().contains(&k.as_str()) {
                    continue;
                }
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
        let slices = match top.get("slices") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => {
                if !list.is_empty() {
                    return Err(err("give either `models` or `slices`, not both (as mergekit)".into()));
                }
                if matches!(method, Method::GreedySoup | Method::Atlas) {
                    return Err(err(format!("`slices` cannot be used with merge_method `{}`", method.as_str())));
                }
                let parse =
                    |v: Option<&Value>, what: &str, allowed: &[&str]| parse_params(v, what, allowed, method, &err);
                crate::slices::parse(v, method, &allowed_global, &parse, &gparams, &resolve, &err)?
            }
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
            let pget = |k: &str| chain(p.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()), gget(k));
            let path = resolve(&name, &format!("models[{i}]"))?;
            models.push(ModelEntry {
                name,
                path,
                weight: pget("weight"),
                density: pget("density"),
                scale: pget("scale"),
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
                Some(ModelEntry { name, path, weight: None, density: None, scale: None, gamma: None, epsilon: None })
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
            layout: Layout { slices, tokenizer, chat_template },
        };
        cfg.check_inputs()?;
        Ok(cfg)
    }

    /// Checks that the config names the inputs its method needs (a YAML config is checked when read; a
    /// config built in code should be checked with this before merging).
    pub fn check_inputs(&self) -> Result<()> {
        let err = |msg: String| Error::Config { file: self.source.display().to_string(), msg };
        self.check_values()?;
        if !self.layout.slices.is_empty() {
            return crate::slices::check(self);
        }
        match self.method {
            Method::Passthrough => {
                let base = self.base.as_ref().map(|b| canon(&b.path));
                if self.models.len() != 1 || base.as_ref().is_some_and(|b| *b != canon(&self.models[0].path)) {
                    return Err(err(format!(
                        "passthrough takes exactly one model ({} listed{}); to stack layers of several models use \
                         `slices`",
                        self.models.len(),
                        if base.is_some() { ", and base_model is another" } else { "" }
                    )));
                }
                Ok(())
            }
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
            m if crate::geometric::handles(m) => crate::geometric::check(self),
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
        for (i, s) in self.layout.slices.iter().enumerate() {
            for (k, p) in &s.params {
                let k = if k == "t" { "`t`".to_string() } else { format!("slices[{i}]: `{k}`") };
                all.push((k, p));
            }
        }
        let sliced = self.layout.slices.iter().flat_map(|s| s.sources.iter().map(|x| &x.model));
        for m in self.models.iter().chain(self.base.iter()).chain(sliced) {
            for (k, p) in [
                ("weight", &m.weight),
                ("density", &m.density),
                ("scale", &m.scale),
                ("gamma", &m.gamma),
                ("epsilon", &m.epsilon),
            ] {
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

    /// This config with every parameter resolved to a number for one tensor at layer position `t` (see
    /// [`Param::at`]): gradients interpolated, filters applied. Per-model parameters are resolved with the
    /// name of the tensor as the model stores it (`inputs[i]` for `models[i]`, as mergekit does), the
    /// others with the output tensor's name. Parameters that no filter matches are left out (the method's
    /// default then applies).
    pub fn at_tensor(&self, name: &str, inputs: &[&str], t: f64) -> MergeConfig {
        let num = |p: &Option<Param>, tensor: &str| p.as_ref().and_then(|p| p.at(tensor, t)).map(Param::Num);
        let mut c = self.clone();
        c.lambda = Param::Num(self.lambda.at(name, t).unwrap_or(1.0));
        c.t = num(&self.t, name);
        for (i, m) in c.models.iter_mut().enumerate() {
            let tensor = inputs.get(i).copied().unwrap_or(name);
            m.weight = num(&m.weight, tensor);
            m.density = num(&m.density, tensor);
            m.scale = num(&m.scale, tensor);
            m.gamma = num(&m.gamma, tensor);
            m.epsilon = num(&m.epsilon, tensor);
        }
        c
    }

    /// Whether any parameter differs from layer to layer (a gradient list somewhere).
    pub fn has_gradient(&self) -> bool {
        let ps = [Some(&self.lambda), self.t.as_ref()];
        let ms = self.models.iter().flat_map(|m| {
            [m.weight.as_ref(), m.density.as_ref(), m.scale.as_ref(), m.gamma.as_ref(), m.epsilon.as_ref()]
        });
        ps.into_iter().chain(ms).flatten().any(Param::has_gradient)
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

/// A number, bool or gradient list (a non-empty list of numbers).
fn parse_value(v: &Value) -> Option<Param> {
    match v {
        Value::Bool(b) => Some(Param::Num(*b as u8 as f64)),
        Value::Number(n) => Some(Param::Num(n.as_f64().unwrap_or(f64::NAN))),
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => {
            Some(Param::Gradient(a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()))
        }
        _ => None,
    }
}

pub(crate) fn parse_params(
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
            v if parse_value(v).is_some() => parse_value(v).unwrap_or(Param::Num(f64::NAN)),
            Value::Array(a) if a.is_empty() => {
                return Err(err(format!("{what}: `{k}` is an empty list (give a number or a gradient list)")))
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
                    let value = o.get("value").and_then(parse_value).ok_or_else(|| {
                        err(format!("{what}: `{k}`: entry {e} has no numeric `value` (a number or a gradient list)"))
                    })?;
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
