//! Optimizer state on disk: the moments of every trained parameter and the step count, as safetensors.

use std::collections::HashMap;

use rime_kernels::Device;

use super::Executor;
use crate::error::{Error, Result};
use crate::store::ParamStore;

impl Executor {
    /// Save optimizer state (moments per parameter and the step count) as safetensors, atomically.
    pub fn save_optimizer_state(&self, dev: &Device, store: &ParamStore, path: &std::path::Path) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (id, slots) in &self.opt_state {
            let p = store.get(*id);
            for (k, s) in slots.iter().enumerate() {
                let data = dev.download_bytes(self.slots[*s].tensor.as_ref().expect("planned"))?;
                let n = p.tensor.numel() * 4;
                tensors.push((
                    format!("{}.{}", ["exp_avg", "exp_avg_sq"][k.min(1)], p.name),
                    p.tensor.shape.clone(),
                    data[..n].to_vec(),
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, s, d)| {
                Ok((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)?))
            })
            .collect::<std::result::Result<_, safetensors::SafeTensorError>>()
            .map_err(|e| Error::State { path: path.display().to_string(), msg: e.to_string() })?;
        let meta: HashMap<String, String> = [("step".to_string(), self.step.to_string())].into_iter().collect();
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, Some(meta), &tmp)
            .map_err(|e| Error::State { path: path.display().to_string(), msg: e.to_string() })?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::State { path: path.display().to_string(), msg: e.to_string() })?;
        Ok(())
    }

    /// Load optimizer state written by [`Executor::save_optimizer_state`]; names and shapes must match.
    pub fn load_optimizer_state(&mut self, dev: &Device, store: &ParamStore, path: &std::path::Path) -> Result<()> {
        let err = |msg: String| Error::State { path: path.display().to_string(), msg };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        for (id, slots) in &self.opt_state {
            let p = store.get(*id);
            for (k, s) in slots.iter().enumerate() {
                let name = format!("{}.{}", ["exp_avg", "exp_avg_sq"][k.min(1)], p.name);
                let t = st.tensor(&name).map_err(|_| err(format!("missing tensor '{name}'")))?;
                if t.shape() != p.tensor.shape.as_slice() || t.dtype() != safetensors::Dtype::F32 {
                    return Err(err(format!(
                        "tensor '{name}': {:?} {:?}, expected F32 {:?}",
                        t.dtype(),
                        t.shape(),
                        p.tensor.shape
                    )));
                }
                let data: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
                dev.write_f32(self.slots[*s].tensor.as_ref().expect("planned"), &data)?;
            }
        }
        self.step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err("metadata has no 'step'".into()))?;
        Ok(())
    }
}
