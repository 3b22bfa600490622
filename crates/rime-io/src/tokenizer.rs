//! A thin wrapper over the `tokenizers` crate for batches of classification or language-model inputs:
//! truncation to a max length (reporting which rows lost tokens), padding to the longest row or to a fixed
//! length, and the three tensors a BERT or Llama forward reads (ids, attention mask, token type ids) as flat
//! row-major `[B, T]` buffers ready for upload.

use std::path::Path;

use tokenizers::{EncodeInput, PaddingDirection, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{display, Error, Result};

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// To the longest row of the batch.
    #[default]
    Longest,
    /// To exactly this many tokens (rows longer than that are an error unless truncation caps them).
    Fixed(usize),
}

/// A tokenized, padded batch; every buffer is `[batch, seq_len]` row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEncoding {
    pub batch: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Segment ids (0 for the first text, 1 for the pair); 0 on padding.
    pub token_type_ids: Vec<u32>,
    /// Per row: whether truncation dropped tokens.
    pub truncated: Vec<bool>,
}

impl BatchEncoding {
    /// True when truncation dropped tokens from any row.
    pub fn any_truncated(&self) -> bool {
        self.truncated.iter().any(|&t| t)
    }

    /// Number of real (unpadded) tokens in each row.
    pub fn lengths(&self) -> Vec<usize> {
        self.attention_mask
            .chunks(self.seq_len.max(1))
            .take(self.batch)
            .map(|r| r.iter().filter(|&&m| m != 0).count())
            .collect()
    }
}

/// A tokenizer with its padding conventions.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
    pad_id: u32,
    pad_type_id: u32,
    pad_left: bool,
    /// Ids must stay below this (the model's embedding rows) and the table's name; see
    /// [`Tokenizer::set_vocab_limit`].
    limit: Option<(usize, String)>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("max_length", &self.max_length())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (or the one inside a folder). The file's own truncation length is kept as the
    /// default max length; its padding token, type id and side are kept, its fixed padding length is not
    /// (batches are padded as [`Tokenizer::encode_batch`] is told).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !file.is_file() {
            return Err(Error::Tokenizer { file: display(&file), msg: "file not found".into() });
        }
        let bad = |msg: String| Error::Tokenizer { file: display(&file), msg };
        let bytes = std::fs::read(&file).map_err(|e| bad(format!("cannot read: {e}")))?;
        // The JSON is checked whole first: tokenizers 0.22 panics (an `expect` in its decoder deserializer)
        // instead of returning an error when a syntax error falls inside the `decoder` object.
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        Ok(Self::from_inner(inner, &display(&file)))
    }

    /// Wraps an already-built tokenizer; `source` names it in messages. Without padding parameters, the pad
    /// token is the first of `[PAD]`, `<pad>`, `<|endoftext|>`, `</s>` the vocabulary has, else id 0.
    pub fn from_inner(mut inner: tokenizers::Tokenizer, source: &str) -> Tokenizer {
        let (pad_id, pad_type_id, pad_left) = match inner.get_padding() {
            Some(p) => (p.pad_id, p.pad_type_id, matches!(p.direction, PaddingDirection::Left)),
            None => {
                let id =
                    ["[PAD]", "<pad>", "<|endoftext|>", "</s>"].iter().find_map(|t| inner.token_to_id(t)).unwrap_or(0);
                (id, 0, false)
            }
        };
        inner.with_padding(None);
        Tokenizer { inner, source: source.to_string(), pad_id, pad_type_id, pad_left, limit: None }
    }

    /// Ties the tokenizer to a model whose embedding table `table` has `rows` rows: refuses now a vocabulary
    /// (or pad id) with ids at or beyond `rows`, naming the token, and from then on every encoded text whose
    /// ids leave the table (an id out of range would index past the table on the device).
    pub fn set_vocab_limit(&mut self, rows: usize, table: &str) -> Result<()> {
        let worst = self.inner.get_vocab(true).into_iter().max_by_key(|(_, id)| *id);
        if let Some((token, id)) = worst.filter(|(_, id)| *id as usize >= rows) {
            return Err(self.err(format!(
                "token {token:?} has id {id}, beyond the {rows} rows of the model's embedding table `{table}` \
                 (a tokenizer of another model?)"
            )));
        }
        if self.pad_id as usize >= rows {
            return Err(self.err(format!(
                "the padding id {} is beyond the {rows} rows of the model's embedding table `{table}`",
                self.pad_id
            )));
        }
        self.limit = Some((rows, table.to_string()));
        Ok(())
    }

    /// Refuses ids beyond the limit set by [`Tokenizer::set_vocab_limit`]; `index` numbers the text.
    fn check_ids(&self, index: usize, text: &str, ids: &[u32]) -> Result<()> {
        let Some((rows, table)) = &self.limit else { return Ok(()) };
        match ids.iter().find(|&&id| id as usize >= *rows) {
            None => Ok(()),
            Some(id) => Err(self.err(format!(
                "text {index} ({:?}) encodes to token id {id}, beyond the {rows} rows of the model's embedding \
                 table `{table}`",
                preview(text)
            ))),
        }
    }

    /// The underlying `tokenizers::Tokenizer` (padding disabled; truncation as set here).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Tokenizer { file: self.source.clone(), msg: msg.into() }
    }

    /// Caps every row at `max_length` tokens, special tokens included (longest-first for pairs, dropping from
    /// the right); None disables truncation.
    pub fn set_max_length(&mut self, max_length: Option<usize>) -> Result<()> {
        let params = match max_length {
            None => None,
            Some(0) => return Err(self.err("max_length must be positive")),
            Some(n) => Some(TruncationParams {
                max_length: n,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }),
        };
        let source = self.source.clone();
        self.inner.with_truncation(params).map_err(|e| Error::Tokenizer {
            file: source,
            msg: format!("cannot set max_length {max_length:?}: {e}"),
        })?;
        Ok(())
    }

    /// The current max length (None: no truncation).
    pub fn max_length(&self) -> Option<usize> {
        self.inner.get_truncation().map(|t| t.max_length)
    }

    /// Overrides the padding token id and its token type id.
    pub fn set_pad(&mut self, pad_id: u32, pad_type_id: u32) {
        self.pad_id = pad_id;
        self.pad_type_id = pad_type_id;
    }

    /// The padding token id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids of one text (truncated as set, never padded).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(format!("cannot encode {:?}: {e}", preview(text))))?;
        self.check_ids(0, text, enc.get_ids())?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of ids.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| self.err(format!("cannot decode: {e}")))
    }

    /// Tokenizes a batch (with special tokens), truncating as set and padding as asked. `pairs`, when given,
    /// must have one entry per text.
    pub fn encode_batch(&self, texts: &[&str], pairs: Option<&[&str]>, padding: Padding) -> Result<BatchEncoding> {
        if let Some(p) = pairs {
            if p.len() != texts.len() {
                return Err(self.err(format!("{} texts but {} pair texts", texts.len(), p.len())));
            }
        }
        let inputs: Vec<EncodeInput> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| match pairs {
                Some(p) => EncodeInput::Dual((*t).into(), p[i].into()),
                None => EncodeInput::Single((*t).into()),
            })
            .collect();
        let encs =
            self.inner.encode_batch(inputs, true).map_err(|e| self.err(format!("cannot encode the batch: {e}")))?;
        for (i, e) in encs.iter().enumerate() {
            self.check_ids(i, texts[i], e.get_ids())?;
        }
        let longest = encs.iter().map(|e| e.len()).max().unwrap_or(0);
        let seq_len = match padding {
            Padding::Longest => longest,
            Padding::Fixed(n) => {
                if let Some((row, e)) = encs.iter().enumerate().find(|(_, e)| e.len() > n) {
                    return Err(self.err(format!(
                        "row {row} has {} tokens, more than the fixed padding length {n}; set a max_length",
                        e.len()
                    )));
                }
                n
            }
        };
        let batch = encs.len();
        let mut out = BatchEncoding {
            batch,
            seq_len,
            input_ids: vec![self.pad_id; batch * seq_len],
            attention_mask: vec![0; batch * seq_len],
            token_type_ids: vec![self.pad_type_id; batch * seq_len],
            truncated: Vec::with_capacity(batch),
        };
        for (r, e) in encs.iter().enumerate() {
            let n = e.len();
            let start = r * seq_len + if self.pad_left { seq_len - n } else { 0 };
            out.input_ids[start..start + n].copy_from_slice(e.get_ids());
            out.token_type_ids[start..start + n].copy_from_slice(e.get_type_ids());
            out.attention_mask[start..start + n].fill(1);
            out.truncated.push(!e.get_overflowing().is_empty());
        }
        Ok(out)
    }
}

fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}
