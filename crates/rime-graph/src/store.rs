//! The parameter store: every weight of a model on the device, by name, frozen or trainable, with the
//! parameter group (learning rate, weight decay) a trainable one belongs to.

use std::collections::HashMap;

use rime_kernels::{Device, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub trainable: bool,
    /// Index into the optimizer's parameter groups.
    pub group: usize,
}

#[derive(Default)]
pub struct ParamStore {
    params: Vec<Param>,
    /// Name → position in `params`: lookups and the duplicate check of [`ParamStore::add`] stay O(1), so
    /// loading a checkpoint of n tensors is linear in n (a linear scan per add made it quadratic: a header of
    /// 200,000 extra tensors took minutes).
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a parameter (name must be unique).
    pub fn add(&mut self, name: &str, tensor: Tensor, trainable: bool) -> Result<ParamId> {
        if self.find(name).is_some() {
            return Err(Error::Invalid(format!("parameter '{name}' added twice")));
        }
        let mut tensor = tensor;
        if trainable {
            tensor.texture = None; // see set_trainable
        }
        self.index.insert(name.to_string(), self.params.len());
        self.params.push(Param { name: name.to_string(), tensor, trainable, group: 0 });
        Ok(ParamId(self.params.len() - 1))
    }

    pub fn add_f32(
        &mut self,
        dev: &Device,
        name: &str,
        data: &[f32],
        shape: &[usize],
        trainable: bool,
    ) -> Result<ParamId> {
        let t = dev.upload_bytes(name, bytemuck::cast_slice(data), shape, rime_kernels::DType::F32)?;
        self.add(name, t, trainable)
    }

    /// Give every frozen linear weight (a 2-D `*.weight` that is not an embedding table) a texture twin where
    /// the device has use for one ([`Device::with_texture_twin`]: f32, CPU adapters); returns how many got one.
    pub fn add_texture_twins(&mut self, dev: &Device) -> Result<usize> {
        let mut n = 0;
        for p in self.params.iter_mut() {
            let linear = p.tensor.rank() == 2 && p.name.ends_with(".weight") && !p.name.contains("embed");
            if !p.trainable && linear && p.tensor.texture.is_none() {
                p.tensor = dev.with_texture_twin(&p.tensor)?;
                n += p.tensor.texture.is_some() as usize;
            }
        }
        Ok(n)
    }

    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied().map(ParamId)
    }
    pub fn id(&self, name: &str) -> Result<ParamId> {
        self.find(name).ok_or_else(|| Error::UnknownParam(name.to_string()))
    }
    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }
    pub fn get_mut(&mut self, id: ParamId) -> &mut Param {
        &mut self.params[id.0]
    }
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }
    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    /// Mark a parameter trainable or frozen. A trainable one loses its texture twin: the optimizer's kernels
    /// write its buffer, which would leave the twin stale.
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) {
        let p = &mut self.params[id.0];
        p.trainable = trainable;
        if trainable {
            p.tensor.texture = None;
        }
    }
    pub fn set_group(&mut self, id: ParamId, group: usize) {
        self.params[id.0].group = group;
    }
    pub fn trainable(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.iter().filter(|(_, p)| p.trainable)
    }
    /// Read a parameter back as f32 (f16/bf16 weights are widened on the CPU).
    pub fn read_f32(&self, dev: &Device, id: ParamId) -> Result<Vec<f32>> {
        let p = self.get(id);
        Ok(match p.tensor.dtype {
            rime_kernels::DType::F32 => dev.download_f32(&p.tensor)?,
            rime_kernels::DType::F16 => {
                let b = dev.download_bytes(&p.tensor)?;
                b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            rime_kernels::DType::BF16 => {
                let b = dev.download_bytes(&p.tensor)?;
                b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            d => return Err(Error::Invalid(format!("parameter '{}' has dtype {d:?}, not a float", p.name))),
        })
    }
}
