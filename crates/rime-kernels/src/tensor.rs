//! GPU tensors: a storage buffer, a shape and a dtype. Compute is f32; frozen weights may be stored as
//! f16 or bf16 (packed two per 32-bit word) and are converted inside the kernels that read them.

use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    I32,
    /// A frozen weight [rows, cols] in GGUF blocks of this type ([`crate::QTensor`]'s layout): it takes part
    /// in x·Wᵀ and dY·W (the matmul launchers route it to ops::qmatmul) and in embedding lookups, dequantized
    /// in the kernels. It has no whole number of bytes per element: see [`DType::storage_bytes`].
    Q(crate::QType),
}

impl DType {
    /// Bytes per element (0 for a quantized type, whose elements share block scales: see
    /// [`DType::storage_bytes`]).
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::Q(_) => 0,
            _ => 4,
        }
    }
    /// Bytes of a buffer holding `n` elements (rounded up to whole 32-bit words); for a quantized type, `n`
    /// values' blocks.
    pub fn storage_bytes(self, n: usize) -> u64 {
        let bytes = match self {
            DType::Q(q) => n.div_ceil(q.block().0) * q.block().1,
            _ => n * self.size(),
        };
        (bytes.max(4).next_multiple_of(4)) as u64
    }
    /// True for the GGUF block types.
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q(_))
    }
}

/// A tensor on the device. Cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub buffer: Arc<wgpu::Buffer>,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// A read-only texture copy of a frozen f32 or f16 weight (see [`crate::Device::with_texture_twin`]), which the
    /// matmul reads instead of the buffer where that is faster. [`crate::Device::write_f32`] refreshes it; a
    /// kernel must not write a tensor that has one.
    pub texture: Option<Arc<TextureTwin>>,
}

/// An rgba32float (f32) or rgba16float (f16) texture holding a frozen matrix [rows, cols]: texel (x, y) is
/// elements 4x..4x+4 of row y, read as f32.
/// On lavapipe a texel fetch gathers the eight lanes' 16-byte texels in straight-line code, where a storage
/// load runs a per-lane loop with a branch per lane, so products whose rhs is a frozen weight read it faster
/// (the tiled kernels' `TiledTexture` variant).
#[derive(Debug)]
pub struct TextureTwin {
    pub(crate) texture: wgpu::Texture,
    pub(crate) view: wgpu::TextureView,
    pub rows: usize,
    pub cols: usize,
    /// The element type of the buffer it copies (F32 or F16).
    pub dtype: DType,
}

impl Tensor {
    pub(crate) fn new(buffer: Arc<wgpu::Buffer>, shape: Vec<usize>, dtype: DType) -> Self {
        Tensor { buffer, shape, dtype, texture: None }
    }
    /// The same buffer under another shape and dtype (no size check: views of a larger buffer are allowed).
    /// The texture twin stays while the view keeps the dtype and the row length (the same [rows, cols] layout).
    pub fn view(&self, shape: &[usize], dtype: DType) -> Tensor {
        let texture = self.texture.clone().filter(|_| dtype == self.dtype && shape.last() == self.shape.last());
        Tensor { buffer: self.buffer.clone(), shape: shape.to_vec(), dtype, texture }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// The last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Number of rows when viewed as a 2-D matrix [rows, last_dim].
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }
    /// Same buffer, another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> crate::Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(crate::Error::Shape {
                op: "reshape",
                msg: format!("{:?} has {} elements, {:?} has {}", self.shape, self.numel(), shape, n),
            });
        }
        Ok(self.view(shape, self.dtype))
    }
    pub fn bytes(&self) -> u64 {
        self.buffer.size()
    }
}
