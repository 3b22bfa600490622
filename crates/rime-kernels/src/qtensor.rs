//! Frozen weights that stay in their GGUF block format on the GPU ([`QTensor`]), read by the kernels of
//! shaders/qmatmul.wgsl, which dequantize them in registers.
//!
//! Layout: a weight W [rows, cols] in PyTorch order (out × in; GGUF's `ne[0]` is `cols`) is its GGUF bytes
//! unchanged: row r is the `cols / block_values` blocks starting at byte `r * row_bytes`, each block exactly as
//! in the file (18, 20, 22, 34, 144 or 210 bytes, so blocks are not word-aligned). The buffer is those bytes
//! followed by zero bytes up to a multiple of 4 (at most 3), read by the shaders as `array<u32>` with byte
//! extraction.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::{DType, Device, Tensor};

/// The GGUF block types the quantized kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// `{ f16 d; i8 qs[32]; }`
    Q8_0,
    /// `{ f16 d; u8 qs[16]; }` (nibbles, offset 8)
    Q4_0,
    /// `{ f16 d; f16 m; u8 qs[16]; }`
    Q4_1,
    /// `{ f16 d; u8 qh[4]; u8 qs[16]; }` (nibbles plus a fifth bit, offset 16)
    Q5_0,
    /// `{ f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }` over 256 values
    Q4K,
    /// `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }` over 256 values
    Q6K,
}

impl QType {
    /// Every type, in ggml's id order.
    pub const ALL: [QType; 6] = [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q8_0, QType::Q4K, QType::Q6K];

    /// (values per block, bytes per block), as ggml's `ggml_type_traits`.
    pub fn block(self) -> (usize, usize) {
        match self {
            QType::Q8_0 => (32, 34),
            QType::Q4_0 => (32, 18),
            QType::Q4_1 => (32, 20),
            QType::Q5_0 => (32, 22),
            QType::Q4K => (256, 144),
            QType::Q6K => (256, 210),
        }
    }

    /// ggml's type id (the `type` field of a GGUF tensor info).
    pub fn ggml_id(self) -> u32 {
        match self {
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q8_0 => 8,
            QType::Q4K => 12,
            QType::Q6K => 14,
        }
    }

    /// The type of a ggml type id, None for types the kernels do not read.
    pub fn from_ggml_id(id: u32) -> Option<QType> {
        QType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// ggml's name (`Q4_K`, not `Q4K`).
    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "Q8_0",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q5_0 => "Q5_0",
            QType::Q4K => "Q4_K",
            QType::Q6K => "Q6_K",
        }
    }

    /// Bytes of one row of `cols` values, None when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (bs, bb) = self.block();
        cols.is_multiple_of(bs).then(|| cols / bs * bb)
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A frozen weight [rows, cols] (PyTorch order) held on the device in its GGUF block format (see the module
/// doc for the layout). Cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct QTensor {
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
    /// The GGUF bytes, zero-padded to whole 32-bit words, as a U32 tensor of that many words.
    pub words: Tensor,
}

impl QTensor {
    /// Upload the GGUF bytes of a weight [rows, cols] of `qtype` (rows of whole blocks, back to back).
    pub fn upload(dev: &Device, qtype: QType, rows: usize, cols: usize, bytes: &[u8]) -> Result<QTensor> {
        QTensor::upload_named(dev, "(quantized weight)", qtype, rows, cols, bytes)
    }

    /// [`QTensor::upload`] naming the tensor (its GGUF name) in errors.
    pub fn upload_named(
        dev: &Device,
        name: &str,
        qtype: QType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<QTensor> {
        const OP: &str = "QTensor::upload";
        let (bs, bb) = qtype.block();
        let row_bytes = qtype.row_bytes(cols).ok_or_else(|| Error::Shape {
            op: OP,
            msg: format!(
                "tensor '{name}' [{rows}, {cols}] of {qtype}: {cols} columns is not a whole number of {bs}-value blocks"
            ),
        })?;
        if rows == 0 || cols == 0 {
            return Err(Error::Shape {
                op: OP,
                msg: format!("tensor '{name}' of {qtype} is empty ([{rows}, {cols}])"),
            });
        }
        let want = rows.checked_mul(row_bytes).ok_or_else(|| Error::Shape {
            op: OP,
            msg: format!("tensor '{name}' [{rows}, {cols}] of {qtype} is too large"),
        })?;
        if bytes.len() != want {
            return Err(Error::Shape {
                op: OP,
                msg: format!(
                    "tensor '{name}' [{rows}, {cols}] of {qtype} needs {want} bytes ({rows} rows x {} blocks x {bb} \
                     bytes), got {}",
                    cols / bs,
                    bytes.len()
                ),
            });
        }
        let nwords = want.div_ceil(4);
        let mut padded = Vec::with_capacity(nwords * 4);
        padded.extend_from_slice(bytes);
        padded.resize(nwords * 4, 0);
        let words = dev.upload_bytes(name, &padded, &[nwords], DType::U32)?;
        Ok(QTensor { qtype, rows, cols, words })
    }

    /// Bytes of one row (`cols / block_values * block_bytes`).
    pub fn row_bytes(&self) -> usize {
        self.cols / self.qtype.block().0 * self.qtype.block().1
    }

    /// Bytes the weight occupies on the device (the GGUF bytes plus at most 3 bytes of padding).
    pub fn bytes(&self) -> u64 {
        self.words.bytes()
    }

    /// The device buffer.
    pub fn buffer(&self) -> &Arc<wgpu::Buffer> {
        &self.words.buffer
    }

    /// The weight as a [`Tensor`] of shape [rows, cols] and dtype [`DType::Q`], sharing the buffer: what a
    /// parameter store holds, and what the matmul and embedding launchers accept in place of an f32 weight.
    pub fn to_tensor(&self) -> Tensor {
        self.words.view(&[self.rows, self.cols], DType::Q(self.qtype))
    }

    /// The quantized weight a [`DType::Q`] tensor of shape [rows, cols] holds; None for any other tensor.
    pub fn from_tensor(t: &Tensor) -> Option<QTensor> {
        let DType::Q(qtype) = t.dtype else { return None };
        let [rows, cols] = t.shape[..] else { return None };
        let nwords = (rows * qtype.row_bytes(cols)?).div_ceil(4);
        (t.bytes() >= 4 * nwords as u64).then(|| QTensor { qtype, rows, cols, words: t.view(&[nwords], DType::U32) })
    }
}
