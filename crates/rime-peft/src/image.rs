//! Image classification on a frozen ViT (DINOv2-S from its ONNX file): images in memory or from IDX files and
//! image folders, preprocessed per batch ([`rime_io::Preprocess`]), a tuning method on the backbone's linears
//! (LoRA on the attention and MLP projections, IA3, bottleneck adapters, or the head alone) and a linear head on
//! the CLS token or the patch mean, trained with cross-entropy by the same trainer as text.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rime_graph::{Executor, Graph, OptimConfig, ParamStore, Var};
use rime_io::peft::PeftAdapter;
use rime_io::{Preprocess, RgbImage};
use rime_kernels::{DType, Device};
use rime_models::vit::{self, VitConfig};
use rime_models::LinearHook;

use crate::classifier::{self, EvalMetrics, Method, HEAD_BIAS, HEAD_WEIGHT};
use crate::classify::{metrics_from_logits, ClassifySummary};
use crate::config::TrainConfig;
use crate::trainer::{Evaluation, Event, Metric, RunStats, Task};
use crate::{Error, Result};

/// Labelled images: decoded RGB images, a class index each, and the class names.
#[derive(Debug, Clone)]
pub struct ImageClassData {
    pub images: Vec<RgbImage>,
    pub labels: Vec<usize>,
    pub classes: Vec<String>,
    /// Where the images came from (the plot's title), if from files.
    pub source: Option<PathBuf>,
}

impl ImageClassData {
    /// Images held in memory. Every label must name a class.
    pub fn new(images: Vec<RgbImage>, labels: Vec<usize>, classes: Vec<String>) -> Result<Self> {
        if images.len() != labels.len() {
            return Err(Error::invalid("labels", format!("{} labels for {} images", labels.len(), images.len())));
        }
        if classes.len() < 2 {
            return Err(Error::invalid(
                "classes",
                format!("{} class(es): classification needs at least two", classes.len()),
            ));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l >= classes.len()) {
            return Err(Error::invalid(
                "labels",
                format!("image {i} has label {l}, but there are {} classes", classes.len()),
            ));
        }
        Ok(ImageClassData { images, labels, classes, source: None })
    }

    /// An IDX pair (MNIST / Fashion-MNIST), classes named by `classes` (or their numbers when empty).
    pub fn from_idx(images: &Path, labels: &Path, classes: Vec<String>) -> Result<Self> {
        let (imgs, labs) = rime_io::read_idx_images(images, labels)?;
        let n = labs.iter().max().map_or(0, |m| m + 1);
        let classes = if classes.is_empty() { (0..n).map(|c| c.to_string()).collect() } else { classes };
        let mut d = Self::new(imgs, labs, classes)?;
        d.source = Some(images.to_path_buf());
        Ok(d)
    }

    /// An image-folder tree (one sub-folder per class); every image is decoded now.
    pub fn from_folder(root: &Path) -> Result<Self> {
        let f = rime_io::image_folder(root)?;
        let images = f.items.iter().map(|(p, _)| RgbImage::open(p)).collect::<rime_io::Result<Vec<_>>>()?;
        let mut d = Self::new(images, f.items.iter().map(|(_, l)| *l).collect(), f.classes)?;
        d.source = Some(root.to_path_buf());
        Ok(d)
    }

    /// A CSV / TSV / JSONL list of image paths and labels (see [`rime_io::image_list`]); every image is decoded
    /// now, and one that cannot be is an error naming its path.
    pub fn from_list(list: &Path) -> Result<Self> {
        let f = rime_io::image_list(list)?;
        let images = f.items.iter().map(|(p, _)| RgbImage::open(p)).collect::<rime_io::Result<Vec<_>>>()?;
        let mut d = Self::new(images, f.items.iter().map(|(_, l)| *l).collect(), f.classes)?;
        d.source = Some(list.to_path_buf());
        Ok(d)
    }

    /// An image folder (a directory), a list of paths and labels (`.csv`, `.tsv`, `.jsonl`), or an IDX images
    /// file (`*-images-idx3-ubyte[.gz]`, its labels read from the `*-labels-idx1-ubyte[.gz]` beside it).
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::from_folder(path);
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if matches!(ext.as_str(), "csv" | "tsv" | "jsonl") {
            return Self::from_list(path);
        }
        if !name.contains("images-idx3") {
            return Err(Error::Msg(format!(
                "{}: expected an image folder (one sub-folder per class), a .csv/.tsv/.jsonl list of paths and \
                 labels, or an IDX images file (*-images-idx3-ubyte[.gz], labels beside it as \
                 *-labels-idx1-ubyte[.gz])",
                path.display()
            )));
        }
        let labels = path.with_file_name(name.replace("images-idx3", "labels-idx1"));
        Self::from_idx(path, &labels, vec![])
    }

    /// The first `n` examples (all when fewer).
    pub fn take(mut self, n: usize) -> Self {
        self.images.truncate(n);
        self.labels.truncate(n);
        self
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// A seeded split: (the rest, a held-out `fraction`).
    fn split(&self, fraction: f64, seed: u64) -> Result<(Self, Self)> {
        let n = self.len();
        let held = ((n as f64) * fraction).round() as usize;
        if held == 0 || held >= n {
            return Err(Error::invalid(
                "eval_fraction",
                format!("{fraction} of {n} images leaves no train or eval set"),
            ));
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let pick = |idx: &[usize]| ImageClassData {
            images: idx.iter().map(|&i| self.images[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
            source: self.source.clone(),
        };
        Ok((pick(&order[held..]), pick(&order[..held])))
    }
}

/// Training-time augmentation, seeded: torchvision's `RandomResizedCrop` (area fraction drawn from `crop_scale`,
/// aspect ratio from [3/4, 4/3] on a log scale, ten tries then the whole image; the crop is then preprocessed as
/// any image) and `RandomHorizontalFlip` (p = 0.5). Evaluation never augments.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Augment {
    /// Random resized crop with this range of area fractions (torchvision's default (0.08, 1.0)); None: off.
    pub crop_scale: Option<(f32, f32)>,
    /// Random horizontal flip.
    pub flip: bool,
}

impl Augment {
    /// Whether anything is on.
    pub fn is_on(&self) -> bool {
        self.crop_scale.is_some() || self.flip
    }

    /// The augmented image, drawn from `rng`.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl rand::Rng) -> RgbImage {
        let mut out = match self.crop_scale {
            Some((lo, hi)) => random_resized_crop(img, lo, hi, rng),
            None => img.clone(),
        };
        if self.flip && rng.random_bool(0.5) {
            out = out.flip_horizontal();
        }
        out
    }
}

fn random_resized_crop(img: &RgbImage, lo: f32, hi: f32, rng: &mut impl rand::Rng) -> RgbImage {
    let area = (img.width * img.height) as f64;
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(lo as f64..=hi as f64);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let w = (target * ratio).sqrt().round() as usize;
        let h = (target / ratio).sqrt().round() as usize;
        if (1..=img.width).contains(&w) && (1..=img.height).contains(&h) {
            let x = rng.random_range(0..=img.width - w);
            let y = rng.random_range(0..=img.height - h);
            return img.crop(x, y, w, h);
        }
    }
    img.clone()
}

/// Which token summary the head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The CLS token after the final LayerNorm (Hugging Face's `pooler_output`).
    #[default]
    Cls,
    /// The mean of the patch tokens after the final LayerNorm.
    PatchMean,
}

/// The adapter_config.json key holding how an image adapter reads images: `{"pooling": "cls" | "mean",
/// "size": 224, "fit": "letterbox"}`.
pub const IMAGE_KEY: &str = "rime_image";

/// Accuracy, macro-F1 and loss of an image-classification adapter folder (written by [`ImageClassifyTask`]) on
/// `data`, with the pooling and input size the adapter records (CLS and 224 when it records none). The adapter's
/// labels must be the data's classes.
pub fn evaluate_adapter(
    dev: &Device,
    model: &Path,
    adapter: &Path,
    data: &ImageClassData,
    batch: usize,
) -> Result<EvalMetrics> {
    if batch == 0 {
        return Err(Error::invalid("batch_size", "0: must be at least 1"));
    }
    let mut m = vit::load(dev, model)?;
    let (acfg, labels) = classifier::load_adapter(dev, &mut m.store, adapter)?;
    if labels != data.classes {
        return Err(Error::Msg(format!(
            "{}: the adapter's labels {labels:?} are not the data's classes {:?}",
            adapter.display(),
            data.classes
        )));
    }
    let image = acfg.raw.get(IMAGE_KEY);
    let size = image.and_then(|v| v["size"].as_u64()).map_or(224, |s| s as usize);
    let pooling = match image.and_then(|v| v["pooling"].as_str()) {
        Some("mean") => Pooling::PatchMean,
        _ => Pooling::Cls,
    };
    let (gh, gw) = m.cfg.patch_grid(size, size)?;
    vit::add_positions(dev, &mut m.store, &m.cfg, &m.prefix, &m.positions, gh, gw)?;
    let hook = classifier::hook_for_adapter(&acfg)?;
    let mut ve = build_exec(dev, &m.store, &m.cfg, &m.prefix, hook.as_ref(), (batch, size, pooling), None)?;
    score(dev, &mut ve, &Preprocess::letterbox(size), data)
}

/// Accuracy, macro-F1 and loss of `ve`'s logits on `data`, forward only, a batch at a time.
fn score(dev: &Device, ve: &mut VitExec, pre: &Preprocess, data: &ImageClassData) -> Result<EvalMetrics> {
    let classes = data.classes.len();
    let mut logits = vec![0f32; data.len() * classes];
    let order: Vec<usize> = (0..data.len()).collect();
    for chunk in order.chunks(ve.batch) {
        feed(dev, ve, pre, data, chunk, None)?;
        ve.exec.forward(dev)?;
        let lg = ve.exec.read(dev, ve.logits)?;
        for (r, &i) in chunk.iter().enumerate() {
            logits[i * classes..(i + 1) * classes].copy_from_slice(&lg[r * classes..(r + 1) * classes]);
        }
    }
    let labels: Vec<i32> = data.labels.iter().map(|&l| l as i32).collect();
    Ok(metrics_from_logits(&logits, &labels, classes))
}

/// A frozen ViT with a classification head whose chosen tensors take gradients, for methods that learn
/// something other than the model's own parameters (aTLAS's task-vector coefficients): the loss of a batch of
/// images and dL/dW of the tensors marked with [`ImageGradientProbe::train_tensor`] or added with
/// [`ImageGradientProbe::add_tensor`] (the head, `head.weight` / `head.bias`, must be added before the first
/// batch). No optimizer is ever stepped; the caller rewrites tensors with [`ImageGradientProbe::write`].
pub struct ImageGradientProbe<'d> {
    dev: &'d Device,
    model: vit::VitModel,
    batch: usize,
    pooling: Pooling,
    preprocess: Preprocess,
    exec: Option<VitExec>,
}

impl<'d> ImageGradientProbe<'d> {
    /// The backbone at `model` (ONNX file or Hugging Face folder), batches of `batch` images letterboxed to
    /// `size` pixels, the head reading `pooling`.
    pub fn open(dev: &'d Device, model: &Path, batch: usize, size: usize, pooling: Pooling) -> Result<Self> {
        crate::config::at_least("batch_size", batch, 1)?;
        let mut m = vit::load(dev, model)?;
        let (gh, gw) = m.cfg.patch_grid(size, size)?;
        vit::add_positions(dev, &mut m.store, &m.cfg, &m.prefix, &m.positions, gh, gw)?;
        Ok(Self { dev, model: m, batch, pooling, preprocess: Preprocess::letterbox(size), exec: None })
    }

    /// The checkpoint's tensor-name prefix (`backbone.` for the DINOv2 ONNX file, empty for a folder).
    pub fn prefix(&self) -> &str {
        &self.model.prefix
    }

    /// Images per batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    fn built(&self, what: &str) -> Result<()> {
        match self.exec {
            Some(_) => Err(Error::Msg(format!("{what} after the first batch: the graph is already built"))),
            None => Ok(()),
        }
    }

    /// Make the model tensor `name` take gradients.
    pub fn train_tensor(&mut self, name: &str) -> Result<rime_graph::ParamId> {
        self.built("train_tensor")?;
        let id = self.model.store.id(name)?;
        self.model.store.set_trainable(id, true);
        Ok(id)
    }

    /// Add a tensor that takes gradients (the head).
    pub fn add_tensor(&mut self, name: &str, data: &[f32], shape: &[usize]) -> Result<rime_graph::ParamId> {
        self.built("add_tensor")?;
        Ok(self.model.store.add_f32(self.dev, name, data, shape, true)?)
    }

    pub fn shape(&self, id: rime_graph::ParamId) -> &[usize] {
        &self.model.store.get(id).tensor.shape
    }

    /// Overwrite a tensor's values on the device.
    pub fn write(&self, id: rime_graph::ParamId, data: &[f32]) -> Result<()> {
        Ok(self.dev.write_f32(&self.model.store.get(id).tensor, data)?)
    }

    /// A tensor's values, read back from the device.
    pub fn read(&self, id: rime_graph::ParamId) -> Result<Vec<f32>> {
        Ok(self.model.store.read_f32(self.dev, id)?)
    }

    /// The id of the model tensor `name`, if the model has it.
    pub fn find(&self, name: &str) -> Option<rime_graph::ParamId> {
        self.model.store.find(name)
    }

    fn exec(&mut self) -> Result<&VitExec> {
        if self.exec.is_none() {
            let m = &self.model;
            // The optimizer makes the executor build the backward pass; it is never stepped.
            let optim = Some(OptimConfig::adamw(0.0, 0.0));
            let ve = build_exec(
                self.dev,
                &m.store,
                &m.cfg,
                &m.prefix,
                &rime_models::Plain,
                (self.batch, self.preprocess.size, self.pooling),
                optim,
            )?;
            self.exec = Some(ve);
        }
        Ok(self.exec.as_ref().expect("built above"))
    }

    /// Mean loss of the images `idx` of `data` (at most one batch) and dL/dW of each tensor in `ids`.
    pub fn loss_and_grads(
        &mut self,
        data: &ImageClassData,
        idx: &[usize],
        ids: &[rime_graph::ParamId],
    ) -> Result<(f32, Vec<Vec<f32>>)> {
        if idx.len() > self.batch {
            return Err(Error::Msg(format!("{} images in a batch of {}", idx.len(), self.batch)));
        }
        let (dev, pre) = (self.dev, self.preprocess.clone());
        self.exec()?;
        let ve = self.exec.as_mut().expect("built above");
        feed(dev, ve, &pre, data, idx, None)?;
        ve.exec.backward_only(dev)?;
        let loss = ve.exec.read(dev, ve.loss)?[0];
        let grads = ids.iter().map(|&id| ve.exec.read_param_grad(dev, id)).collect::<Result<Vec<_>, _>>()?;
        Ok((loss, grads))
    }

    /// Accuracy, macro-F1 and loss on `data` (forward only).
    pub fn evaluate(&mut self, data: &ImageClassData) -> Result<EvalMetrics> {
        let (dev, pre) = (self.dev, self.preprocess.clone());
        self.exec()?;
        score(dev, self.exec.as_mut().expect("built above"), &pre, data)
    }
}

/// One compiled ViT graph for a batch of `batch` images.
struct VitExec {
    exec: Executor,
    logits: Var,
    loss: Var,
    batch: usize,
    /// CLS + patch tokens per image (the position ids), and the visual prompt tokens in front of them.
    tokens: usize,
    prompts: usize,
}

fn build_exec(
    dev: &Device,
    store: &ParamStore,
    cfg: &VitConfig,
    prefix: &str,
    hook: &dyn LinearHook,
    (b, size, pooling): (usize, usize, Pooling),
    optim: Option<OptimConfig>,
) -> Result<VitExec> {
    let mut g = Graph::new();
    let net = vit::build(&mut g, store, cfg, prefix, b, size, size, hook)?;
    let feat = if pooling == Pooling::Cls { net.cls } else { net.patch_mean };
    let hw = g.param(store, HEAD_WEIGHT)?;
    let hb = g.param(store, HEAD_BIAS)?;
    let logits = g.linear(feat, hw, Some(hb))?;
    let labels = g.input("labels", &[b], DType::I32);
    let loss = g.cross_entropy(logits, labels, -100)?;
    let exec = Executor::new(dev, g, store, Some(loss), &[logits], optim)?;
    let (gh, gw) = cfg.patch_grid(size, size)?;
    let prompts = hook.virtual_tokens().prompt;
    Ok(VitExec { exec, logits, loss, batch: b, tokens: 1 + gh * gw, prompts })
}

/// Preprocess `idx` of `data` into the inputs of `ve` (missing rows of a short batch are zeros, label −100),
/// each image first through `augment` when given (a seeded generator per image and pass).
fn feed(
    dev: &Device,
    ve: &VitExec,
    pre: &Preprocess,
    data: &ImageClassData,
    idx: &[usize],
    augment: Option<(&Augment, &mut AugmentState)>,
) -> Result<()> {
    let (b, s) = (ve.batch, pre.size);
    let mut pixels = vec![0f32; b * 3 * s * s];
    let mut labels = vec![-100i32; b];
    let mut augment = augment;
    for (r, &i) in idx.iter().enumerate() {
        let img = match augment.as_mut() {
            Some((a, state)) => a.apply(&data.images[i], &mut state.rng_for(i)),
            None => data.images[i].clone(),
        };
        pixels[r * 3 * s * s..(r + 1) * 3 * s * s].copy_from_slice(&pre.apply(&img));
        labels[r] = data.labels[i] as i32;
    }
    let ex = &ve.exec;
    ex.feed_f32(dev, vit::PIXEL_VALUES, &pixels)?;
    ex.feed_u32(dev, vit::POSITION_IDS, &vit::position_ids(b, ve.tokens))?;
    let (cls, mean) = vit::pool_weights(b, ve.tokens, ve.prompts);
    ex.feed_f32(dev, vit::CLS_WEIGHTS, &cls)?;
    ex.feed_f32(dev, vit::MEAN_WEIGHTS, &mean)?;
    ex.feed_i32(dev, "labels", &labels)?;
    Ok(())
}

/// Seeds augmentation per example and per pass over it: image `i` seen for the n-th time draws from
/// StdRng(seed, i, n), so a run is reproducible (a resumed run restarts the counts: its augmentations differ
/// from an uninterrupted run's).
#[derive(Debug, Clone, Default)]
struct AugmentState {
    seed: u64,
    seen: Vec<u32>,
}

impl AugmentState {
    fn rng_for(&mut self, i: usize) -> rand::rngs::StdRng {
        if self.seen.len() <= i {
            self.seen.resize(i + 1, 0);
        }
        let n = self.seen[i];
        self.seen[i] += 1;
        let key =
            self.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (n as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        rand::rngs::StdRng::seed_from_u64(key)
    }
}

/// Prompt and prefix tuning record the backbone's depth and heads (peft's `num_layers`,
/// `num_attention_heads`); the text models fill them through [`Method::for_model`].
fn for_vit(method: Method, cfg: &VitConfig) -> Method {
    let (layers, heads) = (cfg.layers, cfg.heads);
    match method {
        Method::Prompt(c) => Method::Prompt(crate::prompt::PromptConfig { layers, heads, ..c }),
        Method::Prefix(c) => Method::Prefix(crate::methods::prefix::PrefixConfig { layers, heads, ..c }),
        m => m,
    }
}

/// What [`ImageClassifyTask::prepare`] loads.
struct Loaded {
    model: vit::VitModel,
    train: ImageClassData,
    eval: ImageClassData,
    exec: Option<VitExec>,
    eval_exec: Option<VitExec>,
    eval_hook: Option<Box<dyn LinearHook>>,
    hook: Box<dyn LinearHook>,
    optim: Option<OptimConfig>,
    rows: usize,
    trainable: usize,
    frozen: usize,
    augment_state: AugmentState,
}

/// Image classification: a frozen ViT (an ONNX file holding a DINOv2 backbone), a tuning method, and a linear
/// head on [`Pooling`]; scored by accuracy. The adapter (peft layout, head under `modules_to_save`) goes to
/// `best/`.
pub struct ImageClassifyTask<'d> {
    dev: &'d Device,
    model: PathBuf,
    method: Method,
    pooling: Pooling,
    preprocess: Preprocess,
    augment: Augment,
    train: ImageClassData,
    eval: Option<ImageClassData>,
    loaded: Option<Loaded>,
}

impl<'d> ImageClassifyTask<'d> {
    /// Train `method` on `train`, evaluate on `eval` (or a seeded held-out part of `train`), images brought to
    /// the model by `preprocess` (e.g. [`Preprocess::letterbox`]`(224)`; the side must be a multiple of 14).
    pub fn new(
        dev: &'d Device,
        model: impl Into<PathBuf>,
        method: Method,
        train: ImageClassData,
        eval: Option<ImageClassData>,
    ) -> Self {
        let (pooling, preprocess) = (Pooling::Cls, Preprocess::letterbox(224));
        let augment = Augment::default();
        ImageClassifyTask { dev, model: model.into(), method, pooling, preprocess, augment, train, eval, loaded: None }
    }

    /// The head reads `pooling` instead of the CLS token.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Training images are augmented by `augment` (seeded by [`TrainConfig::seed`]).
    pub fn with_augment(mut self, augment: Augment) -> Self {
        self.augment = augment;
        self
    }

    /// Images are preprocessed by `preprocess` (its size is the model's input side).
    pub fn with_preprocess(mut self, preprocess: Preprocess) -> Self {
        self.preprocess = preprocess;
        self
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded> {
        self.loaded.as_mut().ok_or_else(|| Error::Msg("the image task is not prepared".into()))
    }

    fn exec(&mut self) -> Result<&mut VitExec> {
        let (dev, size, pooling) = (self.dev, self.preprocess.size, self.pooling);
        let l = self.loaded.as_mut().ok_or_else(|| Error::Msg("the image task is not prepared".into()))?;
        if l.exec.is_none() {
            let m = &l.model;
            let key = (l.rows, size, pooling);
            l.exec = Some(build_exec(dev, &m.store, &m.cfg, &m.prefix, l.hook.as_ref(), key, l.optim.clone())?);
        }
        Ok(l.exec.as_mut().expect("just built"))
    }

    /// Logits of every eval image, forward only.
    fn eval_logits(&mut self) -> Result<(Vec<f32>, Vec<i32>)> {
        let (dev, pre, pooling) = (self.dev, self.preprocess.clone(), self.pooling);
        let eval_hook = self.loaded.as_ref().is_some_and(|l| l.eval_hook.is_some());
        if eval_hook && self.loaded.as_ref().is_some_and(|l| l.eval_exec.is_none()) {
            let l = self.loaded_mut()?;
            let m = &l.model;
            let hook = l.eval_hook.as_deref().expect("checked");
            l.eval_exec = Some(build_exec(dev, &m.store, &m.cfg, &m.prefix, hook, (l.rows, pre.size, pooling), None)?);
        }
        if !eval_hook {
            self.exec()?;
        }
        let l = self.loaded.as_mut().expect("prepared");
        let ve = if eval_hook { l.eval_exec.as_mut() } else { l.exec.as_mut() }.expect("built above");
        let classes = l.train.classes.len();
        let n = l.eval.len();
        let mut logits = vec![0f32; n * classes];
        let order: Vec<usize> = (0..n).collect();
        for chunk in order.chunks(ve.batch) {
            feed(dev, ve, &pre, &l.eval, chunk, None)?;
            ve.exec.forward(dev)?;
            let lg = ve.exec.read(dev, ve.logits)?;
            for (r, &i) in chunk.iter().enumerate() {
                logits[i * classes..(i + 1) * classes].copy_from_slice(&lg[r * classes..(r + 1) * classes]);
            }
        }
        Ok((logits, l.eval.labels.iter().map(|&x| x as i32).collect()))
    }
}

impl<'d> Task<'d> for ImageClassifyTask<'d> {
    type Summary = ClassifySummary;

    fn device(&self) -> &'d Device {
        self.dev
    }

    fn prepare(&mut self, cfg: &TrainConfig, on: &mut dyn FnMut(Event)) -> Result<Vec<usize>> {
        if cfg.head != crate::config::HeadKind::Mean {
            return Err(Error::invalid("head", "image classification has no BertForSequenceClassification head (hf)"));
        }
        let dev = self.dev;
        let (train, eval) = match &self.eval {
            Some(e) => (self.train.clone(), e.clone()),
            None => {
                on(Event::Info(format!("no eval set: holding out {:.0}% of the images", cfg.eval_fraction * 100.0)));
                self.train.split(cfg.eval_fraction, cfg.seed)?
            }
        };
        if let Some((lo, hi)) = self.augment.crop_scale {
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return Err(Error::invalid("crop_scale", format!("({lo}, {hi}): expected 0 < min <= max <= 1")));
            }
        }
        if eval.classes != train.classes {
            return Err(Error::invalid(
                "eval",
                format!("eval classes {:?} differ from train classes {:?}", eval.classes, train.classes),
            ));
        }
        let mut model = vit::load(dev, &self.model)?;
        let (gh, gw) = model.cfg.patch_grid(self.preprocess.size, self.preprocess.size)?;
        vit::add_positions(dev, &mut model.store, &model.cfg, &model.prefix, &model.positions, gh, gw)?;
        classifier::init_head(dev, &mut model.store, model.cfg.hidden, train.classes.len(), cfg.seed)?;
        self.method = for_vit(self.method.clone(), &model.cfg);
        on(Event::Info(classifier::prepare_method(dev, &mut model.store, &self.method)?));
        let trainable: usize = model.store.trainable().map(|(_, p)| p.tensor.numel()).sum();
        let frozen: usize = model.store.iter().filter(|(_, p)| !p.trainable).map(|(_, p)| p.tensor.numel()).sum();
        on(Event::Info(format!("{}: {trainable} trainable parameters, {frozen} frozen", self.method.name())));
        let lens = vec![self.preprocess.size; train.len()];
        let (hook, eval_hook) = (classifier::hook_for(&self.method), classifier::eval_hook_for(&self.method));
        self.loaded = Some(Loaded {
            model,
            train,
            eval,
            exec: None,
            eval_exec: None,
            eval_hook,
            hook,
            optim: None,
            rows: cfg.rows(),
            trainable,
            frozen,
            augment_state: AugmentState { seed: cfg.seed, seen: vec![] },
        });
        Ok(lens)
    }

    fn compile(&mut self, optim: OptimConfig, rows: usize) -> Result<()> {
        let l = self.loaded_mut()?;
        (l.optim, l.rows, l.exec, l.eval_exec) = (Some(optim), rows, None, None);
        Ok(())
    }

    fn bucket(&self, _longest: usize) -> usize {
        self.preprocess.size
    }

    fn executor(&mut self, _key: usize) -> Result<(&mut Executor, &ParamStore)> {
        self.exec()?;
        let l = self.loaded.as_mut().expect("prepared");
        Ok((&mut l.exec.as_mut().expect("built").exec, &l.model.store))
    }

    fn feed(&mut self, idx: &[usize], _key: usize) -> Result<(&mut Executor, Var)> {
        let (dev, pre) = (self.dev, self.preprocess.clone());
        self.exec()?;
        let l = self.loaded.as_mut().expect("prepared");
        let ve = l.exec.as_mut().expect("built");
        let augment = self.augment.is_on().then_some((&self.augment, &mut l.augment_state));
        feed(dev, ve, &pre, &l.train, idx, augment)?;
        Ok((&mut ve.exec, ve.loss))
    }

    fn any_executor(&self) -> Option<&Executor> {
        self.loaded.as_ref().and_then(|l| l.exec.as_ref()).map(|e| &e.exec)
    }

    fn store(&self) -> &ParamStore {
        match &self.loaded {
            Some(l) => &l.model.store,
            None => crate::classify::empty_store(),
        }
    }

    fn evaluate(&mut self) -> Result<Option<Evaluation>> {
        let (logits, labels) = self.eval_logits()?;
        let classes = logits.len() / labels.len().max(1);
        let m: EvalMetrics = metrics_from_logits(&logits, &labels, classes);
        let values = vec![
            ("eval_accuracy".to_string(), m.accuracy),
            ("eval_macro_f1".to_string(), m.macro_f1),
            ("eval_loss".to_string(), m.loss),
        ];
        Ok(Some(Evaluation { score: m.accuracy, metrics: m, values }))
    }

    fn metric(&self) -> Metric {
        Metric { name: "accuracy", higher_is_better: true }
    }

    fn adapter(&self) -> Result<PeftAdapter> {
        let dir = std::env::temp_dir().join(format!("rime-image-adapter-{}-{:p}", std::process::id(), self));
        self.save_adapter(&dir)?;
        let ad = PeftAdapter::load(&dir);
        std::fs::remove_dir_all(&dir).ok();
        Ok(ad?)
    }

    /// The adapter as [`classifier::save_adapter`] writes it, plus `rime_image` (pooling and input size) in
    /// rime.json so that evaluation reads the images the same way.
    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let l = self.loaded.as_ref().ok_or_else(|| Error::Msg("the image task is not prepared".into()))?;
        let base = self.model.display().to_string();
        let tmp = dir.with_extension("image-write");
        crate::checkpoint::remove(&tmp)?;
        classifier::save_adapter(self.dev, &l.model.store, &self.method, &base, &l.train.classes, &tmp)?;
        let mut config = rime_io::AdapterConfig::from_file(tmp.join(rime_io::peft::ADAPTER_CONFIG))?;
        let pooling = if self.pooling == Pooling::Cls { "cls" } else { "mean" };
        let image = serde_json::json!({ "pooling": pooling, "size": self.preprocess.size, "fit": "letterbox" });
        config.raw.insert(IMAGE_KEY.into(), image);
        let path = tmp.join(rime_io::peft::RIME_JSON);
        let text = serde_json::to_string_pretty(&config.rime_json()).map_err(|e| Error::Msg(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        crate::checkpoint::replace_dir(&tmp, dir)
    }

    fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let dev = self.dev;
        classifier::load_adapter(dev, &mut self.loaded_mut()?.model.store, dir)?;
        Ok(())
    }

    fn adapter_folder(&self) -> &'static str {
        "best"
    }

    fn title(&self) -> String {
        let data = self.train.source.as_ref().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
        format!(
            "{} · {} · {}",
            self.model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            self.method.name(),
            data.unwrap_or_else(|| format!("{} images", self.train.len()))
        )
    }

    fn summary(&self, run: &RunStats) -> ClassifySummary {
        let l = self.loaded.as_ref();
        let params = l.map_or((0, 0), |l| (l.trainable, l.frozen));
        ClassifySummary::of_run(self.method.name(), run, params, l.map(|l| l.train.classes.clone()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp() -> RgbImage {
        RgbImage::from_gray(20, 10, &(0..200).map(|i| i as u8).collect::<Vec<_>>())
    }

    #[test]
    fn augmentation_is_seeded_per_image_and_pass() {
        let a = Augment { crop_scale: Some((0.08, 1.0)), flip: true };
        let (mut s1, mut s2) = (AugmentState { seed: 7, seen: vec![] }, AugmentState { seed: 7, seen: vec![] });
        let first: Vec<RgbImage> = (0..4).map(|_| a.apply(&ramp(), &mut s1.rng_for(3))).collect();
        let again: Vec<RgbImage> = (0..4).map(|_| a.apply(&ramp(), &mut s2.rng_for(3))).collect();
        assert_eq!(first, again, "same seed, same draws");
        assert!(first.windows(2).any(|w| w[0] != w[1]), "each pass draws anew");
        for img in &first {
            assert!(img.width <= 20 && img.height <= 10 && img.width * img.height >= 1);
        }
        assert!(!Augment::default().is_on());
    }

    #[test]
    fn crops_keep_area_within_the_scale_and_ratio() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let img = RgbImage::from_gray(100, 100, &[0; 10_000]);
        for _ in 0..50 {
            let c = random_resized_crop(&img, 0.25, 0.5, &mut rng);
            let area = (c.width * c.height) as f64 / 10_000.0;
            let ratio = c.width as f64 / c.height as f64;
            assert!((0.23..=0.52).contains(&area) && (0.7..=1.4).contains(&ratio), "{}x{}", c.width, c.height);
        }
    }
}
