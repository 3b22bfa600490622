//! safetensors checkpoints: memory-mapped reading of one file or a sharded folder
//! (`model.safetensors.index.json`), conversion of F32/F16/BF16 (and F64) to f32, raw byte access for keeping
//! f16/bf16 on the device, integer tensors as i64, and an atomic writer (temporary file, then rename).
//!
//! The header is parsed here rather than by the `safetensors` crate so that every defect (truncation, a header
//! longer than the file, bad JSON, offsets out of range, overlapping or leaving holes, a byte length that
//! disagrees with dtype × shape) is reported with the file and the tensor at fault.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{display, format_err, io_err, Error, Result};

/// Element type of a safetensors tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
}

impl Dtype {
    /// Parses the header spelling (`"F32"`, `"BF16"`...).
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    /// The header spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// True for the floating-point types that [`Checkpoint::get_f32`] converts.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    /// PyTorch order (slowest dimension first).
    pub shape: Vec<usize>,
    shard: usize,
    /// Byte range inside the shard's data section.
    start: usize,
    end: usize,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar of shape []).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Borrowed bytes of one tensor, little-endian as stored.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

struct Shard {
    path: PathBuf,
    map: Option<Mmap>,
    /// Offset of the data section (8 + header length).
    data_start: usize,
}

impl Shard {
    fn data(&self) -> &[u8] {
        match &self.map {
            Some(m) => &m[self.data_start..],
            None => &[],
        }
    }
}

/// A safetensors checkpoint, one file or several shards, memory-mapped.
pub struct Checkpoint {
    /// What the user opened (file or folder); used in messages about the checkpoint as a whole.
    source: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("source", &self.source)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The parsed header of one safetensors file: tensors in file order with byte ranges, and `__metadata__`.
pub(crate) struct Header {
    pub tensors: Vec<(String, Dtype, Vec<usize>, usize, usize)>,
    pub metadata: BTreeMap<String, String>,
    pub data_start: usize,
}

/// Validates a safetensors file held in `bytes`; `path` is only used in messages.
pub(crate) fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 8 {
        return Err(format_err(
            path,
            format!("truncated safetensors file: {} bytes, fewer than the 8-byte header length", bytes.len()),
        ));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len8);
    let avail = (bytes.len() - 8) as u64;
    if header_len > avail {
        return Err(format_err(
            path,
            format!(
                "header length {header_len} goes beyond the end of the file ({} bytes): truncated or not safetensors",
                bytes.len()
            ),
        ));
    }
    let header_len = header_len as usize;
    let data_start = 8 + header_len;
    let header_bytes = &bytes[8..data_start];
    let text = std::str::from_utf8(header_bytes).map_err(|e| format_err(path, format!("header is not UTF-8: {e}")))?;
    let json: Value =
        serde_json::from_str(text).map_err(|e| format_err(path, format!("header is not valid JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| format_err(path, "header is not a JSON object"))?;
    let data_len = bytes.len() - data_start;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, entry) in obj {
        if name == "__metadata__" {
            let m = entry.as_object().ok_or_else(|| format_err(path, "`__metadata__` is not a JSON object"))?;
            for (k, v) in m {
                let s = v
                    .as_str()
                    .ok_or_else(|| format_err(path, format!("`__metadata__` value `{k}` is not a string")))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let terr = |msg: String| Error::Tensor { file: display(path), tensor: name.clone(), msg };
        let e = entry.as_object().ok_or_else(|| terr("header entry is not a JSON object".into()))?;
        let dtype_s =
            e.get("dtype").and_then(Value::as_str).ok_or_else(|| terr("missing or non-string `dtype`".into()))?;
        let dtype = Dtype::parse(dtype_s).ok_or_else(|| terr(format!("unknown dtype `{dtype_s}`")))?;
        let shape_v =
            e.get("shape").and_then(Value::as_array).ok_or_else(|| terr("missing or non-array `shape`".into()))?;
        let mut shape = Vec::with_capacity(shape_v.len());
        for d in shape_v {
            let d = d
                .as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| terr(format!("shape entry {d} is not a non-negative integer")))?;
            shape.push(d);
        }
        let offs = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .ok_or_else(|| terr("missing or non-array `data_offsets`".into()))?;
        if offs.len() != 2 {
            return Err(terr(format!("`data_offsets` has {} entries, expected 2", offs.len())));
        }
        let off = |v: &Value| {
            v.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| terr(format!("data offset {v} is not a non-negative integer")))
        };
        let (start, end) = (off(&offs[0])?, off(&offs[1])?);
        if start > end {
            return Err(terr(format!("data_offsets [{start}, {end}] run backwards")));
        }
        if end > data_len {
            return Err(terr(format!(
                "data_offsets [{start}, {end}] go beyond the data section ({data_len} bytes): truncated file?"
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        let nbytes = numel.checked_mul(dtype.size()).ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        if nbytes != end - start {
            return Err(terr(format!(
                "{dtype} × shape {shape:?} needs {nbytes} bytes, but data_offsets [{start}, {end}] hold {}",
                end - start
            )));
        }
        tensors.push((name.clone(), dtype, shape, start, end));
    }

    // Offsets must tile the data section exactly: no overlap, no hole, nothing left over.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (tensors[i].3, tensors[i].4));
    let mut cursor = 0usize;
    let mut prev: Option<&str> = None;
    for &i in &order {
        let (name, _, _, start, end) = &tensors[i];
        if *start < cursor {
            return Err(Error::Tensor {
                file: display(path),
                tensor: name.clone(),
                msg: format!("data_offsets [{start}, {end}] overlap the previous tensor `{}`", prev.unwrap_or("?")),
            });
        }
        if *start > cursor {
            return Err(Error::Tensor {
                file: display(path),
                tensor: name.clone(),
                msg: format!(
                    "data_offsets [{start}, {end}] leave a hole of {} bytes after offset {cursor}",
                    start - cursor
                ),
            });
        }
        cursor = *end;
        prev = Some(name);
    }
    if cursor != data_len {
        return Err(format_err(
            path,
            format!("the tensors cover {cursor} bytes of the data section, but it holds {data_len} bytes"),
        ));
    }
    Ok(Header { tensors, metadata, data_start })
}

fn map_file(path: &Path) -> Result<(Option<Mmap>, u64)> {
    let file = File::open(path).map_err(io_err(path, "cannot open"))?;
    let len = file.metadata().map_err(io_err(path, "cannot stat"))?.len();
    if len == 0 {
        return Ok((None, 0));
    }
    // SAFETY: the map is read-only; rime never writes to a checkpoint it has open. A file truncated by another
    // process while mapped is outside what any reader can defend against.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(path, "cannot memory-map"))?;
    Ok((Some(map), len))
}

fn open_shard(path: &Path) -> Result<(Shard, Header)> {
    let (map, _) = map_file(path)?;
    let header = parse_header(path, map.as_deref().unwrap_or(&[]))?;
    Ok((Shard { path: path.to_path_buf(), map, data_start: header.data_start }, header))
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a `model.safetensors.index.json`, or a folder holding either
    /// (`model.safetensors` is preferred over the index).
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        if path.is_dir() {
            let single = path.join("model.safetensors");
            if single.is_file() {
                return Self::open_file(&single);
            }
            let index = path.join("model.safetensors.index.json");
            if index.is_file() {
                return Self::open_index(&index);
            }
            return Err(format_err(path, "folder holds neither model.safetensors nor model.safetensors.index.json"));
        }
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            return Self::open_index(path);
        }
        Self::open_file(path)
    }

    fn open_file(path: &Path) -> Result<Checkpoint> {
        let (shard, header) = open_shard(path)?;
        let mut tensors = HashMap::with_capacity(header.tensors.len());
        for (name, dtype, shape, start, end) in header.tensors {
            tensors.insert(name, TensorInfo { dtype, shape, shard: 0, start, end });
        }
        Ok(Checkpoint { source: path.to_path_buf(), shards: vec![shard], tensors, metadata: header.metadata })
    }

    fn open_index(index: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(index).map_err(io_err(index, "cannot read"))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| format_err(index, format!("not valid JSON: {e}")))?;
        let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::Config {
            file: display(index),
            field: "weight_map".into(),
            msg: "missing or not a JSON object".into(),
        })?;
        let dir = index.parent().unwrap_or_else(|| Path::new("."));
        let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut shards = Vec::new();
        let mut headers = Vec::new();
        let mut tensors = HashMap::with_capacity(map.len());
        let mut metadata = BTreeMap::new();
        // Shards in sorted order so that the checkpoint's layout does not depend on JSON key order.
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for (name, file) in &entries {
            let file = file.as_str().ok_or_else(|| Error::Config {
                file: display(index),
                field: format!("weight_map.{name}"),
                msg: "shard file name is not a string".into(),
            })?;
            if file.contains("..") || Path::new(file).is_absolute() {
                return Err(Error::Config {
                    file: display(index),
                    field: format!("weight_map.{name}"),
                    msg: format!("shard `{file}` is outside the checkpoint folder"),
                });
            }
            if !shard_ids.contains_key(file) {
                let (shard, header) = open_shard(&dir.join(file))?;
                shard_ids.insert(file.to_string(), shards.len());
                shards.push(shard);
                headers.push(header);
            }
        }
        for (i, header) in headers.into_iter().enumerate() {
            for (k, v) in header.metadata {
                metadata.entry(k).or_insert(v);
            }
            for (name, dtype, shape, start, end) in header.tensors {
                tensors.insert(name, TensorInfo { dtype, shape, shard: i, start, end });
            }
        }
        for (name, file) in &entries {
            let file = file.as_str().unwrap_or_default();
            let want = shard_ids.get(file).copied();
            match tensors.get(name.as_str()) {
                Some(info) if Some(info.shard) == want => {}
                _ => {
                    return Err(Error::Tensor {
                        file: display(&dir.join(file)),
                        tensor: (*name).clone(),
                        msg: format!("listed in {} but not found in that shard", display(index)),
                    })
                }
            }
        }
        if let Some(m) = json.get("metadata").and_then(Value::as_object) {
            for (k, v) in m {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                metadata.insert(k.clone(), s);
            }
        }
        Ok(Checkpoint { source: index.to_path_buf(), shards, tensors, metadata })
    }

    /// What was opened (a file, or the index of a sharded checkpoint).
    pub fn path(&self) -> &Path {
        &self.source
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// True when a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The `__metadata__` of the file(s) (for a sharded checkpoint, merged with the index's `metadata`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Dtype and shape of a tensor.
    pub fn info(&self, name: &str) -> Result<(Dtype, &[usize])> {
        let t = self.tensor(name)?;
        Ok((t.dtype, &t.shape))
    }

    /// The file that holds a tensor (a shard, for sharded checkpoints).
    pub fn file_of(&self, name: &str) -> Result<&Path> {
        let t = self.tensor(name)?;
        Ok(&self.shards[t.shard].path)
    }

    fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| missing_tensor(&self.source, name, self.names()))
    }

    /// The stored bytes of a tensor, without conversion (e.g. to upload f16/bf16 weights as they are).
    pub fn get_raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let t = self.tensor(name)?;
        let data = self.shards[t.shard].data();
        let bytes = data.get(t.start..t.end).ok_or_else(|| Error::Tensor {
            file: display(&self.shards[t.shard].path),
            tensor: name.to_string(),
            msg: "byte range outside the mapped file".into(),
        })?;
        Ok(RawTensor { dtype: t.dtype, shape: &t.shape, bytes })
    }

    /// Elements `first..first + out.len()` (row-major, PyTorch order) of a floating-point tensor, converted to
    /// f32 into `out`: one slice of a large tensor without converting (or touching) the rest of it.
    pub fn read_f32_into(&self, name: &str, first: usize, out: &mut [f32]) -> Result<()> {
        let raw = self.get_raw(name)?;
        let size = raw.dtype.size();
        let numel = raw.bytes.len() / size;
        let terr = |msg: String| Error::Tensor {
            file: display(self.file_of(name).unwrap_or(&self.source)),
            tensor: name.to_string(),
            msg,
        };
        if !raw.dtype.is_float() {
            return Err(terr(format!("is {}; rime needs a float type (F32, F16, BF16 or F64) here", raw.dtype)));
        }
        let end = first.checked_add(out.len()).filter(|&e| e <= numel).ok_or_else(|| {
            terr(format!("elements {first}..{} asked of a tensor of {numel} elements", first + out.len()))
        })?;
        let b = &raw.bytes[first * size..end * size];
        match raw.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .zip(out.iter_mut())
                .for_each(|(c, o)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::F16 => b
                .chunks_exact(2)
                .zip(out.iter_mut())
                .for_each(|(c, o)| *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            Dtype::BF16 => b
                .chunks_exact(2)
                .zip(out.iter_mut())
                .for_each(|(c, o)| *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            _ => b.chunks_exact(8).zip(out.iter_mut()).for_each(|(c, o)| *o = f64::from_le_bytes(le8(c)) as f32),
        }
        self.check_finite(name, out).map_err(|e| match e {
            Error::NonFinite { file, tensor, count, first: f, index } => {
                Error::NonFinite { file, tensor, count, first: f, index: index + first }
            }
            e => e,
        })
    }

    /// The NaN policy at the entry: a float tensor read from a checkpoint holds no NaN or ±Inf (F64 values
    /// beyond f32's range count as Inf). The error names the shard and the tensor.
    fn check_finite(&self, name: &str, data: &[f32]) -> Result<()> {
        crate::error::check_finite(&display(self.file_of(name).unwrap_or(&self.source)), name, data)
    }

    /// Drops this process's resident pages of a tensor's stored bytes `bytes` (a byte range within the tensor;
    /// `..` for all of it). The data stays readable: a later read faults the pages back in from the page cache.
    /// A streaming reader calls it after each tensor (or slice of one) so that resident memory stays near one
    /// tensor instead of growing to the whole mapped checkpoint. A no-op where `madvise` does not exist.
    pub fn release(&self, name: &str, bytes: impl std::ops::RangeBounds<usize>) -> Result<()> {
        let t = self.tensor(name)?;
        let len = t.end - t.start;
        let lo = match bytes.start_bound() {
            std::ops::Bound::Included(&x) => x,
            std::ops::Bound::Excluded(&x) => x + 1,
            std::ops::Bound::Unbounded => 0,
        };
        let hi = match bytes.end_bound() {
            std::ops::Bound::Included(&x) => x + 1,
            std::ops::Bound::Excluded(&x) => x,
            std::ops::Bound::Unbounded => len,
        }
        .min(len);
        if lo >= hi {
            return Ok(());
        }
        let shard = &self.shards[t.shard];
        #[cfg(unix)]
        if let Some(map) = &shard.map {
            // SAFETY: the map is a read-only MAP_SHARED mapping of a file (memmap2's `Mmap::map`). MADV_DONTNEED
            // on such a mapping only drops page-table entries: the next access reads the same bytes back from
            // the page cache (or the file), so slices borrowed from the map stay valid and unchanged.
            unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, shard.data_start + t.start + lo, hi - lo)
            }
            .map_err(io_err(&shard.path, "cannot release mapped pages (madvise)"))?;
        }
        #[cfg(not(unix))]
        let _ = shard;
        Ok(())
    }

    /// A floating-point tensor (F32, F16, BF16 or F64) converted to f32, row-major in PyTorch order. A tensor
    /// holding NaN or ±Inf is refused ([`Error::NonFinite`], naming it): rime's NaN policy checks weights where
    /// they enter. [`Checkpoint::get_raw`] and [`bytes_to_f32`] read without the check.
    pub fn get_f32(&self, name: &str) -> Result<Vec<f32>> {
        let raw = self.get_raw(name)?;
        let data = bytes_to_f32(raw.dtype, raw.bytes).ok_or_else(|| Error::Tensor {
            file: display(self.file_of(name).unwrap_or(&self.source)),
            tensor: name.to_string(),
            msg: format!("is {}; rime needs a float type (F32, F16, BF16 or F64) here", raw.dtype),
        })?;
        self.check_finite(name, &data)?;
        Ok(data)
    }

    /// An integer or bool tensor (e.g. `position_ids`, `input_ids`) widened to i64. U64 values above i64::MAX
    /// are an error.
    pub fn get_i64(&self, name: &str) -> Result<Vec<i64>> {
        let raw = self.get_raw(name)?;
        let file = || display(self.file_of(name).unwrap_or(&self.source));
        let b = raw.bytes;
        Ok(match raw.dtype {
            Dtype::Bool | Dtype::U8 => b.iter().map(|&x| x as i64).collect(),
            Dtype::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
            Dtype::I16 => b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            Dtype::U16 => b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            Dtype::U32 => b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(le8(c))).collect(),
            Dtype::U64 => {
                let mut out = Vec::with_capacity(b.len() / 8);
                for c in b.chunks_exact(8) {
                    let v = u64::from_le_bytes(le8(c));
                    out.push(i64::try_from(v).map_err(|_| Error::Tensor {
                        file: file(),
                        tensor: name.to_string(),
                        msg: format!("U64 value {v} does not fit in i64"),
                    })?);
                }
                out
            }
            other => {
                return Err(Error::Tensor {
                    file: file(),
                    tensor: name.to_string(),
                    msg: format!("has dtype {other}, which is not an integer type; read it with get_f32"),
                })
            }
        })
    }
}

fn le8(c: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(c);
    a
}

/// Converts little-endian F32/F16/BF16/F64 bytes to f32; None for non-float dtypes.
pub fn bytes_to_f32(dtype: Dtype, b: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => {
            b.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        Dtype::BF16 => {
            b.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(le8(c)) as f32).collect(),
        _ => return None,
    })
}

pub(crate) fn missing_tensor(file: &Path, name: &str, names: Vec<&str>) -> Error {
    // Prefer names that share the longest prefix with the one asked for: they are the likely typos.
    let mut ranked: Vec<(usize, &str)> = names
        .iter()
        .map(|n| {
            let common = n.bytes().zip(name.bytes()).take_while(|(a, b)| a == b).count();
            (common, *n)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let examples: Vec<String> = ranked.iter().take(5).map(|(_, n)| format!("`{n}`")).collect();
    Error::MissingTensor {
        file: display(file),
        tensor: name.to_string(),
        count: names.len(),
        examples: if examples.is_empty() { "none".into() } else { examples.join(", ") },
    }
}

/// Element type to store floats as when writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDtype {
    #[default]
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    fn dtype(self) -> Dtype {
        match self {
            StoreDtype::F32 => Dtype::F32,
            StoreDtype::F16 => Dtype::F16,
            StoreDtype::BF16 => Dtype::BF16,
        }
    }
}

/// One tensor to write with [`write_safetensors_raw`]: little-endian bytes already in `dtype`.
#[derive(Debug, Clone)]
pub struct RawTensorOwned {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Writes f32 tensors `(name, shape, data)` as F32 to `path` atomically (temporary file, then rename).
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_safetensors_as(path, tensors, metadata, StoreDtype::F32)
}

/// Like [`write_safetensors`], storing every tensor as `dtype` (F16/BF16 round to nearest even).
pub fn write_safetensors_as(
    path: impl AsRef<Path>,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: &BTreeMap<String, String>,
    dtype: StoreDtype,
) -> Result<()> {
    let path = path.as_ref();
    let mut raws = Vec::with_capacity(tensors.len());
    for (name, shape, data) in tensors {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::InvalidArgument {
                file: display(path),
                msg: format!(
                    "tensor `{name}`: shape {shape:?} has {numel} elements but {} values were given",
                    data.len()
                ),
            });
        }
        let bytes = match dtype {
            StoreDtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            StoreDtype::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()).collect(),
            StoreDtype::BF16 => data.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
        };
        raws.push(RawTensorOwned { name: name.clone(), dtype: dtype.dtype(), shape: shape.clone(), bytes });
    }
    write_safetensors_raw(path, &raws, metadata)
}

/// Writes tensors of any dtype atomically. Tensors are laid out sorted by name; the header is padded with
/// spaces to a multiple of 8 bytes so that the data section is aligned.
pub fn write_safetensors_raw(
    path: impl AsRef<Path>,
    tensors: &[RawTensorOwned],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let mut order: Vec<&RawTensorOwned> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, Value> =
            metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0usize;
    for t in &order {
        let arg =
            |msg: String| Error::InvalidArgument { file: display(path), msg: format!("tensor `{}`: {msg}", t.name) };
        if t.name == "__metadata__" {
            return Err(arg("the name `__metadata__` is reserved".into()));
        }
        if header.contains_key(&t.name) {
            return Err(arg("given twice".into()));
        }
        let numel: usize = t.shape.iter().product();
        if numel * t.dtype.size() != t.bytes.len() {
            return Err(arg(format!(
                "{} × shape {:?} needs {} bytes, {} given",
                t.dtype,
                t.shape,
                numel * t.dtype.size(),
                t.bytes.len()
            )));
        }
        let end = offset + t.bytes.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.as_str(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::InvalidArgument { file: display(path), msg: format!("cannot serialize header: {e}") })?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    write_atomically(path, |w| {
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        w.write_all(&header_bytes)?;
        for t in &order {
            w.write_all(&t.bytes)?;
        }
        Ok(())
    })
}

/// Writes through a temporary file in the same folder, syncs it, then renames it over `path`, so that a
/// reader never sees a half-written file. The temporary file is removed on failure.
pub fn write_atomically(
    path: &Path,
    body: impl FnOnce(&mut std::io::BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let fname = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidArgument { file: display(path), msg: "not a file path".into() })?;
    // pid + a process-wide counter: two threads (or processes) writing the same path never share a temp file.
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{fname}.tmp.{}.{n}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        {
            let mut w = std::io::BufWriter::new(&file);
            body(&mut w)?;
            w.flush()?;
        }
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io { file: display(path), action: "cannot write", source: e });
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io { file: display(path), action: "cannot rename the temporary file into place", source: e }
    })
}
