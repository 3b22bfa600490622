//! Bottleneck adapters: `a(h) = up(relu(down(h)))`, C → size → C, added to a transformer sub-block's
//! output before its residual add and LayerNorm, after the attention output and after the FFN.
//! - serial (Houlsby et al. 2019): `y' = y + s·a(y)`;
//! - parallel (He et al. 2022, "Towards a unified view"): `y' = y + s·a(x)`, x the sub-block's input; with
//!   s > 1 (He et al. use 4) this is their scaled parallel adapter.
//!
//! `up` starts at zero, so training starts from the pretrained model; `down` as torch.nn.Linear.
//! peft has no bottleneck adapter: the folder uses peft's layout with `peft_type` `RIME_BOTTLENECK` and
//! `adapter_size`, `adapter_mode`, `adapter_scale` in adapter_config.json; tensors are
//! `base_model.model.encoder.layer.N.{attention.output|output}.adapter.{down|up}.{weight|bias}`
//! (down.weight [size, C], up.weight [C, size]).

use rand::{Rng, SeedableRng};
use regex::Regex;
use rime_graph::{Graph, ParamStore, Var};
use rime_io::peft::AdapterConfig;
use rime_kernels::Device;
use rime_models::LinearHook;

use super::TuningMethod;
use crate::{Error, Result};

pub const PEFT_TYPE: &str = "RIME_BOTTLENECK";

/// Where the bottleneck reads from (`adapter_mode` in adapter_config.json).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdapterMode {
    /// Houlsby et al.: the adapter reads the sub-block's output, `y' = y + s·a(y)`.
    #[default]
    Serial,
    /// He et al.: the adapter reads the sub-block's input, `y' = y + s·a(x)`.
    Parallel,
}

impl AdapterMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "serial" => Some(AdapterMode::Serial),
            "parallel" => Some(AdapterMode::Parallel),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            AdapterMode::Serial => "serial",
            AdapterMode::Parallel => "parallel",
        }
    }
}

/// Bottleneck adapters' settings (peft has no bottleneck adapter; [`Default`] is the CLI's: 64 units,
/// serial, scale 1).
#[derive(Debug, Clone)]
pub struct BottleneckConfig {
    /// Bottleneck width, at least 1 (`adapter_size` in adapter_config.json).
    pub size: usize,
    /// Serial or parallel (`adapter_mode`).
    pub mode: AdapterMode,
    /// Scale s of the adapter's output (`adapter_scale`; He et al.'s scaled parallel adapter uses 4).
    pub scale: f32,
    /// Seeds the down projections' initialization.
    pub seed: u64,
}

impl Default for BottleneckConfig {
    fn default() -> BottleneckConfig {
        BottleneckConfig { size: 64, mode: AdapterMode::Serial, scale: 1.0, seed: 0 }
    }
}

/// The adapter's module name for a sub-block (`attention` or `ffn`) of layer `layer`.
pub fn module_name(layer: usize, block: &str) -> String {
    let sub = if block == "attention" { "attention.output" } else { "output" };
    format!("base_model.model.encoder.layer.{layer}.{sub}.adapter")
}

/// Add down/up projections for every encoder layer of the store (found by its
/// `encoder.layer.N.attention.output.dense.weight`). Returns the number of adapters.
pub fn add_adapters(dev: &Device, store: &mut ParamStore, cfg: &BottleneckConfig) -> Result<usize> {
    if cfg.size == 0 {
        return Err(Error::invalid("adapter_size", "0: the bottleneck needs at least 1 unit"));
    }
    let re = Regex::new(r"(^|\.)encoder\.layer\.(\d+)\.attention\.output\.dense\.weight$")
        .map_err(|e| Error::Msg(e.to_string()))?;
    let mut layers: Vec<(usize, usize)> = store
        .iter()
        .filter_map(|(_, p)| {
            let c = re.captures(&p.name)?;
            Some((c[2].parse().ok()?, p.tensor.shape[0]))
        })
        .collect();
    layers.sort();
    if layers.is_empty() {
        return Err(Error::Msg(
            "adapter: no encoder.layer.N.attention.output.dense.weight in the model (not a BERT encoder?)".into(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0xada9);
    let mut n = 0;
    for (l, c) in layers {
        for block in ["attention", "ffn"] {
            let m = module_name(l, block);
            let bound = 1.0 / (c as f32).sqrt();
            let down: Vec<f32> = (0..cfg.size * c).map(|_| rng.random_range(-bound..bound)).collect();
            store.add_f32(dev, &format!("{m}.down.weight"), &down, &[cfg.size, c], true)?;
            store.add_f32(dev, &format!("{m}.down.bias"), &vec![0.0; cfg.size], &[cfg.size], true)?;
            store.add_f32(dev, &format!("{m}.up.weight"), &vec![0.0; c * cfg.size], &[c, cfg.size], true)?;
            store.add_f32(dev, &format!("{m}.up.bias"), &vec![0.0; c], &[c], true)?;
            n += 1;
        }
    }
    Ok(n)
}

pub struct AdapterHook {
    pub mode: AdapterMode,
    pub scale: f32,
    /// A sub-block without its adapter is an error (the adapters were never added).
    pub strict: bool,
}

impl LinearHook for AdapterHook {
    fn block_output(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        layer: usize,
        block: &str,
        x_in: Var,
        y: Var,
    ) -> rime_graph::Result<Var> {
        let m = module_name(layer, block);
        if store.find(&format!("{m}.down.weight")).is_none() {
            if self.strict {
                return Err(rime_graph::Error::Invalid(format!(
                    "adapter '{m}' is not in the store: add the adapters first (classifier::prepare_method)"
                )));
            }
            return Ok(y);
        }
        let p = |g: &mut Graph, s: &str| g.param(store, &format!("{m}.{s}"));
        let (dw, db, uw, ub) = (p(g, "down.weight")?, p(g, "down.bias")?, p(g, "up.weight")?, p(g, "up.bias")?);
        let src = match self.mode {
            AdapterMode::Serial => y,
            AdapterMode::Parallel => x_in,
        };
        let h = g.linear(src, dw, Some(db))?;
        let h = g.relu(h);
        let a = g.linear(h, uw, Some(ub))?;
        let a = if self.scale != 1.0 { g.scale(a, self.scale) } else { a };
        g.add(y, a)
    }
}

/// Bottleneck adapters as a [`TuningMethod`].
pub struct Bottleneck {
    config: BottleneckConfig,
    /// Training: a sub-block without its adapter is an error. A loaded adapter: such blocks stay plain.
    strict: bool,
}

impl Bottleneck {
    pub fn new(config: BottleneckConfig) -> Bottleneck {
        Bottleneck { config, strict: true }
    }

    /// A saved RIME_BOTTLENECK adapter as it applies: needs `adapter_mode` and `adapter_scale`.
    pub fn from_adapter(a: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
        let mode = a.raw.get("adapter_mode").and_then(|v| v.as_str()).and_then(AdapterMode::parse);
        let scale = a.raw.get("adapter_scale").and_then(|v| v.as_f64());
        match (mode, scale) {
            (Some(mode), Some(scale)) => {
                let config = BottleneckConfig { size: a.r, mode, scale: scale as f32, seed: 0 };
                Ok(Box::new(Bottleneck { config, strict: false }))
            }
            _ => Err(Error::Msg(
                "adapter_config.json of a RIME_BOTTLENECK adapter needs adapter_mode (serial|parallel) and \
                 adapter_scale"
                    .into(),
            )),
        }
    }
}

impl TuningMethod for Bottleneck {
    fn name(&self) -> &'static str {
        "adapter"
    }

    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn add_parameters(&self, dev: &Device, store: &mut ParamStore) -> Result<String> {
        let c = &self.config;
        let n = add_adapters(dev, store, c)?;
        Ok(format!("{} bottleneck adapters of size {} ({}, scale {})", n, c.size, c.mode.name(), c.scale))
    }

    fn hook(&self) -> Box<dyn LinearHook> {
        Box::new(AdapterHook { mode: self.config.mode, scale: self.config.scale, strict: self.strict })
    }

    fn adapter_config(&self, store: &ParamStore) -> Result<AdapterConfig> {
        let c = &self.config;
        let mut a = AdapterConfig::lora(c.size, 0.0, super::modules_with(store, ".down.weight"));
        a.peft_type = PEFT_TYPE.into();
        a.raw.insert("adapter_size".into(), serde_json::json!(c.size));
        a.raw.insert("adapter_mode".into(), serde_json::json!(c.mode.name()));
        a.raw.insert("adapter_scale".into(), serde_json::json!(c.scale));
        a.raw.insert("adapter_activation".into(), serde_json::json!("relu"));
        Ok(a)
    }

    fn is_method_tensor(&self, local: &str) -> bool {
        local.contains(".adapter.")
    }
}
