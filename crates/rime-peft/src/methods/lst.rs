//! Ladder side-tuning (LST) as a registry entry: how its adapter folder is written and read back. The method
//! itself (the side network, the feature cache, its task) lives in [`crate::lst`]; it departs from the other
//! methods in that it is not a [`LinearHook`] rewrite of the encoder but a second network beside it, so the
//! hook here is the plain encoder and [`crate::lst::LstTask`] / [`crate::lst::predict`] build the side graph.
//!
//! adapter_config.json: `peft_type` `RIME_LST`, and `lst_reduction`, `lst_drop_layers`, `lst_gate_temperature`, `lst_dropout`,
//! `lst_side_hidden`, `lst_side_heads`, `lst_side_intermediate`, `lst_layers`, `lst_hidden` (the side
//! network's sizes and the backbone's depth and width it was built for). adapter_model.safetensors: the side
//! network (`base_model.model.lst.*`) and the head (`base_model.model.head.*`).

use rime_graph::ParamStore;
use rime_io::peft::AdapterConfig;
use rime_kernels::Device;
use rime_models::bert::BertConfig;
use rime_models::{LinearHook, Plain};
use serde_json::json;

use super::TuningMethod;
use crate::classifier::Method;
use crate::lst::{LstConfig, SideDims};
use crate::{Error, Result};

pub const PEFT_TYPE: &str = "RIME_LST";

/// LST as a [`TuningMethod`] (adapter folders; training goes through [`crate::lst::LstTask`]).
pub struct Lst {
    pub cfg: LstConfig,
    /// The side network's sizes, once known (from the model, or from a saved adapter).
    pub dims: Option<SideDims>,
}

impl Lst {
    pub fn new(cfg: LstConfig) -> Lst {
        Lst { cfg, dims: None }
    }

    /// A saved LST adapter: its config and side sizes from adapter_config.json.
    pub fn from_adapter(a: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
        let (cfg, dims) = read_config(a)?;
        Ok(Box::new(Lst { cfg, dims: Some(dims) }))
    }
}

/// The LST fields of an adapter_config.json; an error naming the missing or bad field.
pub fn read_config(a: &AdapterConfig) -> Result<(LstConfig, SideDims)> {
    let num = |k: &str| -> Result<usize> {
        a.raw
            .get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| Error::Msg(format!("adapter_config.json: RIME_LST adapter without an integer '{k}'")))
    };
    let drop_layers = match a.raw.get("lst_drop_layers") {
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Error::Msg("adapter_config.json: 'lst_drop_layers' is not a list of integers".into()))?,
        None => vec![],
    };
    let gate_temperature = a
        .raw
        .get("lst_gate_temperature")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| Error::Msg("adapter_config.json: RIME_LST adapter without 'lst_gate_temperature'".into()))?
        as f32;
    let dims = SideDims {
        hidden: num("lst_hidden")?,
        side: num("lst_side_hidden")?,
        heads: num("lst_side_heads")?,
        intermediate: num("lst_side_intermediate")?,
        layers: num("lst_layers")?,
    };
    // Dropout acts in training only; adapters written before it was an option have no field.
    let dropout = a.raw.get("lst_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32;
    let cfg =
        LstConfig { reduction: num("lst_reduction")?, drop_layers, gate_temperature, heads: Some(dims.heads), dropout };
    cfg.validate(dims.layers)?;
    Ok((cfg, dims))
}

impl TuningMethod for Lst {
    fn name(&self) -> &'static str {
        "lst"
    }

    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn for_model(&self, cfg: &BertConfig) -> Option<Method> {
        let _ = cfg;
        None
    }

    fn add_parameters(&self, _dev: &Device, _store: &mut ParamStore) -> Result<String> {
        Err(Error::invalid(
            "method",
            "lst trains a side network beside the encoder, not inside it: run it with rime_peft::lst::LstTask \
             (rime::finetune::classify does)",
        ))
    }

    fn hook(&self) -> Box<dyn LinearHook> {
        Box::new(Plain)
    }

    fn adapter_config(&self, _store: &ParamStore) -> Result<AdapterConfig> {
        let d = self.dims.as_ref().ok_or_else(|| Error::Msg("lst: the side network's sizes are not known".into()))?;
        // r = 1 only because the adapter_config reader refuses r = 0 (as the probe).
        let mut a = AdapterConfig::lora(1, 1.0, vec![]);
        a.peft_type = PEFT_TYPE.into();
        a.raw.insert("lst_reduction".into(), json!(self.cfg.reduction));
        a.raw.insert("lst_drop_layers".into(), json!(self.cfg.drop_layers));
        a.raw.insert("lst_gate_temperature".into(), json!(self.cfg.gate_temperature));
        a.raw.insert("lst_dropout".into(), json!(self.cfg.dropout));
        a.raw.insert("lst_side_hidden".into(), json!(d.side));
        a.raw.insert("lst_side_heads".into(), json!(d.heads));
        a.raw.insert("lst_side_intermediate".into(), json!(d.intermediate));
        a.raw.insert("lst_layers".into(), json!(d.layers));
        a.raw.insert("lst_hidden".into(), json!(d.hidden));
        Ok(a)
    }
}
