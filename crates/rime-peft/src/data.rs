//! Training data in memory or from files. A file's rows remember where they came from, so that errors
//! (an unseen label, a bad chat message) name the file and line as before.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use rime_io::dataset::{Columns, Dataset, DatasetFormat, Example};
pub use rime_models::generate::ChatMessage;
use serde_json::Value;

use crate::{Error, Result};

/// Where rows were read from (None: built in memory).
#[derive(Debug, Clone, Default)]
struct Origin {
    path: Option<PathBuf>,
    lines: Vec<u64>,
}

impl Origin {
    fn of(ds: &Dataset) -> Origin {
        Origin { path: Some(ds.path.clone()), lines: ds.examples.iter().map(|e| e.line).collect() }
    }

    fn path(&self, fallback: &str) -> PathBuf {
        self.path.clone().unwrap_or_else(|| PathBuf::from(fallback))
    }

    /// The rows `idx` of this origin.
    fn pick(&self, idx: &[usize]) -> Origin {
        Origin { path: self.path.clone(), lines: idx.iter().map(|&i| self.line(i)).collect() }
    }

    /// The file line of row `i` (1-based row number for rows built in memory).
    fn line(&self, i: usize) -> u64 {
        self.lines.get(i).copied().unwrap_or(i as u64 + 1)
    }
}

/// Rows as the dataset layer holds them (text, optional pair, optional label), checking that the columns
/// have the same length.
fn dataset(
    origin: &Origin,
    name: &'static str,
    texts: &[String],
    pairs: Option<&[String]>,
    labels: Option<&[String]>,
) -> Result<Dataset> {
    let n = texts.len();
    if n == 0 {
        return Err(Error::invalid(name, "has no rows"));
    }
    if let Some(p) = pairs.filter(|p| p.len() != n) {
        return Err(Error::invalid(name, format!("has {n} texts but {} pairs", p.len())));
    }
    if let Some(l) = labels.filter(|l| l.len() != n) {
        return Err(Error::invalid(name, format!("has {n} texts but {} labels", l.len())));
    }
    let examples = (0..n)
        .map(|i| Example {
            text: texts[i].clone(),
            text_pair: pairs.map(|p| p[i].clone()),
            label: labels.map(|l| l[i].clone()),
            line: origin.lines.get(i).copied().unwrap_or(i as u64 + 1),
        })
        .collect();
    Ok(Dataset { path: origin.path(&format!("<{name} in memory>")), columns: vec![], examples })
}

/// Labelled texts (or text pairs) for sequence classification. Labels are strings; the trainer maps them to
/// class ids (sorted, numerically when every label is an integer) and saves the mapping with the adapter.
#[derive(Debug, Clone, Default)]
pub struct TextClassData {
    pub texts: Vec<String>,
    /// Second texts of sentence pairs, one per text.
    pub pairs: Option<Vec<String>>,
    pub labels: Vec<String>,
    origin: Origin,
}

impl TextClassData {
    /// Texts with their labels.
    pub fn new(texts: Vec<String>, labels: Vec<String>) -> TextClassData {
        TextClassData { texts, pairs: None, labels, origin: Origin::default() }
    }

    /// The same rows with a second text each (sentence pairs).
    pub fn with_pairs(mut self, pairs: Vec<String>) -> TextClassData {
        self.pairs = Some(pairs);
        self
    }

    /// A JSONL, CSV or TSV file (by extension); `columns.label` names the label column.
    pub fn from_file(path: impl AsRef<Path>, columns: &Columns) -> Result<TextClassData> {
        let ds = Dataset::load(path.as_ref(), columns)?;
        Self::from_dataset(&ds)
    }

    /// Rows of a loaded dataset; every row needs a label.
    pub fn from_dataset(ds: &Dataset) -> Result<TextClassData> {
        let labels: Option<Vec<String>> = ds.examples.iter().map(|e| e.label.clone()).collect();
        let labels = labels.ok_or_else(|| {
            Error::Io(rime_io::Error::Dataset {
                file: ds.path.display().to_string(),
                msg: "the dataset has no label column".into(),
            })
        })?;
        Ok(TextClassData {
            texts: ds.examples.iter().map(|e| e.text.clone()).collect(),
            pairs: ds.text_pairs().map(|p| p.into_iter().map(String::from).collect()),
            labels,
            origin: Origin::of(ds),
        })
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The file the rows came from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.origin.path.as_deref()
    }

    /// The rows as a dataset; `name` is the argument the rows were given as (`train`, `eval`).
    pub(crate) fn dataset(&self, name: &'static str) -> Result<Dataset> {
        dataset(&self.origin, name, &self.texts, self.pairs.as_deref(), Some(&self.labels))
    }
}

/// Data for causal-LM fine-tuning, one of:
/// - prompt/completion pairs: the loss is taken on the completion tokens only; without prompts every token of
///   the completion is a target (texts longer than `max_length` are cut, with a warning);
/// - conversations ([`CausalData::chat`]): each rendered through the model's chat template, the loss on the
///   assistant turns only (see [`crate::causal`]); a conversation longer than `max_length` is refused, naming
///   its line, unless [`CausalData::truncating`] allows cutting it.
#[derive(Debug, Clone, Default)]
pub struct CausalData {
    /// One unscored prompt per completion, or none.
    pub prompts: Option<Vec<String>>,
    pub completions: Vec<String>,
    /// Conversations (chat data); when set, `prompts` and `completions` are unused.
    pub conversations: Option<Vec<Vec<ChatMessage>>>,
    /// Chat data: cut conversations longer than `max_length` instead of refusing them.
    pub truncate: bool,
    origin: Origin,
}

/// The roles a chat message may have.
pub const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

impl CausalData {
    /// Completions alone (every token is learned).
    pub fn new(completions: Vec<String>) -> CausalData {
        CausalData { completions, ..CausalData::default() }
    }

    /// Prompt/completion pairs.
    pub fn pairs(prompts: Vec<String>, completions: Vec<String>) -> CausalData {
        CausalData { prompts: Some(prompts), completions, ..CausalData::default() }
    }

    /// Conversations in the chat format (checked as [`CausalData::chat_from_file`] checks a file's, each error
    /// naming the conversation's 1-based index as its line).
    pub fn chat(conversations: Vec<Vec<ChatMessage>>) -> Result<CausalData> {
        let path = Path::new("<conversations in memory>");
        for (i, c) in conversations.iter().enumerate() {
            check_conversation(c).map_err(|msg| line_err(path, i as u64 + 1, msg))?;
        }
        Ok(CausalData { conversations: Some(conversations), ..CausalData::default() })
    }

    /// Chat data: cut conversations longer than `max_length` (with a warning) instead of refusing them.
    pub fn truncating(mut self, truncate: bool) -> CausalData {
        self.truncate = truncate;
        self
    }

    /// A JSONL, CSV or TSV file: `columns.text` holds the completion, `columns.text_pair` the prompt. A JSONL
    /// file whose first row has a `messages` field is chat data, read as [`CausalData::chat_from_file`] does.
    pub fn from_file(path: impl AsRef<Path>, columns: &Columns) -> Result<CausalData> {
        let path = path.as_ref();
        if DatasetFormat::from_path(path)? == DatasetFormat::Jsonl && first_row_has(path, "messages")? {
            return Self::chat_from_file(path, "messages");
        }
        let cols = Columns { label: None, ..columns.clone() };
        let ds = Dataset::load(path, &cols)?;
        Ok(CausalData {
            prompts: ds.text_pairs().map(|p| p.into_iter().map(String::from).collect()),
            completions: ds.examples.iter().map(|e| e.text.clone()).collect(),
            origin: Origin::of(&ds),
            ..CausalData::default()
        })
    }

    /// A JSONL file of conversations, one per line: `{"<field>": [{"role": "system"|"user"|"assistant",
    /// "content": "..."}, ...]}` (the OpenAI / Hugging Face chat format; other fields are ignored). Refused with
    /// the file and line: a row without the field, a message without a string role or content, an unknown role,
    /// an assistant message with empty content, a conversation without an assistant message.
    pub fn chat_from_file(path: impl AsRef<Path>, field: &str) -> Result<CausalData> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| rime_io::Error::Dataset {
            file: path.display().to_string(),
            msg: format!("cannot open: {e}"),
        })?;
        let (mut conversations, mut lines) = (vec![], vec![]);
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let n = i as u64 + 1;
            let line = line.map_err(|e| line_err(path, n, format!("cannot read: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let conv = parse_conversation(&line, field).map_err(|msg| line_err(path, n, msg))?;
            conversations.push(conv);
            lines.push(n);
        }
        if conversations.is_empty() {
            return Err(rime_io::Error::Dataset {
                file: path.display().to_string(),
                msg: "the dataset is empty (no rows)".into(),
            }
            .into());
        }
        Ok(CausalData {
            conversations: Some(conversations),
            origin: Origin { path: Some(path.to_path_buf()), lines },
            ..CausalData::default()
        })
    }

    pub fn len(&self) -> usize {
        match &self.conversations {
            Some(c) => c.len(),
            None => self.completions.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file the rows came from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.origin.path.as_deref()
    }

    /// Where rows came from: the file (or `<name in memory>`) and each row's line.
    pub(crate) fn origin(&self, name: &str) -> (PathBuf, Vec<u64>) {
        (self.origin.path(&format!("<{name} in memory>")), (0..self.len()).map(|i| self.origin.line(i)).collect())
    }

    pub(crate) fn dataset(&self, name: &'static str) -> Result<Dataset> {
        dataset(&self.origin, name, &self.completions, self.prompts.as_deref(), None)
    }

    /// Splits off a held-out part of `eval_fraction` of the rows as [`Dataset::split`] does (the same seeded
    /// choice); both parts keep their file lines. Returns (train, eval).
    pub(crate) fn split(&self, name: &'static str, eval_fraction: f64, seed: u64) -> Result<(CausalData, CausalData)> {
        let Some(convs) = &self.conversations else {
            let (t, e) = self.dataset(name)?.split(eval_fraction, seed)?;
            let part = |ds: &Dataset| CausalData {
                prompts: ds.text_pairs().map(|p| p.into_iter().map(String::from).collect()),
                completions: ds.examples.iter().map(|e| e.text.clone()).collect(),
                conversations: None,
                truncate: self.truncate,
                origin: Origin { path: self.origin.path.clone(), lines: ds.examples.iter().map(|e| e.line).collect() },
            };
            return Ok((part(&t), part(&e)));
        };
        let file = self.origin.path(&format!("<{name} in memory>")).display().to_string();
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(rime_io::Error::InvalidArgument {
                file,
                msg: format!("eval fraction must be strictly between 0 and 1, got {eval_fraction}"),
            }
            .into());
        }
        if convs.len() < 2 {
            return Err(rime_io::Error::Dataset {
                file,
                msg: format!("cannot split {} conversation(s) into train and eval", convs.len()),
            }
            .into());
        }
        let (t, e) = rime_io::split_indices(convs.len(), eval_fraction, seed);
        let part = |idx: &[usize]| CausalData {
            conversations: Some(idx.iter().map(|&i| convs[i].clone()).collect()),
            truncate: self.truncate,
            origin: self.origin.pick(idx),
            ..CausalData::default()
        };
        Ok((part(&t), part(&e)))
    }
}

fn line_err(path: &Path, line: u64, msg: String) -> rime_io::Error {
    rime_io::Error::DatasetLine { file: path.display().to_string(), line, msg }
}

/// Whether the first non-blank line of a JSONL file is an object with `field` (false for anything else: the
/// row reader then reports what is wrong with it).
fn first_row_has(path: &Path, field: &str) -> Result<bool> {
    let file = std::fs::File::open(path)
        .map_err(|e| rime_io::Error::Dataset { file: path.display().to_string(), msg: format!("cannot open: {e}") })?;
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { return Ok(false) };
        if line.trim().is_empty() {
            continue;
        }
        return Ok(serde_json::from_str::<Value>(&line).ok().and_then(|v| v.get(field).cloned()).is_some());
    }
    Ok(false)
}

/// One JSONL row of chat data: the conversation under `field`, checked.
fn parse_conversation(line: &str, field: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    let v: Value = serde_json::from_str(line.trim()).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let msgs = obj.get(field).ok_or_else(|| {
        let k: Vec<&str> = obj.keys().map(String::as_str).collect();
        format!("no `{field}` field; fields there are {k:?}")
    })?;
    let msgs =
        msgs.as_array().ok_or_else(|| format!("`{field}` holds {}, expected a list of messages", short(msgs)))?;
    let mut out = Vec::with_capacity(msgs.len());
    for (j, m) in msgs.iter().enumerate() {
        let j = j + 1;
        let m = m.as_object().ok_or_else(|| format!("message {j} is {}, expected an object", short(m)))?;
        let get = |key: &str| match m.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("message {j}: `{key}` holds {}, expected a string", short(other))),
            None => Err(format!("message {j} has no `{key}`")),
        };
        out.push(ChatMessage { role: get("role")?, content: get("content")? });
    }
    check_conversation(&out)?;
    Ok(out)
}

/// The checks every conversation passes: known roles, no empty assistant turn, at least one assistant turn.
fn check_conversation(msgs: &[ChatMessage]) -> std::result::Result<(), String> {
    if msgs.is_empty() {
        return Err("the conversation has no messages".into());
    }
    for (j, m) in msgs.iter().enumerate() {
        if !CHAT_ROLES.contains(&m.role.as_str()) {
            return Err(format!("message {}: unknown role `{}`, expected system, user or assistant", j + 1, m.role));
        }
        if m.role == "assistant" && m.content.trim().is_empty() {
            return Err(format!("message {}: the assistant turn is empty (nothing to learn)", j + 1));
        }
    }
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no assistant message (nothing to learn)".into());
    }
    Ok(())
}

/// A JSON value for an error message, cut to 60 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_rows_become_a_dataset_and_mismatched_columns_name_the_argument() {
        let d = TextClassData::new(vec!["a".into(), "b".into()], vec!["x".into(), "y".into()]);
        let ds = d.dataset("train").unwrap();
        assert_eq!(ds.examples[1].label.as_deref(), Some("y"));
        assert_eq!(ds.examples[1].line, 2);
        let bad = TextClassData::new(vec!["a".into()], vec![]);
        assert!(matches!(bad.dataset("train"), Err(Error::Invalid { field: "train", .. })));
        let bad = TextClassData::new(vec!["a".into()], vec!["x".into()]).with_pairs(vec![]);
        assert!(matches!(bad.dataset("eval"), Err(Error::Invalid { field: "eval", .. })));
        let c = CausalData::pairs(vec!["p".into()], vec!["c".into()]);
        assert_eq!(c.dataset("train").unwrap().examples[0].text_pair.as_deref(), Some("p"));
        assert!(CausalData::new(vec![]).dataset("train").is_err());
    }
}
