//! Training data in memory or from files. A file's rows remember where they came from, so that errors
//! (an unseen label) name the file and line as before.

use std::path::{Path, PathBuf};

use rime_io::dataset::{Columns, Dataset, Example};

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

/// Prompt/completion pairs for causal-LM fine-tuning: the loss is taken on the completion tokens only.
/// Without prompts every token of the completion is a target.
#[derive(Debug, Clone, Default)]
pub struct CausalData {
    /// One unscored prompt per completion, or none.
    pub prompts: Option<Vec<String>>,
    pub completions: Vec<String>,
    origin: Origin,
}

impl CausalData {
    /// Completions alone (every token is learned).
    pub fn new(completions: Vec<String>) -> CausalData {
        CausalData { prompts: None, completions, origin: Origin::default() }
    }

    /// Prompt/completion pairs.
    pub fn pairs(prompts: Vec<String>, completions: Vec<String>) -> CausalData {
        CausalData { prompts: Some(prompts), completions, origin: Origin::default() }
    }

    /// A JSONL, CSV or TSV file: `columns.text` holds the completion, `columns.text_pair` the prompt.
    pub fn from_file(path: impl AsRef<Path>, columns: &Columns) -> Result<CausalData> {
        let cols = Columns { label: None, ..columns.clone() };
        let ds = Dataset::load(path.as_ref(), &cols)?;
        Ok(CausalData {
            prompts: ds.text_pairs().map(|p| p.into_iter().map(String::from).collect()),
            completions: ds.examples.iter().map(|e| e.text.clone()).collect(),
            origin: Origin::of(&ds),
        })
    }

    pub fn len(&self) -> usize {
        self.completions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }

    /// The file the rows came from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.origin.path.as_deref()
    }

    pub(crate) fn dataset(&self, name: &'static str) -> Result<Dataset> {
        dataset(&self.origin, name, &self.completions, self.prompts.as_deref(), None)
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
