//! Running a built executor: feeding inputs, reading outputs and gradients, and recording a step (forward,
//! backward, update) into one command encoder and one submit.

use rime_kernels::ops::elementwise;
use rime_kernels::{wgpu, Device, Tensor};

use super::builder::Phase;
use super::{tensor_of, Executor};
use crate::error::{Error, Result};
use crate::graph::Var;
use crate::store::ParamId;

/// What a training step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    /// The loss of the step before this one (read without stalling this one); None on the first step.
    pub prev_loss: Option<f32>,
}

/// The dropout seed of a step: the graph's seed mixed (splitmix64) with the optimizer step and the micro-batch
/// index. [`Executor::forward`] and [`Executor::backward_only`] use the current step and micro-batch without
/// advancing them, so repeated calls see the same masks (what a finite-difference check needs).
pub fn dropout_seed(seed: u32, step: u64, micro: u64) -> u32 {
    let mut z = (seed as u64) ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ micro.wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

impl Executor {
    fn input_tensor(&self, name: &str) -> Result<Tensor> {
        let v = *self.inputs.get(name).ok_or_else(|| Error::Input {
            name: name.to_string(),
            msg: format!("no such input; the graph has {:?}", self.inputs.keys().collect::<Vec<_>>()),
        })?;
        let r = self.var_ref[v.0].as_ref().ok_or_else(|| Error::Invalid(format!("input '{name}' unplanned")))?;
        Ok(tensor_of(&self.slots, r))
    }

    /// Feed an input for the next step (f32, or the bit patterns of u32/i32 data via the typed helpers).
    pub fn feed_bytes(&self, dev: &Device, name: &str, bytes: &[u8]) -> Result<()> {
        let t = self.input_tensor(name)?;
        let want = t.dtype.size() * t.numel();
        if bytes.len() != want {
            return Err(Error::Input {
                name: name.to_string(),
                msg: format!("{} bytes given, shape {:?} of {:?} needs {want}", bytes.len(), t.shape, t.dtype),
            });
        }
        dev.queue().write_buffer(&t.buffer, 0, bytes);
        Ok(())
    }
    pub fn feed_f32(&self, dev: &Device, name: &str, data: &[f32]) -> Result<()> {
        self.feed_bytes(dev, name, bytemuck::cast_slice(data))
    }
    pub fn feed_u32(&self, dev: &Device, name: &str, data: &[u32]) -> Result<()> {
        self.feed_bytes(dev, name, bytemuck::cast_slice(data))
    }
    pub fn feed_i32(&self, dev: &Device, name: &str, data: &[i32]) -> Result<()> {
        self.feed_bytes(dev, name, bytemuck::cast_slice(data))
    }

    /// Read a forward value (an output given at construction, or the loss) after a step or forward run.
    pub fn read(&self, dev: &Device, v: Var) -> Result<Vec<f32>> {
        let r = self.var_ref[v.0].as_ref().ok_or_else(|| Error::Invalid(format!("tensor {v:?} not planned")))?;
        Ok(dev.download_f32(&tensor_of(&self.slots, r))?)
    }
    /// Read the gradient of a trainable parameter (after a step; before the update is applied it is not
    /// observable, so use [`Executor::backward_only`] to inspect gradients).
    pub fn read_param_grad(&self, dev: &Device, id: ParamId) -> Result<Vec<f32>> {
        let (_, slot) = self
            .param_grads
            .iter()
            .find(|(p, _)| *p == id)
            .ok_or_else(|| Error::Invalid(format!("parameter {id:?} has no gradient (frozen or unused)")))?;
        Ok(dev.download_f32(self.slots[*slot].tensor.as_ref().expect("planned"))?)
    }
    /// The gradient of any forward tensor that has one (for tests).
    pub fn read_grad(&self, dev: &Device, v: Var) -> Result<Vec<f32>> {
        let r = self.grad_ref.get(&v).ok_or_else(|| Error::Invalid(format!("tensor {v:?} has no gradient")))?;
        Ok(dev.download_f32(&tensor_of(&self.slots, r))?)
    }

    fn record(&mut self, dev: &Device, phases: &[Phase], zero_grads: bool, copy_loss: bool) -> Result<()> {
        let mut enc =
            dev.wgpu_device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rime step") });
        if zero_grads {
            for (_, s) in &self.param_grads {
                enc.clear_buffer(&self.slots[*s].tensor.as_ref().expect("planned").buffer, 0, None);
            }
        }
        {
            let mut pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("rime step"), timestamp_writes: None });
            for ph in phases {
                let list = match ph {
                    Phase::Forward => &self.forward,
                    Phase::Backward => &self.backward,
                    Phase::Optim => &self.optim,
                };
                for d in list {
                    d.record(&mut pass);
                }
            }
        }
        if copy_loss {
            if let Some(l) = self.loss {
                let r = self.var_ref[l.0].as_ref().expect("loss planned");
                let buf = &self.slots[r.slot].tensor.as_ref().expect("planned").buffer;
                let k = (self.step % 2) as usize;
                enc.copy_buffer_to_buffer(buf, 0, &self.staging[k], 0, 4);
            }
        }
        dev.queue().submit([enc.finish()]);
        Ok(())
    }

    fn write_hyper(&self, dev: &Device) -> Result<()> {
        if let Some(cfg) = &self.optim_cfg {
            for (g, s) in self.hyper.iter().enumerate() {
                dev.write_f32(self.slots[*s].tensor.as_ref().expect("planned"), &cfg.hyper(g, self.step))?;
            }
        }
        Ok(())
    }

    /// Point every dropout at this step's masks: the seed mixes the graph's seed with the optimizer step and
    /// the micro-batch, so masks differ from step to step, repeat for the same `--seed`, and forward and
    /// backward of one step (recorded in the same submit) share theirs.
    fn write_dropout_seeds(&self, dev: &Device) -> Result<()> {
        for &(ph, k, seed) in &self.dropouts {
            let list = match ph {
                Phase::Forward => &self.forward,
                Phase::Backward => &self.backward,
                Phase::Optim => &self.optim,
            };
            elementwise::dropout_set_seed(dev, &list[k], dropout_seed(seed, self.step, self.micro))?;
        }
        Ok(())
    }

    fn read_staged(&mut self, dev: &Device, k: usize) -> Result<f32> {
        let bytes = dev.map_read(&self.staging[k])?;
        Ok(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// One training step: forward, backward and optimizer update in one submit. Returns the previous
    /// step's loss, read while this one runs.
    pub fn step(&mut self, dev: &Device) -> Result<StepOutput> {
        self.micro_step(dev, true, true)
    }

    /// Gradient accumulation: call with `first` on the first micro-batch (zeroes gradients) and `last` on
    /// the last (applies the update). Set [`Executor::set_loss_scale`] to 1/micro_batches beforehand.
    pub fn micro_step(&mut self, dev: &Device, first: bool, last: bool) -> Result<StepOutput> {
        if self.optim_cfg.is_none() || self.loss.is_none() {
            return Err(Error::Invalid("this executor was built without a loss and optimizer".into()));
        }
        if last {
            self.write_hyper(dev)?;
        }
        if first {
            self.micro = 0;
        }
        self.write_dropout_seeds(dev)?;
        self.micro += 1;
        let phases: &[Phase] =
            if last { &[Phase::Forward, Phase::Backward, Phase::Optim] } else { &[Phase::Forward, Phase::Backward] };
        self.record(dev, phases, first, last)?;
        let prev = match self.pending.take() {
            Some(k) => Some(self.read_staged(dev, k)?),
            None => None,
        };
        if last {
            self.pending = Some((self.step % 2) as usize);
            self.step += 1;
        }
        Ok(StepOutput { prev_loss: prev })
    }

    /// The loss of the most recent step (waits for it).
    pub fn last_loss(&mut self, dev: &Device) -> Result<Option<f32>> {
        match self.pending.take() {
            Some(k) => Ok(Some(self.read_staged(dev, k)?)),
            None => Ok(None),
        }
    }

    /// Scale of the loss gradient (1/k for k accumulated micro-batches of equal size).
    pub fn set_loss_scale(&self, dev: &Device, s: f32) -> Result<()> {
        if let Some(d) = self.dloss {
            dev.write_f32(self.slots[d].tensor.as_ref().expect("planned"), &[s])?;
        }
        Ok(())
    }

    /// Forward only (evaluation); read outputs with [`Executor::read`].
    pub fn forward(&mut self, dev: &Device) -> Result<()> {
        self.write_dropout_seeds(dev)?;
        self.record(dev, &[Phase::Forward], false, false)?;
        dev.wait()?;
        Ok(())
    }

    /// Forward and backward without the update (gradients readable with `read_param_grad`).
    pub fn backward_only(&mut self, dev: &Device) -> Result<()> {
        self.write_dropout_seeds(dev)?;
        self.record(dev, &[Phase::Forward, Phase::Backward], true, false)?;
        dev.wait()?;
        Ok(())
    }
}
