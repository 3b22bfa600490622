//! Tuning methods behind one trait, [`TuningMethod`]: what a method adds to the parameter store, how it
//! rewrites the model's graph (a [`LinearHook`] for training and one for evaluation), and how it writes and
//! reads its adapter folder in peft's layout. One file per method:
//!
//! | file | method | `peft_type` |
//! |---|---|---|
//! | [`lora`] | LoRA, rsLoRA, DoRA, PiSSA init, LoRA dropout | `LORA` |
//! | [`svfit`] | singular values of the target weights | `RIME_SVFIT` |
//! | [`ia3`] | (IA)³ scaling vectors | `IA3` |
//! | [`bottleneck`] | serial / parallel bottleneck adapters | `RIME_BOTTLENECK` |
//! | [`prompt`] | soft prompt in front of the input | `PROMPT_TUNING` |
//! | [`prefix`] | key/value prefixes in every layer | `PREFIX_TUNING` |
//! | [`probe`] | the classification head alone | `RIME_PROBE` |
//! | [`lst`] | ladder side-tuning (a side network beside the encoder, [`crate::lst`]) | `RIME_LST` |
//!
//! A method is built from its config (`LoraConfig` → [`lora::Lora`], ...; [`crate::classifier::Method`] does
//! it for the enum the CLI fills) or, for an adapter folder, from its adapter_config.json through the registry
//! [`REGISTRY`], keyed by `peft_type` ([`from_adapter`]). Adding a method is a new file here and one registry
//! line (plus, for the CLI, a `Method` variant).

pub mod bottleneck;
pub mod ia3;
pub mod lora;
pub mod lst;
pub mod prefix;
pub mod probe;
pub mod prompt;
pub mod svfit;

use std::path::Path;

use rime_graph::ParamStore;
use rime_io::peft::{AdapterConfig, PeftAdapter};
use rime_kernels::Device;
use rime_models::bert::BertConfig;
use rime_models::{LinearHook, VirtualTokens};

use crate::classifier::Method;
use crate::{Error, Result};

/// A tensor of an adapter being written: (name, shape, values). Method tensors are under peft's names
/// (`base_model.model.<module>.lora_A.weight`), prompt and prefix tables under their store names until
/// [`TuningMethod::write_tensors`] turns them into peft's.
pub type SavedTensor = (String, Vec<usize>, Vec<f32>);

/// One parameter-efficient tuning method. The classification head beside it (peft's `modules_to_save`) is
/// common to all and handled by [`crate::classifier`].
pub trait TuningMethod {
    /// rime's short name of the method: `lora`, `svfit`, `ia3`, `adapter`, `prompt`, `prefix`, `probe`.
    fn name(&self) -> &'static str;

    /// The `peft_type` of its adapter_config.json (see [`REGISTRY`]).
    fn peft_type(&self) -> &'static str;

    /// The virtual tokens the method adds to every sequence (prompt and prefix tuning); none by default.
    fn virtual_tokens(&self) -> VirtualTokens {
        VirtualTokens::default()
    }

    /// The method's config with the model's sizes filled in, for methods that record them in
    /// adapter_config.json (prompt and prefix tuning: depth and heads); `None` when nothing changes.
    fn for_model(&self, _cfg: &BertConfig) -> Option<Method> {
        None
    }

    /// Add the method's trainable tensors (and frozen helpers) to a store holding the model; some methods
    /// rewrite frozen weights (SVFit, PiSSA). Returns a line describing what was added.
    fn add_parameters(&self, dev: &Device, store: &mut ParamStore) -> Result<String>;

    /// The graph rewrite for training (LoRA dropout included).
    fn hook(&self) -> Box<dyn LinearHook>;

    /// The rewrite for evaluation and inference when it differs from [`TuningMethod::hook`] (LoRA with
    /// dropout); `None` lets a training session evaluate with its training graphs.
    fn eval_hook(&self) -> Option<Box<dyn LinearHook>> {
        None
    }

    /// The method's part of adapter_config.json (the head, base model, task and labels are added by
    /// [`crate::classifier::save_adapter`]).
    fn adapter_config(&self, store: &ParamStore) -> Result<AdapterConfig>;

    /// Put the tensors to save into peft's layout: `tensors` holds the trainable tensors (see
    /// [`crate::classifier::trainable_tensors`]); a method adds frozen tensors that belong to its adapter
    /// (SVFit's U and V), converts them (PiSSA to a plain LoRA) or joins them (prefix tables). None by default.
    fn write_tensors(&self, _dev: &Device, _store: &ParamStore, _tensors: &mut Vec<SavedTensor>) -> Result<()> {
        Ok(())
    }

    /// Loading: check a read adapter and bring its tensors into the store's layout before they are loaded
    /// (`dir` names the folder in errors). Nothing by default.
    fn read_tensors(&self, _dev: &Device, _store: &ParamStore, _ad: &mut PeftAdapter, _dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Whether a loaded tensor (its name without `base_model.model.`) is one of the method's, kept under
    /// peft's full name in the store; other tensors (the head) take their module's own name.
    fn is_method_tensor(&self, _local: &str) -> bool {
        false
    }

    /// Whether a loaded tensor missing from the store is added frozen (SVFit's U and V) rather than trainable.
    fn loads_frozen(&self, _name: &str) -> bool {
        false
    }

    /// Loading: the last step, once the tensors are in the store (SVFit turns W into W_rest). Nothing by
    /// default.
    fn after_load(&self, _dev: &Device, _store: &ParamStore) -> Result<()> {
        Ok(())
    }
}

/// A method known by its `peft_type`: how to build it from an adapter folder's config.
pub struct Registered {
    pub peft_type: &'static str,
    /// The method as it applies a saved adapter (evaluation and inference: no dropout; target modules without
    /// the method's tensors keep their plain linear).
    pub from_adapter: fn(&AdapterConfig) -> Result<Box<dyn TuningMethod>>,
}

/// Every method by `peft_type`, the one list [`from_adapter`] reads.
pub const REGISTRY: &[Registered] = &[
    Registered { peft_type: lora::PEFT_TYPE, from_adapter: lora::Lora::from_adapter },
    Registered { peft_type: ia3::PEFT_TYPE, from_adapter: ia3::Ia3::from_adapter },
    Registered { peft_type: prompt::PROMPT_TUNING, from_adapter: prompt::Prompt::from_adapter },
    Registered { peft_type: prefix::PREFIX_TUNING, from_adapter: prefix::Prefix::from_adapter },
    Registered { peft_type: svfit::PEFT_TYPE, from_adapter: svfit::Svfit::from_adapter },
    Registered { peft_type: bottleneck::PEFT_TYPE, from_adapter: bottleneck::Bottleneck::from_adapter },
    Registered { peft_type: probe::PEFT_TYPE, from_adapter: probe::Probe::from_adapter },
    Registered { peft_type: lst::PEFT_TYPE, from_adapter: lst::Lst::from_adapter },
];

/// The method of an adapter folder, by its config's `peft_type`; an error listing the known types otherwise.
pub fn from_adapter(cfg: &AdapterConfig) -> Result<Box<dyn TuningMethod>> {
    match REGISTRY.iter().find(|r| r.peft_type == cfg.peft_type) {
        Some(r) => (r.from_adapter)(cfg),
        None => {
            let known: Vec<&str> = REGISTRY.iter().map(|r| r.peft_type).collect();
            Err(Error::Msg(format!("adapter peft_type '{}' is not supported ({})", cfg.peft_type, known.join(", "))))
        }
    }
}

/// The modules (without `base_model.model.`) that have a tensor named `<module><suffix>` in the store.
pub(crate) fn modules_with(store: &ParamStore, suffix: &str) -> Vec<String> {
    store
        .iter()
        .filter_map(|(_, p)| p.name.strip_suffix(suffix))
        .map(|m| m.trim_start_matches("base_model.model.").to_string())
        .collect()
}

/// A strict hook (one built for training, with its method's `targets`) meets a target module whose tensors are
/// not in the store: the method's parameters were never added, so refuse rather than run the plain layer.
pub(crate) fn refuse_missing_target(targets: Option<&[String]>, module: &str, what: &str) -> rime_graph::Result<()> {
    if targets.is_some_and(|t| lora::target_matches(t, module)) {
        return Err(rime_graph::Error::Invalid(format!(
            "{what} for '{module}' not in the store: add them first (classifier::prepare_method)"
        )));
    }
    Ok(())
}
