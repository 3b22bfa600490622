//! Writing a merged model: the whole safetensors header is known before any tensor is merged (names, shapes
//! and output dtypes come from the input headers), so each shard is written header first and then tensor by
//! tensor as the merge produces them; nothing holds the whole model. Everything goes into a temporary sibling
//! folder that is renamed onto the output at the end and removed on failure.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rime_io::Dtype;
use serde_json::{json, Value};

use crate::{Error, Result};

/// Default largest shard (5 GB, as transformers' `save_pretrained`).
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Tokenizer files a model folder may hold (also the ones a `tokenizer_source` replaces).
pub(crate) const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "sentencepiece.bpe.model",
];

/// Files copied from the base (or first) model folder when present: the configs and [`TOKENIZER_FILES`].
pub(crate) fn side_files() -> impl Iterator<Item = &'static str> {
    ["config.json", "generation_config.json"].into_iter().chain(TOKENIZER_FILES)
}

/// Parses `5GB`, `500MB`, `2GiB`, `1000000` (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = |message: String| Error::Argument { argument: "shard_size", message };
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| bad(format!("`{s}`: expected e.g. 5GB, 500MB or 1000000")))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(bad(format!("`{s}`: unknown unit `{u}` (B, KB, MB, GB, KiB, MiB, GiB)"))),
    };
    let v = x * mult;
    if v.is_nan() || v < 1.0 {
        return Err(bad(format!("`{s}` must be at least one byte")));
    }
    // u64::MAX as f64 rounds up to 2^64, which is itself out of range.
    if v >= u64::MAX as f64 {
        return Err(bad(format!("`{s}` is larger than {} bytes", u64::MAX)));
    }
    Ok(v as u64)
}

/// One tensor of the output, as it will be stored.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Planned {
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// The temporary output folder; removed on drop unless committed.
///
/// Crash safety: the output is built in `.OUT.rime-merge-tmp-PID` beside it. Committing over an existing
/// output (with `force`) renames the old one to `.OUT.rime-merge-old-PID`, renames the new one into place,
/// then deletes the old one; a process killed at any point leaves either the old or the new output complete
/// under its name, or the old one complete under the backup name. [`Staging::new`] recovers from that: a backup
/// of a dead process is renamed back to `OUT` when `OUT` is missing (deleted otherwise), and staging folders of
/// dead processes are removed; each is reported in [`Staging::notes`].
pub(crate) struct Staging {
    pub tmp: PathBuf,
    out: PathBuf,
    force: bool,
    committed: bool,
    /// What the recovery did, for the merge report.
    pub notes: Vec<String>,
}

const TMP_TAG: &str = "rime-merge-tmp-";
const OLD_TAG: &str = "rime-merge-old-";

impl Staging {
    /// Refuses an existing `out` unless `force`, and an `out` that is (or holds) one of `inputs`; recovers
    /// from killed merges into `out`; creates the temporary sibling folder.
    pub fn new(out: &Path, force: bool, inputs: &[&Path]) -> Result<Staging> {
        let oerr = |msg: String| Error::Output { path: out.display().to_string(), msg };
        let name = out.file_name().ok_or_else(|| oerr("not a folder path".into()))?.to_string_lossy().into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(oerr(format!("parent folder {} does not exist", parent.display())));
        }
        refuse_input_overlap(out, inputs)?;
        let notes = recover(&parent, &name, out)?;
        if out.exists() && !force {
            return Err(Error::OutputExists { path: out.display().to_string(), when: "exists" });
        }
        let tmp = parent.join(format!(".{name}.{TMP_TAG}{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| oerr(format!("cannot clear {}: {e}", tmp.display())))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| oerr(format!("cannot create {}: {e}", tmp.display())))?;
        Ok(Staging { tmp, out: out.to_path_buf(), force, committed: false, notes })
    }

    /// Renames the temporary folder onto the output (replacing an existing one only with `force`).
    pub fn commit(mut self) -> Result<()> {
        let oerr = |msg: String| Error::Output { path: self.out.display().to_string(), msg };
        let mut old = None;
        if self.out.exists() {
            if !self.force {
                let path = self.out.display().to_string();
                return Err(Error::OutputExists { path, when: "appeared during the merge" });
            }
            let name = self.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let o = self.tmp.with_file_name(format!(".{name}.{OLD_TAG}{}", std::process::id()));
            std::fs::rename(&self.out, &o).map_err(|e| oerr(format!("cannot move the old output aside: {e}")))?;
            old = Some(o);
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.out) {
            if let Some(o) = &old {
                let _ = std::fs::rename(o, &self.out);
            }
            return Err(oerr(format!("cannot rename the finished output into place: {e}")));
        }
        self.committed = true;
        if let Some(o) = old {
            let _ = remove_any(&o);
        }
        Ok(())
    }
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// `out` must not be one of the inputs, nor a folder holding one: replacing it would overwrite a file the
/// merge is still reading (mapped).
fn refuse_input_overlap(out: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(o) = std::fs::canonicalize(out) else { return Ok(()) };
    for i in inputs {
        let Ok(c) = std::fs::canonicalize(i) else { continue };
        if c.starts_with(&o) {
            let what = if c == o { "is the input" } else { "holds the input" };
            return Err(Error::Output {
                path: out.display().to_string(),
                msg: format!("{what} {}; the output must be a new folder, not one the merge reads", i.display()),
            });
        }
    }
    Ok(())
}

/// Whether process `pid` is alive (Linux: /proc; elsewhere every process counts as alive, so nothing of a
/// running merge is ever touched).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Cleans up after merges into `out` that were killed: restores a complete backup of the previous output when
/// `out` is missing (a kill between the two renames of a forced commit), removes other backups and staging
/// folders of dead processes. Returns a note per action.
fn recover(parent: &Path, name: &str, out: &Path) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let Ok(dir) = std::fs::read_dir(parent) else { return Ok(notes) };
    let mut found: Vec<(PathBuf, bool)> = Vec::new();
    for e in dir.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        for (tag, is_old) in [(TMP_TAG, false), (OLD_TAG, true)] {
            let pid = f.strip_prefix(&format!(".{name}.{tag}")).and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !alive(p)) {
                found.push((e.path(), is_old));
            }
        }
    }
    let oerr = |p: &Path, e: std::io::Error| Error::Output {
        path: out.display().to_string(),
        msg: format!("cannot clean up {} left by a killed merge: {e}", p.display()),
    };
    for (p, is_old) in found {
        if is_old && !out.exists() {
            std::fs::rename(&p, out).map_err(|e| oerr(&p, e))?;
            notes.push(format!(
                "restored {} from {} (a merge was killed while replacing it)",
                out.display(),
                p.display()
            ));
        } else {
            remove_any(&p).map_err(|e| oerr(&p, e))?;
            notes.push(format!("removed {}, left by a killed merge", p.display()));
        }
    }
    Ok(notes)
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Copies the side files (config, tokenizer) that exist next to `model` (a folder or a file in one).
pub(crate) fn copy_side_files(model: &Path, dst: &Path) -> Result<Vec<String>> {
    let dir = if model.is_dir() { model.to_path_buf() } else { model.parent().unwrap_or(Path::new(".")).to_path_buf() };
    let mut copied = Vec::new();
    for f in side_files() {
        let src = dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, dst.join(f)).map_err(|e| Error::Output {
                path: dst.join(f).display().to_string(),
                msg: format!("cannot copy from {}: {e}", src.display()),
            })?;
            copied.push(f.to_string());
        }
    }
    Ok(copied)
}

/// Where one tensor's bytes go as they are produced: the open shard, with a count of what was written and of
/// the non-finite values among them (every output tensor is checked as it streams by: rime never writes a
/// NaN/Inf weight, see [`rime_io::check_finite`]).
pub(crate) struct TensorSink<'a> {
    w: &'a mut BufWriter<File>,
    path: &'a Path,
    written: u64,
    finite: FiniteScan,
}

impl TensorSink<'_> {
    /// Appends stored bytes.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.finite.scan(bytes);
        self.w
            .write_all(bytes)
            .map_err(|e| Error::Output { path: self.path.display().to_string(), msg: format!("cannot write: {e}") })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends f32 values encoded as `dtype`.
    pub fn write_f32(&mut self, vals: &[f32], dtype: Dtype) -> Result<()> {
        self.write_bytes(&encode(vals, dtype))
    }
}

/// Writes `plan` (sorted by name here) into `dir` as one `model.safetensors`, or as shards of at most
/// `shard_size` bytes with `model.safetensors.index.json`; `produce` returns each tensor's bytes in plan order.
/// Returns the bytes written.
pub(crate) fn write_shards(
    dir: &Path,
    plan: Vec<Planned>,
    shard_size: u64,
    mut produce: impl FnMut(&Planned) -> Result<Vec<u8>>,
) -> Result<u64> {
    write_shards_streaming(dir, plan, shard_size, |p, sink| sink.write_bytes(&produce(p)?))
}

/// [`write_shards`] for producers that stream: `produce` writes each tensor's bytes into the sink in pieces
/// (in plan order), so that no tensor needs to be held whole; the byte count must match the header.
pub(crate) fn write_shards_streaming(
    dir: &Path,
    mut plan: Vec<Planned>,
    shard_size: u64,
    mut produce: impl FnMut(&Planned, &mut TensorSink) -> Result<()>,
) -> Result<u64> {
    plan.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<Planned>> = vec![Vec::new()];
    let mut cur = 0u64;
    for p in plan {
        let b = p.bytes();
        if cur > 0 && cur + b > shard_size {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += b;
        if let Some(s) = shards.last_mut() {
            s.push(p)
        }
    }
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect()
    };
    let mut written = 0u64;
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (shard, fname) in shards.iter().zip(&names) {
        let path = dir.join(fname);
        let ioerr =
            |e: std::io::Error| Error::Output { path: path.display().to_string(), msg: format!("cannot write: {e}") };
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0u64;
        for p in shard {
            header.insert(
                p.name.clone(),
                json!({"dtype": p.dtype.as_str(), "shape": p.shape, "data_offsets": [off, off + p.bytes()]}),
            );
            off += p.bytes();
            weight_map.insert(p.name.clone(), Value::String(fname.clone()));
        }
        total += off;
        let mut hb = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Invalid(e.to_string()))?;
        while hb.len() % 8 != 0 {
            hb.push(b' ');
        }
        let file = File::create(&path).map_err(ioerr)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(hb.len() as u64).to_le_bytes()).map_err(ioerr)?;
        w.write_all(&hb).map_err(ioerr)?;
        written += 8 + hb.len() as u64;
        for p in shard {
            let mut sink = TensorSink { w: &mut w, path: &path, written: 0, finite: FiniteScan::new(p.dtype) };
            produce(p, &mut sink)?;
            sink.finite.check(&path, &p.name)?;
            if sink.written != p.bytes() {
                return Err(Error::Tensor {
                    tensor: p.name.clone(),
                    msg: format!("produced {} bytes, the header promised {}", sink.written, p.bytes()),
                });
            }
            written += sink.written;
        }
        let file = w.into_inner().map_err(|e| ioerr(e.into_error()))?;
        file.sync_all().map_err(ioerr)?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(&path, &text)
            .map_err(|e| Error::Output { path: path.display().to_string(), msg: format!("cannot write: {e}") })?;
        written += text.len() as u64;
    }
    Ok(written)
}

/// f32 values as little-endian bytes of `dtype` (F16/BF16 round to nearest even).
pub(crate) fn encode(data: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()).collect(),
        Dtype::BF16 => data.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
        Dtype::F64 => data.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
        _ => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Counts the NaN/Inf values of one tensor's stored bytes as they stream by (pieces need not end on an element
/// boundary); integer dtypes are not scanned.
pub(crate) struct FiniteScan {
    dtype: Dtype,
    carry: Vec<u8>,
    seen: usize,
    count: usize,
    first: Option<(usize, f32)>,
}

impl FiniteScan {
    pub fn new(dtype: Dtype) -> FiniteScan {
        FiniteScan { dtype, carry: Vec::new(), seen: 0, count: 0, first: None }
    }

    fn value(dtype: Dtype, b: &[u8]) -> f32 {
        match dtype {
            Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::F64 => f64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])) as f32,
            _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    pub fn scan(&mut self, mut bytes: &[u8]) {
        if !matches!(self.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
            return;
        }
        let size = self.dtype.size();
        if !self.carry.is_empty() {
            let take = (size - self.carry.len()).min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() < size {
                return;
            }
            let c = std::mem::take(&mut self.carry);
            self.one(Self::value(self.dtype, &c));
        }
        let mut chunks = bytes.chunks_exact(size);
        for c in &mut chunks {
            self.one(Self::value(self.dtype, c));
        }
        self.carry.extend_from_slice(chunks.remainder());
    }

    fn one(&mut self, x: f32) {
        // An f64 beyond f32's range is as unusable in rime as an Inf.
        if !x.is_finite() {
            self.count += 1;
            self.first.get_or_insert((self.seen, x));
        }
        self.seen += 1;
    }

    /// The [`rime_io::Error::NonFinite`] naming `tensor` of the shard `path` when a value was not finite.
    pub fn check(&self, path: &Path, tensor: &str) -> Result<()> {
        match self.first {
            None => Ok(()),
            Some((index, first)) => Err(Error::Io(rime_io::Error::NonFinite {
                file: format!("merge output {}", path.file_name().unwrap_or_default().to_string_lossy()),
                tensor: tensor.to_string(),
                count: self.count,
                first,
                index,
            })),
        }
    }
}
