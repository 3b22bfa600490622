//! The linear probe: the classification head alone trains (the head is common to every method; the probe adds
//! nothing to the encoder). The adapter holds the head under `modules_to_save`, with `peft_type` `RIME_PROBE`
//! (peft has no probe).

use rime_graph::ParamStore;
use rime_io::peft::AdapterConfig;
use rime_kernels::Device;
use rime_models::{LinearHook, Plain};

use super::TuningMethod;
use crate::Result;

pub const PEFT_TYPE: &str = "RIME_PROBE";

/// The linear probe as a [`TuningMethod`].
pub struct Probe;

impl Probe {
    /// A saved probe: the head alone.
    pub fn from_adapter(_a: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
        Ok(Box::new(Probe))
    }
}

impl TuningMethod for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn add_parameters(&self, _dev: &Device, _store: &mut ParamStore) -> Result<String> {
        Ok("linear probe: the head alone".to_string())
    }

    fn hook(&self) -> Box<dyn LinearHook> {
        Box::new(Plain)
    }

    fn adapter_config(&self, _store: &ParamStore) -> Result<AdapterConfig> {
        // r = 1 only because the adapter_config reader refuses r = 0; a probe has no low-rank part.
        let mut a = AdapterConfig::lora(1, 1.0, vec![]);
        a.peft_type = PEFT_TYPE.into();
        Ok(a)
    }
}
