//! The output's tokenizer and chat template, as mergekit 0.1.5 builds them (`mergekit/tokenizer/build.py`,
//! `mergekit/tokenizer/embed.py`, `mergekit/merge.py: _set_chat_template`).
//!
//! `tokenizer_source` (or `tokenizer: {source, pad_to_multiple_of}`):
//! - `base`: the vocabulary of `base_model` (else the first model), tokens at ids beyond its config's
//!   `vocab_size` dropped (refused here when there are any: rime copies tokenizer files, it does not rewrite
//!   them);
//! - a model path: that model's tokenizer;
//! - `union`: every model's tokens. When the vocabularies are all equal the union is that vocabulary, and it
//!   is built; otherwise it is refused: mergekit appends the tokens the base lacks in the iteration order of
//!   `tokenizer.get_vocab()`, a hash map, so its ids for them change from run to run and cannot be reproduced.
//!
//! Rows of the tensors with a vocabulary axis (`*embed_tokens.weight`, `*word_embeddings.weight`,
//! `*wte.weight`, `lm_head.weight`) are re-indexed to the output vocabulary for every input before merging:
//! a token the input has keeps its row; a token it lacks gets a row shared by all inputs that lack it: the row
//! of the only input that has it, else zeros when none has it, else the base model's row when the base is
//! among the tensor's inputs and has it, else the mean of the rows of the inputs that have it (mergekit's
//! `assign_embedding_sources`). With `pad_to_multiple_of`, rows beyond the vocabulary get the mean of the
//! vocabulary's rows. config.json's `vocab_size` becomes the vocabulary's size (padded).
//!
//! `chat_template`: a built-in name (`chatml`, `llama3`, `mistral`, `alpaca`, `exaone`: mergekit's templates,
//! in `chat_templates/`, LGPL-3.0 as mergekit), `auto` (the template most of the inputs carry), or a Jinja
//! template (at least 20 characters, with a `{`). It is written as `chat_template.jinja` beside
//! tokenizer_config.json, where transformers 5 (which mergekit saves the tokenizer with) puts it; a
//! `chat_template` key left in the copied tokenizer_config.json is removed so that only one template remains.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rime_io::{Checkpoint, Dtype, RawTensorOwned};
use serde_json::{Map, Value};

use crate::config::MergeConfig;
use crate::{Error, Result};

/// Where the output's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum TokenizerSource {
    /// Not given: tokenizer files are copied from the base (or first) model, tensors untouched.
    #[default]
    Copy,
    Base,
    Union,
    /// A model folder, as written and resolved.
    Model {
        name: String,
        path: PathBuf,
    },
}

/// The tokenizer settings of a config.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizerSpec {
    pub source: TokenizerSource,
    /// `tokenizer: {pad_to_multiple_of: N}`.
    pub pad_to_multiple_of: Option<usize>,
}

const BUILTIN: [(&str, &str); 5] = [
    ("alpaca", include_str!("chat_templates/alpaca.jinja")),
    ("chatml", include_str!("chat_templates/chatml.jinja")),
    ("exaone", include_str!("chat_templates/exaone.jinja")),
    ("llama3", include_str!("chat_templates/llama3.jinja")),
    ("mistral", include_str!("chat_templates/mistral.jinja")),
];

/// Tokenizer files: removed and copied again from the tokenizer source (the chat template with them).
fn tokenizer_files() -> impl Iterator<Item = &'static str> {
    crate::output::TOKENIZER_FILES.into_iter().chain(["chat_template.jinja"])
}

/// Reads `tokenizer_source` / `tokenizer` from the top-level mapping.
pub(crate) fn parse(
    top: &Map<String, Value>,
    resolve: &dyn Fn(&str, &str) -> Result<PathBuf>,
    err: &dyn Fn(String) -> Error,
) -> Result<TokenizerSpec> {
    let source = |v: &Value, key: &str| -> Result<TokenizerSource> {
        match v {
            Value::String(s) if s == "base" => Ok(TokenizerSource::Base),
            Value::String(s) if s == "union" => Ok(TokenizerSource::Union),
            Value::String(s) => {
                let name = s.strip_prefix("model:").unwrap_or(s);
                Ok(TokenizerSource::Model { name: name.to_string(), path: resolve(name, key)? })
            }
            v => Err(err(format!("`{key}` must be `base`, `union` or a model path, found {v}"))),
        }
    };
    let ts = top.get("tokenizer_source").filter(|v| !v.is_null());
    let tb = top.get("tokenizer").filter(|v| !v.is_null());
    match (ts, tb) {
        (Some(_), Some(_)) => Err(err("give `tokenizer_source` or `tokenizer`, not both (as mergekit)".into())),
        (Some(v), None) => Ok(TokenizerSpec { source: source(v, "tokenizer_source")?, pad_to_multiple_of: None }),
        (None, Some(Value::Object(o))) => {
            let mut spec = TokenizerSpec { source: TokenizerSource::Union, pad_to_multiple_of: None };
            for (k, v) in o {
                match k.as_str() {
                    "source" => spec.source = source(v, "tokenizer.source")?,
                    "pad_to_multiple_of" => match v.as_u64() {
                        Some(n) if n >= 1 => spec.pad_to_multiple_of = Some(n as usize),
                        _ if v.is_null() => {}
                        _ => {
                            return Err(err(format!(
                                "`tokenizer.pad_to_multiple_of` must be a positive integer, found {v}"
                            )))
                        }
                    },
                    "tokens" if v.is_null() || v.as_object().is_some_and(|m| m.is_empty()) => {}
                    "tokens" => {
                        return Err(err(
                            "`tokenizer.tokens` (per-token embedding sources) is not supported; leave it out to get \
                             mergekit's default rows"
                                .into(),
                        ))
                    }
                    _ => {
                        return Err(err(format!(
                            "`tokenizer`: unknown key `{k}` (known: source, tokens, pad_to_multiple_of)"
                        )))
                    }
                }
            }
            Ok(spec)
        }
        (None, Some(v)) => Err(err(format!("`tokenizer` must be a mapping {{source: ...}}, found {v}"))),
        (None, None) => Ok(TokenizerSpec::default()),
    }
}

/// Checks a `chat_template` value as mergekit does: a built-in name, `auto`, or a template.
pub(crate) fn check_chat_template(s: &str, err: &dyn Fn(String) -> Error) -> Result<String> {
    let name_like = s.len() < 256 && !s.contains('\n') && !s.contains('{');
    if name_like && (s == "auto" || BUILTIN.iter().any(|(n, _)| *n == s)) {
        return Ok(s.to_string());
    }
    if s.len() < 20 || !s.contains('{') {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        return Err(err(format!(
            "`chat_template: {s}` is neither a built-in name ({}, auto) nor a Jinja template (at least 20 \
             characters with a `{{`)",
            names.join(", ")
        )));
    }
    Ok(s.to_string())
}

fn folder(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.to_path_buf()
    } else {
        p.parent().unwrap_or(Path::new(".")).to_path_buf()
    }
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(folder(p)).unwrap_or_else(|_| folder(p))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config { file: path.display().to_string(), msg: format!("cannot read: {e}") })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config { file: path.display().to_string(), msg: format!("not valid JSON: {e}") })
}

/// A model's vocabulary (token -> id, added tokens included, as `tokenizer.get_vocab()`), or None when the
/// folder has no tokenizer files.
pub(crate) fn read_vocab(model: &Path) -> Result<Option<HashMap<String, usize>>> {
    let dir = folder(model);
    let mut v = HashMap::new();
    let tj = dir.join("tokenizer.json");
    let bad = |p: &Path, msg: String| Error::Config { file: p.display().to_string(), msg };
    if tj.is_file() {
        let j = read_json(&tj)?;
        match j.pointer("/model/vocab") {
            Some(Value::Object(m)) => {
                for (t, id) in m {
                    let id =
                        id.as_u64().ok_or_else(|| bad(&tj, format!("model.vocab: id of `{t}` is not an integer")))?;
                    v.insert(t.clone(), id as usize);
                }
            }
            Some(Value::Array(a)) => {
                for (i, e) in a.iter().enumerate() {
                    let t = e
                        .get(0)
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(&tj, format!("model.vocab[{i}]: no piece")))?;
                    v.insert(t.to_string(), i);
                }
            }
            _ => return Err(bad(&tj, "no `model.vocab` (a map or a list of pieces)".into())),
        }
        for e in j.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
            if let (Some(id), Some(c)) = (e.get("id").and_then(Value::as_u64), e.get("content").and_then(Value::as_str))
            {
                v.insert(c.to_string(), id as usize);
            }
        }
        return Ok(Some(v));
    }
    let vt = dir.join("vocab.txt");
    if vt.is_file() {
        let text = std::fs::read_to_string(&vt).map_err(|e| bad(&vt, format!("cannot read: {e}")))?;
        for (i, line) in text.lines().enumerate() {
            v.entry(line.to_string()).or_insert(i);
        }
        return Ok(Some(v));
    }
    let vj = dir.join("vocab.json");
    if vj.is_file() {
        if let Value::Object(m) = read_json(&vj)? {
            for (t, id) in m {
                v.insert(t, id.as_u64().unwrap_or(0) as usize);
            }
        }
        return Ok(Some(v));
    }
    Ok(None)
}

/// config.json's `vocab_size` of a model, if any.
fn config_vocab_size(model: &Path) -> Option<usize> {
    let p = folder(model).join("config.json");
    read_json(&p).ok()?.get("vocab_size")?.as_u64().map(|x| x as usize)
}

/// Whether a tensor is indexed by token on its first axis.
pub(crate) fn is_vocab_tensor(name: &str) -> bool {
    ["embed_tokens.weight", "word_embeddings.weight", "wte.weight"].iter().any(|s| name.ends_with(s))
        || name == "lm_head.weight"
        || name.ends_with(".lm_head.weight")
}

/// The output vocabulary and how each input's rows map onto it.
pub(crate) struct Vocab {
    /// Tokens of the output, by id.
    len: usize,
    /// Output rows (the vocabulary padded to `pad_to_multiple_of`).
    rows: usize,
    /// Per input (canonical folder): for each output id, the input's row, or None.
    perms: Vec<(PathBuf, Vec<Option<usize>>)>,
    /// The model whose tokenizer files are copied.
    tokenizer_dir: PathBuf,
}

impl Vocab {
    /// The output vocabulary for `cfg` over its inputs `models`; None without `tokenizer_source`.
    pub fn prepare(cfg: &MergeConfig, models: &[&Path], donor: &Path) -> Result<Option<Vocab>> {
        let spec = &cfg.layout.tokenizer;
        if spec.source == TokenizerSource::Copy {
            return Ok(None);
        }
        let file = cfg.source.display().to_string();
        let err = |msg: String| Error::Config { file: file.clone(), msg };
        let base_dir = cfg.base.as_ref().map(|b| b.path.clone()).unwrap_or_else(|| donor.to_path_buf());
        let base_vocab = read_vocab(&base_dir)?.ok_or_else(|| {
            err(format!("tokenizer_source: the base model {} has no tokenizer files", base_dir.display()))
        })?;
        // mergekit strips the base tokenizer to the ids below its config's vocab_size.
        let strip = |v: &HashMap<String, usize>, m: &Path| -> Result<()> {
            let n = config_vocab_size(m).unwrap_or(v.len());
            if let Some((t, id)) = v.iter().find(|(_, &id)| id >= n) {
                return Err(err(format!(
                    "tokenizer_source: {} has token `{t}` at id {id}, beyond its vocab_size {n}; mergekit drops such \
                     tokens by rewriting the tokenizer, which rime does not do",
                    m.display()
                )));
            }
            Ok(())
        };
        let mut vocabs = Vec::new();
        for m in models {
            let v = read_vocab(m)?.unwrap_or_else(|| base_vocab.clone());
            vocabs.push((canon(m), v, config_vocab_size(m)));
        }
        let (out, tokenizer_dir) = match &spec.source {
            TokenizerSource::Copy => return Ok(None),
            TokenizerSource::Base => {
                strip(&base_vocab, &base_dir)?;
                (base_vocab.clone(), folder(&base_dir))
            }
            TokenizerSource::Model { path, name } => {
                let v = read_vocab(path)?
                    .ok_or_else(|| err(format!("tokenizer_source: model `{name}` has no tokenizer files")))?;
                (v, folder(path))
            }
            TokenizerSource::Union => {
                strip(&base_vocab, &base_dir)?;
                if let Some((p, _, _)) = vocabs.iter().find(|(_, v, n)| {
                    let kept: HashMap<&String, &usize> = v.iter().filter(|(_, &id)| n.is_none_or(|n| id < n)).collect();
                    kept.len() != base_vocab.len() || kept.iter().any(|(t, id)| base_vocab.get(*t) != Some(*id))
                }) {
                    return Err(err(format!(
                        "tokenizer_source: union over different vocabularies ({} differs from the base's) is not \
                         supported: mergekit numbers the tokens the base lacks in hash-map order, which changes \
                         from run to run; use `base` or a model path",
                        p.display()
                    )));
                }
                (base_vocab.clone(), folder(&base_dir))
            }
        };
        let mut by_id: Vec<Option<&String>> = vec![None; out.values().max().map(|m| m + 1).unwrap_or(0)];
        for (t, &id) in &out {
            by_id[id] = Some(t);
        }
        if let Some(i) = by_id.iter().position(Option::is_none) {
            return Err(err(format!(
                "tokenizer_source: the vocabulary of {} has no token with id {i} (ids must be 0..{})",
                tokenizer_dir.display(),
                out.len()
            )));
        }
        let len = by_id.len();
        let rows = match spec.pad_to_multiple_of {
            Some(p) if !len.is_multiple_of(p) => (len / p + 1) * p,
            _ => len,
        };
        let perms = vocabs
            .iter()
            .map(|(p, v, n)| {
                let perm = by_id
                    .iter()
                    .map(|t| t.and_then(|t| v.get(t)).copied().filter(|&id| n.is_none_or(|n| id < n)))
                    .collect();
                (p.clone(), perm)
            })
            .collect();
        Ok(Some(Vocab { len, rows, perms, tokenizer_dir }))
    }

    /// Rows of every vocabulary tensor in the output.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn perm(&self, model: &Path) -> Result<&[Option<usize>]> {
        let c = canon(model);
        self.perms
            .iter()
            .find(|(p, _)| *p == c)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| Error::Invalid(format!("no vocabulary prepared for {}", model.display())))
    }

    /// Whether the inputs' rows already are the output's (no re-indexing needed).
    pub fn identity(&self, inputs: &[(&Checkpoint, &str)]) -> Result<bool> {
        for (c, n) in inputs {
            let rows = c.info(n)?.1.first().copied().unwrap_or(0);
            if rows != self.rows || self.perm(c.path())?.iter().enumerate().any(|(i, p)| *p != Some(i)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Re-indexes one vocabulary tensor of each input (`base`: its index among `inputs`, if there) and writes
    /// them as f32 to `dir/NAME.K.safetensors`; returns them opened, in input order.
    pub fn permute(
        &self,
        tensor: &str,
        inputs: &[(&Checkpoint, &str)],
        base: Option<usize>,
        dir: &Path,
    ) -> Result<Vec<Checkpoint>> {
        let mut olds = Vec::new();
        let mut shape = Vec::new();
        for (c, n) in inputs {
            let (_, s) = c.info(n)?;
            if s.is_empty() {
                return Err(Error::Tensor { tensor: n.to_string(), msg: "a vocabulary tensor needs rows".into() });
            }
            shape = s.to_vec();
            olds.push((c.get_f32(n)?, s[0], self.perm(c.path())?));
        }
        let h: usize = shape[1..].iter().product();
        let k = inputs.len();
        let mut news: Vec<Vec<f32>> = vec![vec![0f32; self.rows * h]; k];
        for id in 0..self.len {
            let ps: Vec<Option<usize>> = olds.iter().map(|(_, n, p)| p[id].filter(|&r| r < *n)).collect();
            let row = |m: usize, r: usize| &olds[m].0[r * h..(r + 1) * h];
            let present: Vec<usize> = (0..k).filter(|&m| ps[m].is_some()).collect();
            let default: Option<Vec<f32>> = if present.len() == k {
                None
            } else if present.len() == 1 {
                Some(row(present[0], ps[present[0]].unwrap_or(0)).to_vec())
            } else if present.is_empty() {
                Some(vec![0.0; h])
            } else if let Some(b) = base.filter(|&b| ps[b].is_some()) {
                Some(row(b, ps[b].unwrap_or(0)).to_vec())
            } else {
                let mut acc = vec![0f32; h];
                for &m in &present {
                    for (a, x) in acc.iter_mut().zip(row(m, ps[m].unwrap_or(0))) {
                        *a += x;
                    }
                }
                acc.iter_mut().for_each(|a| *a /= present.len() as f32);
                Some(acc)
            };
            for m in 0..k {
                let dst = &mut news[m][id * h..(id + 1) * h];
                match (ps[m], &default) {
                    (Some(r), _) => dst.copy_from_slice(row(m, r)),
                    (None, Some(d)) => dst.copy_from_slice(d),
                    (None, None) => {}
                }
            }
        }
        if self.rows > self.len {
            for new in &mut news {
                let mut mean = vec![0f64; h];
                for r in 0..self.len {
                    for (a, x) in mean.iter_mut().zip(&new[r * h..(r + 1) * h]) {
                        *a += *x as f64;
                    }
                }
                let mean: Vec<f32> = mean.iter().map(|a| (a / self.len as f64) as f32).collect();
                for r in self.len..self.rows {
                    new[r * h..(r + 1) * h].copy_from_slice(&mean);
                }
            }
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Output { path: dir.display().to_string(), msg: format!("cannot create: {e}") })?;
        let mut out_shape = shape.clone();
        out_shape[0] = self.rows;
        let mut res = Vec::new();
        for (m, new) in news.into_iter().enumerate() {
            let path = dir.join(format!("{tensor}.{m}.safetensors"));
            let raw = RawTensorOwned {
                name: tensor.to_string(),
                dtype: Dtype::F32,
                shape: out_shape.clone(),
                bytes: new.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            rime_io::write_safetensors_raw(&path, &[raw], &BTreeMap::new())?;
            res.push(Checkpoint::open(&path)?);
        }
        Ok(res)
    }
}

/// For a vocabulary tensor under a `tokenizer_source`: each input re-indexed to the output vocabulary (None
/// when it is not a vocabulary tensor, there is no tokenizer_source, or the rows already match).
pub(crate) fn maybe_permute(
    vocab: Option<&Vocab>,
    name: &str,
    inputs: &[(&Checkpoint, &str)],
    base: Option<usize>,
    dir: &Path,
) -> Result<Option<Vec<Checkpoint>>> {
    match vocab {
        Some(v) if is_vocab_tensor(name) && !v.identity(inputs)? => Ok(Some(v.permute(name, inputs, base, dir)?)),
        _ => Ok(None),
    }
}

fn oerr(p: &Path, e: impl std::fmt::Display) -> Error {
    Error::Output { path: p.display().to_string(), msg: e.to_string() }
}

/// After the tensors: the tokenizer files of the tokenizer source and config.json's `vocab_size` (with
/// `vocab`), and the chat template. `donor` is the model the side files were copied from, `models` every
/// input. Returns the files written.
pub(crate) fn finish(
    cfg: &MergeConfig,
    vocab: Option<&Vocab>,
    donor: &Path,
    models: &[&Path],
    out: &Path,
) -> Result<Vec<String>> {
    let mut written = Vec::new();
    if let Some(v) = vocab {
        for f in tokenizer_files() {
            let p = out.join(f);
            if p.is_file() {
                std::fs::remove_file(&p).map_err(|e| oerr(&p, e))?;
            }
        }
        for f in tokenizer_files() {
            let src = v.tokenizer_dir.join(f);
            if src.is_file() {
                std::fs::copy(&src, out.join(f)).map_err(|e| oerr(&out.join(f), e))?;
                written.push(f.to_string());
            }
        }
        let cj = out.join("config.json");
        if cj.is_file() {
            let mut j = read_json(&cj)?;
            if let Some(o) = j.as_object_mut() {
                o.insert("vocab_size".into(), Value::from(v.rows));
            }
            let text = serde_json::to_string_pretty(&j).map_err(|e| oerr(&cj, e))?;
            std::fs::write(&cj, text + "\n").map_err(|e| oerr(&cj, e))?;
        }
    } else {
        // mergekit copies the donor's chat_template.jinja with the tokenizer.
        let src = folder(donor).join("chat_template.jinja");
        if src.is_file() {
            std::fs::copy(&src, out.join("chat_template.jinja")).map_err(|e| oerr(&src, e))?;
            written.push("chat_template.jinja".into());
        }
    }
    if let Some(ct) = &cfg.layout.chat_template {
        let template = match ct.as_str() {
            "auto" => auto_template(models)?,
            s => BUILTIN.iter().find(|(n, _)| *n == s).map(|(_, t)| t.to_string()).or(Some(s.to_string())),
        };
        if let Some(t) = template {
            let p = out.join("chat_template.jinja");
            std::fs::write(&p, t).map_err(|e| oerr(&p, e))?;
            written.push("chat_template.jinja".into());
            let tc = out.join("tokenizer_config.json");
            if tc.is_file() {
                let mut j = read_json(&tc)?;
                if j.as_object_mut().and_then(|o| o.remove("chat_template")).is_some() {
                    let text = serde_json::to_string_pretty(&j).map_err(|e| oerr(&tc, e))?;
                    std::fs::write(&tc, text + "\n").map_err(|e| oerr(&tc, e))?;
                }
            }
        }
    }
    written.sort();
    written.dedup();
    Ok(written)
}

/// A model's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or
/// the entry named `default` of a list).
fn model_template(model: &Path) -> Option<String> {
    let dir = folder(model);
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(t);
    }
    let j = read_json(&dir.join("tokenizer_config.json")).ok()?;
    match j.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|e| e.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}

/// `chat_template: auto`: the (stripped) template most inputs carry; the first in input order on a tie
/// (mergekit's order is that of a Python set there); none when no input has one.
fn auto_template(models: &[&Path]) -> Result<Option<String>> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for m in models {
        if let Some(t) = model_template(m) {
            let t = t.trim().to_string();
            match counts.iter_mut().find(|(x, _)| *x == t) {
                Some((_, c)) => *c += 1,
                None => counts.push((t, 1)),
            }
        }
    }
    let best = counts.iter().map(|(_, c)| *c).max();
    Ok(counts.into_iter().find(|(_, c)| Some(*c) == best).map(|(t, _)| t))
}
