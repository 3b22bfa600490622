//! Builds a `tokenizers::Tokenizer` from a GGUF file's `tokenizer.ggml.*` keys, for gpt2-style byte-level BPE
//! vocabularies (Llama 3, SmolLM2, Qwen...). It follows transformers' GGUF conversion: BPE over the stored
//! tokens and merges, a byte-level pre-tokenizer and decoder, CONTROL tokens (type 3) as special added
//! tokens, USER_DEFINED tokens (type 4) as plain added tokens, and a BOS template only when
//! `tokenizer.ggml.add_bos_token` is true. For `tokenizer.ggml.pre = "smollm"` digits are split one by one
//! first, as SmolLM2's own tokenizer.json does.
//!
//! Gemma 3 files store a sentencepiece vocabulary (`tokenizer.ggml.model = "llama"`) without merges; as
//! transformers' GGUF loader does (`gemma_tokenizer`), tokens made only of spaces are respelled with `▁`, the
//! merges are recovered from the vocabulary (every split of a token into two vocabulary entries, ordered by the
//! token's position in the file, then longer left piece first), and the model is `GemmaTokenizer`'s: BPE with
//! byte fallback and fused unknowns, spaces normalized to `▁`, decoded back through byte fallback.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::error::{display, Error, Result};
use crate::gguf::{GgufFile, GgufValue};

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

pub(crate) fn build(g: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let file = display(g.path());
    let err = |field: &str, msg: String| Error::Config { file: file.clone(), field: field.to_string(), msg };
    let model = g
        .get("tokenizer.ggml.model")
        .ok_or_else(|| err("tokenizer.ggml.model", "missing: the file has no tokenizer".into()))?
        .as_str()
        .ok_or_else(|| err("tokenizer.ggml.model", "not a string".into()))?;
    let arch = g.get("general.architecture").and_then(GgufValue::as_str).unwrap_or("");
    let gemma = model == "llama" && arch == "gemma3";
    if model != "gpt2" && !gemma {
        return Err(err(
            "tokenizer.ggml.model",
            format!(
                "tokenizer model `{model}` (architecture `{arch}`) is not supported (rime reads gpt2-style BPE, and \
                 Gemma 3's sentencepiece vocabulary)"
            ),
        ));
    }
    let strings = |key: &str| -> Result<Vec<&str>> {
        let arr = g
            .get(key)
            .ok_or_else(|| err(key, "missing".into()))?
            .as_array()
            .ok_or_else(|| err(key, "not an array".into()))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| v.as_str().ok_or_else(|| err(key, format!("entry {i} is not a string"))))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(GgufValue::as_array) {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => Vec::new(),
    };
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(err("tokenizer.ggml.token_type", format!("{} entries for {} tokens", types.len(), tokens.len())));
    }
    let id = |key: &str| -> Result<Option<u32>> {
        match g.get(key) {
            None => Ok(None),
            Some(v) => {
                let x =
                    v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| err(key, "not a token id".into()))?;
                if x as usize >= tokens.len() {
                    return Err(err(key, format!("token id {x} is beyond the vocabulary of {}", tokens.len())));
                }
                Ok(Some(x))
            }
        }
    };

    if gemma {
        let unk = id("tokenizer.ggml.unknown_token_id")?.map_or("<unk>", |u| tokens[u as usize]);
        let (mut tok, vocab) = gemma_model(&tokens, unk)
            .map_err(|e| err("tokenizer.ggml.tokens", format!("cannot build the sentencepiece BPE: {e}")))?;
        add_tokens(&mut tok, &tokens, &types, &|t| vocab.contains_key(t));
        return add_bos(g, tok, &tokens, &id, &err);
    }
    let merges_raw = strings("tokenizer.ggml.merges")?;
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), i as u32);
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            err("tokenizer.ggml.merges", format!("merge #{i} `{m}` is not two tokens separated by a space"))
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
    if let Some(unk) = id("tokenizer.ggml.unknown_token_id")? {
        builder = builder.unk_token(tokens[unk as usize].to_string());
    }
    let bpe = builder.build().map_err(|e| err("tokenizer.ggml.merges", format!("cannot build BPE: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);

    let byte_level = ByteLevel::new(false, true, true);
    let pre = g.get("tokenizer.ggml.pre").and_then(GgufValue::as_str).unwrap_or("default");
    if pre == "smollm" {
        tok.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])));
    } else {
        tok.with_pre_tokenizer(Some(byte_level));
    }
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    add_tokens(&mut tok, &tokens, &types, &|_| true);
    add_bos(g, tok, &tokens, &id, &err)
}

/// CONTROL tokens as special added tokens, USER_DEFINED ones (that `in_vocab` accepts) as plain added tokens.
fn add_tokens(tok: &mut tokenizers::Tokenizer, tokens: &[&str], types: &[i64], in_vocab: &dyn Fn(&str) -> bool) {
    let special: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == CONTROL)
        .map(|(i, _)| AddedToken::from(tokens[i].to_string(), true).normalized(false))
        .collect();
    let user: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|&(i, &t)| t == USER_DEFINED && in_vocab(tokens[i]))
        .map(|(i, _)| AddedToken::from(tokens[i].to_string(), false).normalized(false))
        .collect();
    tok.add_special_tokens(&special);
    tok.add_tokens(&user);
}

/// A BOS template when `tokenizer.ggml.add_bos_token` is true.
fn add_bos(
    g: &GgufFile,
    mut tok: tokenizers::Tokenizer,
    tokens: &[&str],
    id: &dyn Fn(&str) -> Result<Option<u32>>,
    err: &dyn Fn(&str, String) -> Error,
) -> Result<tokenizers::Tokenizer> {
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(GgufValue::as_bool).unwrap_or(false);
    if add_bos {
        let bos = id("tokenizer.ggml.bos_token_id")?
            .ok_or_else(|| err("tokenizer.ggml.bos_token_id", "missing, but add_bos_token is true".into()))?;
        let b = tokens[bos as usize].to_string();
        let template = TemplateProcessing::builder()
            .try_single(format!("{b}:0 $A:0"))
            .and_then(|t| t.try_pair(format!("{b}:0 $A:0 {b}:1 $B:1")))
            .map_err(|e| err("tokenizer.ggml.bos_token_id", format!("cannot build the BOS template: {e}")))?
            .special_tokens(vec![(b.clone(), bos)])
            .build()
            .map_err(|e| err("tokenizer.ggml.bos_token_id", format!("cannot build the BOS template: {e}")))?;
        tok.with_post_processor(Some(template));
    }
    Ok(tok)
}

/// `GemmaTokenizer` over a GGUF sentencepiece vocabulary (see the module docs); also returns the vocabulary
/// as respelled.
fn gemma_model(tokens: &[&str], unk: &str) -> tokenizers::Result<(tokenizers::Tokenizer, Vocab)> {
    let respelled: Vec<String> = tokens.iter().map(|t| respell_spaces(t)).collect();
    let mut vocab = Vocab::default();
    for (i, t) in respelled.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    let merges = sentencepiece_merges(&respelled, &vocab);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .unk_token(unk.to_string())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(Replace::new(" ", "\u{2581}")?));
    tok.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("\u{2581}", " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ])));
    Ok((tok, vocab))
}

/// A token of whitespace holding a space, spelled with as many `▁` as it has characters (as transformers'
/// `gemma_tokenizer` respells Gemma's multi-space tokens); any other token as it is.
pub fn respell_spaces(t: &str) -> String {
    if t.contains(' ') && t.chars().all(char::is_whitespace) {
        "\u{2581}".repeat(t.chars().count())
    } else {
        t.to_string()
    }
}

/// The merges a sentencepiece BPE vocabulary implies (transformers' `generate_merges` with each token's score
/// the negated position in the file): for every token in file order, each split into two vocabulary entries,
/// longer left piece first.
pub fn sentencepiece_merges(tokens: &[String], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges = Vec::new();
    for t in tokens {
        let cuts: Vec<usize> = t.char_indices().map(|(i, _)| i).skip(1).collect();
        for &c in cuts.iter().rev() {
            let (l, r) = t.split_at(c);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((l.to_string(), r.to_string()));
            }
        }
    }
    merges
}
