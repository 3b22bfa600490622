//! ONNX model files, read for their weights only: the initializers of the main graph, decoded with `prost` from
//! the few fields of `onnx.proto` that hold them (nothing of the graph is executed). Data in `raw_data` and in the
//! typed fields (`float_data`, `double_data`, `int32_data`, `int64_data`) is read; external data files (models over
//! 2 GB split by the exporter) are refused with an error that names the tensor.
//!
//! PyTorch's exporter renames and reshapes some weights; [`OnnxFile::hf_tensors`] undoes what it did to a Hugging
//! Face model:
//! - a `Linear` exported as `MatMul` keeps its weight as an unnamed initializer (`onnx::MatMul_1966`) stored
//!   transposed, `[in, out]`; its name comes back from the MatMul node's path
//!   (`/backbone/encoder/layer.0/attention/attention/query/MatMul` → `backbone.encoder.layer.0.attention.attention.query.weight`)
//!   and it is transposed back to `[out, in]`;
//! - a position-embedding table that the exporter split into its CLS row (`[1, 1, D]`, consumed by a `Concat` under
//!   `.../embeddings/`) and its grid (`[1, N, D]`, N a square, consumed by a `Reshape` under `.../embeddings/`) is
//!   joined back into `embeddings.position_embeddings` `[1, 1 + N, D]`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{display, format_err, io_err, Error, Result};
use crate::gguf::NamedTensor;

/// `TensorProto.DataType` values rime reads as floats or integers.
const FLOAT: i32 = 1;
const INT32: i32 = 6;
const INT64: i32 = 7;
const FLOAT16: i32 = 10;
const DOUBLE: i32 = 11;
const BFLOAT16: i32 = 16;
/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    #[prost(double, repeated, tag = "10")]
    double_data: Vec<f64>,
    #[prost(message, repeated, tag = "13")]
    external_data: Vec<StringStringEntry>,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

#[derive(Clone, PartialEq, Message)]
struct StringStringEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// One initializer of an ONNX graph: its name as stored, shape and ONNX data type.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxInitializer {
    pub name: String,
    pub shape: Vec<usize>,
    /// The ONNX `TensorProto.DataType` number (1 = FLOAT, 10 = FLOAT16, 7 = INT64, ...).
    pub data_type: i32,
}

/// A node of the graph, as far as naming weights needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxNode {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// An ONNX model file, decoded. Holds the initializers' bytes; nodes are kept for naming only.
pub struct OnnxFile {
    path: PathBuf,
    tensors: Vec<TensorProto>,
    index: HashMap<String, usize>,
    nodes: Vec<OnnxNode>,
}

impl std::fmt::Debug for OnnxFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxFile").field("path", &self.path).field("initializers", &self.tensors.len()).finish()
    }
}

/// The name of a data type, for messages.
pub fn data_type_name(t: i32) -> &'static str {
    match t {
        FLOAT => "FLOAT",
        2 => "UINT8",
        3 => "INT8",
        4 => "UINT16",
        5 => "INT16",
        INT32 => "INT32",
        INT64 => "INT64",
        8 => "STRING",
        9 => "BOOL",
        FLOAT16 => "FLOAT16",
        DOUBLE => "DOUBLE",
        12 => "UINT32",
        13 => "UINT64",
        14 => "COMPLEX64",
        15 => "COMPLEX128",
        BFLOAT16 => "BFLOAT16",
        _ => "an unknown ONNX data type",
    }
}

fn element_bytes(t: i32) -> Option<usize> {
    match t {
        FLOAT | INT32 => Some(4),
        INT64 | DOUBLE => Some(8),
        FLOAT16 | BFLOAT16 => Some(2),
        _ => None,
    }
}

impl OnnxFile {
    /// Reads and decodes `path`. Refuses files that are not ONNX protobufs, graphs without initializers'
    /// consistency (a shape that disagrees with the stored data) and external data.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(io_err(path, "read"))?;
        Self::from_bytes(path, &bytes)
    }

    /// Decodes an ONNX model held in memory; `path` is used in messages only.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let model = ModelProto::decode(bytes)
            .map_err(|e| format_err(path, format!("not a readable ONNX model (protobuf: {e})")))?;
        let graph = model.graph.ok_or_else(|| format_err(path, "an ONNX model without a graph"))?;
        let mut index = HashMap::with_capacity(graph.initializer.len());
        for (i, t) in graph.initializer.iter().enumerate() {
            check_tensor(path, t)?;
            if index.insert(t.name.clone(), i).is_some() {
                return Err(format_err(path, format!("two initializers are named `{}`", t.name)));
            }
        }
        let nodes = graph
            .node
            .into_iter()
            .map(|n| OnnxNode { name: n.name, op_type: n.op_type, inputs: n.input, outputs: n.output })
            .collect();
        Ok(OnnxFile { path: path.to_path_buf(), tensors: graph.initializer, index, nodes })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every initializer, in file order.
    pub fn initializers(&self) -> Vec<OnnxInitializer> {
        self.tensors
            .iter()
            .map(|t| OnnxInitializer { name: t.name.clone(), shape: shape(t), data_type: t.data_type })
            .collect()
    }

    /// The graph's nodes, in file order.
    pub fn nodes(&self) -> &[OnnxNode] {
        &self.nodes
    }

    /// An initializer's values as f32 (FLOAT, FLOAT16, BFLOAT16 and DOUBLE convert; integer types are refused).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.get(name)?;
        let err = |msg: String| Error::Tensor { file: display(&self.path), tensor: name.to_string(), msg };
        let values = match t.data_type {
            FLOAT if !t.raw_data.is_empty() => {
                t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            FLOAT => t.float_data.clone(),
            DOUBLE if !t.raw_data.is_empty() => t
                .raw_data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")) as f32)
                .collect(),
            DOUBLE => t.double_data.iter().map(|&x| x as f32).collect(),
            FLOAT16 | BFLOAT16 => half_values(t),
            other => {
                return Err(err(format!(
                    "is {}; rime reads weights as FLOAT, FLOAT16, BFLOAT16 or DOUBLE",
                    data_type_name(other)
                )))
            }
        };
        Ok((shape(t), values))
    }

    /// An integer initializer (INT32 / INT64) as i64, e.g. a shape constant.
    pub fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let t = self.get(name)?;
        let values = match t.data_type {
            INT64 if !t.raw_data.is_empty() => {
                t.raw_data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8"))).collect()
            }
            INT64 => t.int64_data.clone(),
            INT32 if !t.raw_data.is_empty() => {
                t.raw_data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
            }
            INT32 => t.int32_data.iter().map(|&x| x as i64).collect(),
            other => {
                return Err(Error::Tensor {
                    file: display(&self.path),
                    tensor: name.to_string(),
                    msg: format!("is {}, not an integer type", data_type_name(other)),
                })
            }
        };
        Ok((shape(t), values))
    }

    fn get(&self, name: &str) -> Result<&TensorProto> {
        match self.index.get(name) {
            Some(&i) => Ok(&self.tensors[i]),
            None => {
                let examples: Vec<&str> = self.tensors.iter().take(3).map(|t| t.name.as_str()).collect();
                Err(Error::MissingTensor {
                    file: display(&self.path),
                    tensor: name.to_string(),
                    count: self.tensors.len(),
                    examples: examples.join(", "),
                })
            }
        }
    }

    /// The float initializers under their Hugging Face names, with the exporter's transposes and splits undone
    /// (see the module docs). Initializers that are neither named weights nor recognised exporter artefacts
    /// (shape constants, unnamed tensors of other ops) are left out; integer tensors are left out.
    pub fn hf_tensors(&self) -> Result<Vec<NamedTensor>> {
        let consumers = self.consumers();
        let mut out = Vec::new();
        let mut pos_cls = None;
        let mut pos_grid = None;
        for t in &self.tensors {
            if !matches!(t.data_type, FLOAT | FLOAT16 | BFLOAT16 | DOUBLE) {
                continue;
            }
            if !t.name.starts_with("onnx::") && !t.name.starts_with('/') {
                let (shape, data) = self.tensor_f32(&t.name)?;
                out.push((t.name.clone(), shape, data));
                continue;
            }
            let Some(node) = consumers.get(t.name.as_str()) else { continue };
            match unnamed_role(node, &shape(t)) {
                Some(Role::MatMulWeight(prefix)) => {
                    let (shape, data) = self.tensor_f32(&t.name)?;
                    let (rows, cols) = (shape[0], shape[1]);
                    out.push((format!("{prefix}.weight"), vec![cols, rows], transpose(&data, rows, cols)));
                }
                Some(Role::PositionCls(prefix)) => pos_cls = Some((prefix, t.name.clone())),
                Some(Role::PositionGrid(prefix)) => pos_grid = Some((prefix, t.name.clone())),
                None => {}
            }
        }
        if let (Some((prefix, cls)), Some((_, grid))) = (pos_cls, pos_grid) {
            let (cshape, mut data) = self.tensor_f32(&cls)?;
            let (gshape, g) = self.tensor_f32(&grid)?;
            data.extend_from_slice(&g);
            out.push((format!("{prefix}.position_embeddings"), vec![1, 1 + gshape[1], cshape[2]], data));
        }
        Ok(out)
    }

    /// For each initializer name, the first node that reads it.
    fn consumers(&self) -> HashMap<&str, &OnnxNode> {
        let mut map = HashMap::new();
        for node in &self.nodes {
            for input in &node.inputs {
                if self.index.contains_key(input) {
                    map.entry(input.as_str()).or_insert(node);
                }
            }
        }
        map
    }
}

enum Role {
    MatMulWeight(String),
    PositionCls(String),
    PositionGrid(String),
}

/// What an unnamed initializer is, from the node that reads it and its shape.
fn unnamed_role(node: &OnnxNode, shape: &[usize]) -> Option<Role> {
    let dotted = node_prefix(&node.name)?;
    match (node.op_type.as_str(), shape) {
        ("MatMul", [_, _]) if node.inputs.get(1).is_some() => Some(Role::MatMulWeight(dotted)),
        ("Concat", [1, 1, _]) if dotted.ends_with("embeddings") => Some(Role::PositionCls(dotted)),
        ("Reshape", [1, n, _]) if dotted.ends_with("embeddings") && is_square(*n) => Some(Role::PositionGrid(dotted)),
        _ => None,
    }
}

/// `/backbone/encoder/layer.0/attention/attention/query/MatMul` → `backbone.encoder.layer.0.attention.attention.query`.
fn node_prefix(name: &str) -> Option<String> {
    let path = name.strip_prefix('/')?;
    let (module, _op) = path.rsplit_once('/')?;
    Some(module.replace('/', "."))
}

fn is_square(n: usize) -> bool {
    let r = (n as f64).sqrt().round() as usize;
    r * r == n && n > 0
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

fn shape(t: &TensorProto) -> Vec<usize> {
    t.dims.iter().map(|&d| d as usize).collect()
}

fn half_values(t: &TensorProto) -> Vec<f32> {
    let bits: Vec<u16> = if t.raw_data.is_empty() {
        t.int32_data.iter().map(|&x| x as u16).collect()
    } else {
        t.raw_data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    };
    if t.data_type == FLOAT16 {
        bits.into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect()
    } else {
        bits.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect()
    }
}

/// Refuses external data, negative or overflowing dims and stored data whose length disagrees with the shape.
fn check_tensor(path: &Path, t: &TensorProto) -> Result<()> {
    let err = |msg: String| Error::Tensor { file: display(path), tensor: t.name.clone(), msg };
    if t.data_location == EXTERNAL || !t.external_data.is_empty() {
        let location = t.external_data.iter().find(|e| e.key == "location").map(|e| e.value.as_str()).unwrap_or("?");
        return Err(err(format!(
            "its data is in an external file (`{location}`); rime reads ONNX files with the weights inside \
             (re-export with `onnx.save_model(model, path, save_as_external_data=False)`, under 2 GB)"
        )));
    }
    let mut count: usize = 1;
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| err(format!("has a negative dimension in {:?}", t.dims)))?;
        count = count.checked_mul(d).ok_or_else(|| err(format!("has an overflowing shape {:?}", t.dims)))?;
    }
    let stored = match (element_bytes(t.data_type), t.raw_data.is_empty()) {
        (Some(size), false) => {
            if !t.raw_data.len().is_multiple_of(size) {
                return Err(err(format!(
                    "raw_data of {} bytes is not a whole number of {}",
                    t.raw_data.len(),
                    data_type_name(t.data_type)
                )));
            }
            t.raw_data.len() / size
        }
        (_, true) => match t.data_type {
            FLOAT => t.float_data.len(),
            DOUBLE => t.double_data.len(),
            INT64 => t.int64_data.len(),
            INT32 | FLOAT16 | BFLOAT16 => t.int32_data.len(),
            _ => return Ok(()),
        },
        (None, false) => return Ok(()),
    };
    if stored != count {
        return Err(err(format!("shape {:?} needs {count} values but {stored} are stored", t.dims)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    fn node(name: &str, op: &str, inputs: &[&str]) -> NodeProto {
        NodeProto {
            name: name.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![format!("{name}_output_0")],
        }
    }

    fn encode(graph: GraphProto) -> Vec<u8> {
        ModelProto { ir_version: 7, graph: Some(graph) }.encode_to_vec()
    }

    #[test]
    fn names_transposes_and_joins_what_the_exporter_changed() {
        let graph = GraphProto {
            initializer: vec![
                tensor("m.norm.weight", &[2], &[1.0, 2.0]),
                tensor("onnx::MatMul_7", &[2, 3], &[1., 2., 3., 4., 5., 6.]),
                tensor("onnx::Concat_1", &[1, 1, 2], &[9.0, 8.0]),
                tensor("onnx::Reshape_2", &[1, 4, 2], &[0., 1., 2., 3., 4., 5., 6., 7.]),
            ],
            node: vec![
                node("/m/layer.0/query/MatMul", "MatMul", &["x", "onnx::MatMul_7"]),
                node("/m/embeddings/Concat_6", "Concat", &["onnx::Concat_1", "y"]),
                node("/m/embeddings/Reshape_1", "Reshape", &["onnx::Reshape_2", "s"]),
            ],
        };
        let file = OnnxFile::from_bytes(Path::new("t.onnx"), &encode(graph)).unwrap();
        let t: HashMap<_, _> = file.hf_tensors().unwrap().into_iter().map(|(n, s, d)| (n, (s, d))).collect();
        assert_eq!(t["m.norm.weight"], (vec![2], vec![1.0, 2.0]));
        assert_eq!(t["m.layer.0.query.weight"], (vec![3, 2], vec![1., 4., 2., 5., 3., 6.]));
        let (s, d) = &t["m.embeddings.position_embeddings"];
        assert_eq!(s, &vec![1, 5, 2]);
        assert_eq!(&d[..4], &[9.0, 8.0, 0.0, 1.0]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn typed_fields_and_halves_read_like_raw_data() {
        let mut t = tensor("a", &[2], &[]);
        t.raw_data.clear();
        t.float_data = vec![1.5, -2.0];
        let mut h = tensor("h", &[2], &[]);
        h.data_type = FLOAT16;
        h.raw_data =
            [half::f16::from_f32(0.5), half::f16::from_f32(-4.0)].iter().flat_map(|x| x.to_le_bytes()).collect();
        let file =
            OnnxFile::from_bytes(Path::new("t.onnx"), &encode(GraphProto { initializer: vec![t, h], node: vec![] }))
                .unwrap();
        assert_eq!(file.tensor_f32("a").unwrap().1, vec![1.5, -2.0]);
        assert_eq!(file.tensor_f32("h").unwrap().1, vec![0.5, -4.0]);
    }

    #[test]
    fn refuses_external_data_bad_lengths_and_integer_weights() {
        let mut ext = tensor("w", &[2], &[]);
        ext.raw_data.clear();
        ext.data_location = EXTERNAL;
        ext.external_data = vec![StringStringEntry { key: "location".into(), value: "w.bin".into() }];
        let e = OnnxFile::from_bytes(Path::new("x.onnx"), &encode(GraphProto { initializer: vec![ext], node: vec![] }));
        let msg = e.unwrap_err().to_string();
        assert!(msg.contains("x.onnx") && msg.contains("`w`") && msg.contains("w.bin"), "{msg}");

        let short = tensor("s", &[3], &[1.0, 2.0]);
        let msg =
            OnnxFile::from_bytes(Path::new("x.onnx"), &encode(GraphProto { initializer: vec![short], node: vec![] }))
                .unwrap_err()
                .to_string();
        assert!(msg.contains("`s`") && msg.contains("needs 3 values but 2"), "{msg}");

        let mut int = tensor("i", &[1], &[]);
        int.data_type = INT64;
        int.raw_data = 5i64.to_le_bytes().to_vec();
        let file =
            OnnxFile::from_bytes(Path::new("x.onnx"), &encode(GraphProto { initializer: vec![int], node: vec![] }))
                .unwrap();
        assert_eq!(file.tensor_i64("i").unwrap().1, vec![5]);
        assert!(file.tensor_f32("i").unwrap_err().to_string().contains("INT64"));

        let msg = OnnxFile::from_bytes(Path::new("x.onnx"), b"\xff\xff\xff garbage").unwrap_err().to_string();
        assert!(msg.contains("x.onnx") && msg.contains("ONNX"), "{msg}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn valid() -> Vec<u8> {
            encode(GraphProto {
                initializer: vec![
                    tensor("onnx::MatMul_7", &[2, 3], &[1., 2., 3., 4., 5., 6.]),
                    tensor("onnx::Concat_1", &[1, 1, 2], &[9.0, 8.0]),
                    tensor("onnx::Reshape_2", &[1, 4, 2], &[0.; 8]),
                ],
                node: vec![
                    node("/m/layer.0/query/MatMul", "MatMul", &["x", "onnx::MatMul_7"]),
                    node("/m/embeddings/Concat_6", "Concat", &["onnx::Concat_1", "y"]),
                    node("/m/embeddings/Reshape_1", "Reshape", &["onnx::Reshape_2", "s"]),
                ],
            })
        }

        fn read_all(bytes: &[u8]) {
            if let Ok(f) = OnnxFile::from_bytes(Path::new("p.onnx"), bytes) {
                let _ = f.hf_tensors();
                for t in f.initializers() {
                    let _ = f.tensor_f32(&t.name);
                    let _ = f.tensor_i64(&t.name);
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

            /// Arbitrary bytes never panic, hang or abort: Ok or an error.
            #[test]
            fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                read_all(&bytes);
            }

            /// A valid model with bytes flipped, cut short or overwritten by huge varints stays safe to read.
            #[test]
            fn damaged_models(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
                let mut bytes = valid();
                for (i, b) in flips {
                    let n = bytes.len();
                    bytes[i % n] = b;
                }
                read_all(&bytes);
                let n = bytes.len();
                bytes.truncate(cut % (n + 1));
                read_all(&bytes);
            }
        }
    }
}
