//! Text-classification datasets from JSONL, CSV or TSV: a text column, an optional second text (sentence
//! pairs), an optional label column, a sorted label map, and a seeded held-out split. Every row remembers its
//! line in the file so that later errors (an unseen label) can point at it.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{display, io_err, Error, Result};

/// File format of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated with a header row; quoted fields may hold commas, tabs and newlines.
    Csv,
    /// Tab-separated with a header row; quoted fields may hold tabs and newlines.
    Tsv,
}

impl DatasetFormat {
    /// Guesses the format from the extension: `.jsonl`/`.json`/`.ndjson`, `.csv`, `.tsv`/`.tab`.
    pub fn from_path(path: &Path) -> Result<DatasetFormat> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        match ext.as_str() {
            "jsonl" | "json" | "ndjson" => Ok(DatasetFormat::Jsonl),
            "csv" => Ok(DatasetFormat::Csv),
            "tsv" | "tab" => Ok(DatasetFormat::Tsv),
            _ => Err(Error::Dataset {
                file: display(path),
                msg: format!("cannot tell the format from the extension `{ext}`; use .jsonl, .csv or .tsv"),
            }),
        }
    }
}

/// Which columns hold what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub text: String,
    /// Second text of a sentence pair (e.g. NLI), if any.
    pub text_pair: Option<String>,
    /// Label column; None for unlabeled data.
    pub label: Option<String>,
}

impl Default for Columns {
    /// `text` and `label`, no pair.
    fn default() -> Self {
        Columns { text: "text".into(), text_pair: None, label: Some("label".into()) }
    }
}

/// One row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    /// Integer labels are kept as their decimal spelling.
    pub label: Option<String>,
    /// 1-based line in the file where the row starts.
    pub line: u64,
}

/// Rows of one file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    /// Columns found in the file (CSV/TSV header, or the keys of the first JSONL row).
    pub columns: Vec<String>,
    pub examples: Vec<Example>,
}

fn line_err(path: &Path, line: u64, msg: String) -> Error {
    Error::DatasetLine { file: display(path), line, msg }
}

impl Dataset {
    /// Loads a dataset, guessing the format from the extension. An empty dataset is an error.
    pub fn load(path: impl AsRef<Path>, columns: &Columns) -> Result<Dataset> {
        let path = path.as_ref();
        Self::load_as(path, DatasetFormat::from_path(path)?, columns)
    }

    /// Loads a dataset in the given format. An empty dataset is an error.
    pub fn load_as(path: impl AsRef<Path>, format: DatasetFormat, columns: &Columns) -> Result<Dataset> {
        let path = path.as_ref();
        let ds = match format {
            DatasetFormat::Jsonl => load_jsonl(path, columns)?,
            DatasetFormat::Csv => load_delimited(path, b',', columns)?,
            DatasetFormat::Tsv => load_delimited(path, b'\t', columns)?,
        };
        if ds.examples.is_empty() {
            return Err(Error::Dataset { file: display(path), msg: "the dataset is empty (no rows)".into() });
        }
        Ok(ds)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True when there is no row (never after `load`).
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The texts, in row order.
    pub fn texts(&self) -> Vec<&str> {
        self.examples.iter().map(|e| e.text.as_str()).collect()
    }

    /// The second texts, when the dataset has a pair column.
    pub fn text_pairs(&self) -> Option<Vec<&str>> {
        self.examples.iter().map(|e| e.text_pair.as_deref()).collect::<Option<Vec<&str>>>()
    }

    /// Splits off a held-out part of `eval_fraction` of the rows, chosen by a seeded shuffle (same seed, same
    /// split on every machine). Both parts keep the file order. Returns (train, eval).
    pub fn split(&self, eval_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(Error::InvalidArgument {
                file: display(&self.path),
                msg: format!("eval fraction must be strictly between 0 and 1, got {eval_fraction}"),
            });
        }
        if self.examples.len() < 2 {
            return Err(Error::Dataset {
                file: display(&self.path),
                msg: format!("cannot split {} row(s) into train and eval", self.examples.len()),
            });
        }
        let (train, eval) = split_indices(self.examples.len(), eval_fraction, seed);
        let pick = |idx: &[usize]| Dataset {
            path: self.path.clone(),
            columns: self.columns.clone(),
            examples: idx.iter().map(|&i| self.examples[i].clone()).collect(),
        };
        Ok((pick(&train), pick(&eval)))
    }
}

/// Seeded split of `0..n` into (train, eval) index lists, each sorted. The eval part holds
/// round(n × eval_fraction) rows, at least 1 and at most n − 1 when n ≥ 2.
pub fn split_indices(n: usize, eval_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut state = seed;
    // Fisher–Yates with splitmix64: fixed here so that splits do not change with a dependency's version.
    for i in (1..n).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let j = (z % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    let mut k = (n as f64 * eval_fraction.clamp(0.0, 1.0)).round() as usize;
    if n >= 2 {
        k = k.clamp(1, n - 1);
    } else {
        k = 0;
    }
    let mut eval = idx[..k].to_vec();
    let mut train = idx[k..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    (train, eval)
}

fn json_label(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        Value::Number(n) => {
            n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| format!("{}", f as i64))
        }
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn load_jsonl(path: &Path, columns: &Columns) -> Result<Dataset> {
    let file = std::fs::File::open(path).map_err(io_err(path, "cannot open"))?;
    let reader = std::io::BufReader::new(file);
    let mut examples = Vec::new();
    let mut seen_columns: Vec<String> = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let lineno = i as u64 + 1;
        let line = line.map_err(|e| line_err(path, lineno, format!("cannot read: {e}")))?;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(trimmed).map_err(|e| line_err(path, lineno, format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| line_err(path, lineno, "not a JSON object".into()))?;
        if seen_columns.is_empty() {
            seen_columns = obj.keys().cloned().collect();
        }
        let keys = || {
            let k: Vec<&str> = obj.keys().map(String::as_str).collect();
            format!("{k:?}")
        };
        let get_text = |col: &str| -> Result<String> {
            match obj.get(col) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(line_err(path, lineno, format!("column `{col}` holds {other}, expected a string"))),
                None => Err(line_err(path, lineno, format!("no column `{col}`; columns there are {}", keys()))),
            }
        };
        let text = get_text(&columns.text)?;
        let text_pair = match &columns.text_pair {
            Some(c) => Some(get_text(c)?),
            None => None,
        };
        let label = match &columns.label {
            Some(c) => match obj.get(c) {
                None => {
                    return Err(line_err(path, lineno, format!("no label column `{c}`; columns there are {}", keys())))
                }
                Some(v) => Some(json_label(v).ok_or_else(|| {
                    line_err(path, lineno, format!("label column `{c}` holds {v}, expected a string or an integer"))
                })?),
            },
            None => None,
        };
        examples.push(Example { text, text_pair, label, line: lineno });
    }
    Ok(Dataset { path: path.to_path_buf(), columns: seen_columns, examples })
}

fn load_delimited(path: &Path, delimiter: u8, columns: &Columns) -> Result<Dataset> {
    let file = std::fs::File::open(path).map_err(io_err(path, "cannot open"))?;
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(std::io::BufReader::new(file));
    let csv_err = |e: csv::Error| {
        let line = e.position().map(|p| p.line()).unwrap_or(0);
        let msg = match e.kind() {
            csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                format!("row has {len} fields, but the header has {expected_len}")
            }
            _ => e.to_string(),
        };
        line_err(path, line, msg)
    };
    let headers: Vec<String> = match rdr.headers() {
        Ok(h) => h.iter().map(|s| s.trim_start_matches('\u{feff}').to_string()).collect(),
        Err(e) => return Err(csv_err(e)),
    };
    if headers.is_empty() || (headers.len() == 1 && headers[0].is_empty()) {
        return Err(Error::Dataset { file: display(path), msg: "the dataset is empty (no header row)".into() });
    }
    let find = |col: &str, what: &str| -> Result<usize> {
        headers
            .iter()
            .position(|h| h == col)
            .ok_or_else(|| line_err(path, 1, format!("no {what} column `{col}`; the header has columns {headers:?}")))
    };
    let text_i = find(&columns.text, "text")?;
    let pair_i = match &columns.text_pair {
        Some(c) => Some(find(c, "text pair")?),
        None => None,
    };
    let label_i = match &columns.label {
        Some(c) => Some(find(c, "label")?),
        None => None,
    };
    let mut examples = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        match rdr.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_err(e)),
        }
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        if record.len() == 1 && record.get(0) == Some("") {
            continue; // a blank line
        }
        let field = |i: usize| record.get(i).unwrap_or("").to_string();
        let label = match label_i {
            Some(i) => {
                let l = field(i);
                if l.trim().is_empty() {
                    return Err(line_err(path, line, format!("empty label in column `{}`", headers[i])));
                }
                Some(l.trim().to_string())
            }
            None => None,
        };
        examples.push(Example { text: field(text_i), text_pair: pair_i.map(field), label, line });
    }
    Ok(Dataset { path: path.to_path_buf(), columns: headers, examples })
}

/// Label strings ↔ class ids. Labels are sorted (numerically when every label is an integer, else by bytes),
/// so the map does not depend on row order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    labels: Vec<String>,
}

impl LabelMap {
    /// Builds the map from a (training) dataset. No label column, or a single class, is an error.
    pub fn from_dataset(train: &Dataset) -> Result<LabelMap> {
        let mut set: BTreeMap<&str, u64> = BTreeMap::new();
        for ex in &train.examples {
            match &ex.label {
                Some(l) => {
                    set.entry(l.as_str()).or_insert(ex.line);
                }
                None => {
                    return Err(Error::Dataset {
                        file: display(&train.path),
                        msg: "the dataset has no label column".into(),
                    })
                }
            }
        }
        let mut labels: Vec<String> = set.keys().map(|s| s.to_string()).collect();
        if labels.iter().all(|l| l.parse::<i64>().is_ok()) {
            labels.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
        }
        if labels.len() < 2 {
            return Err(Error::Dataset {
                file: display(&train.path),
                msg: format!(
                    "only one class ({:?}) in {} rows; classification needs at least two",
                    labels.first().map(String::as_str).unwrap_or(""),
                    train.examples.len()
                ),
            });
        }
        Ok(LabelMap { labels })
    }

    /// Builds a map from labels given in order (e.g. read back from a saved model).
    pub fn from_labels(labels: Vec<String>) -> LabelMap {
        LabelMap { labels }
    }

    /// Labels in id order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no classes.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The id of a label.
    pub fn id(&self, label: &str) -> Option<u32> {
        self.labels.iter().position(|l| l == label).map(|i| i as u32)
    }

    /// The label of an id.
    pub fn label(&self, id: u32) -> Option<&str> {
        self.labels.get(id as usize).map(String::as_str)
    }

    /// Class ids of every row of `ds`; a label the map has never seen is an error naming it and its line.
    pub fn encode(&self, ds: &Dataset) -> Result<Vec<u32>> {
        ds.examples
            .iter()
            .map(|ex| {
                let l = ex.label.as_deref().ok_or_else(|| Error::Dataset {
                    file: display(&ds.path),
                    msg: "the dataset has no label column".into(),
                })?;
                self.id(l).ok_or_else(|| {
                    line_err(
                        &ds.path,
                        ex.line,
                        format!("label `{l}` never appears in the training data (known labels: {:?})", self.labels),
                    )
                })
            })
            .collect()
    }
}
