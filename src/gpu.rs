//! Choosing a GPU: the default adapter, or one by name, with its limits and features.

use rime_kernels::{Device, DeviceOptions, Tensor};

use crate::Result;

/// A GPU (any adapter wgpu reaches: Vulkan, Metal, DX12, or the CPU driver lavapipe) with rime's kernels ready
/// to run on it. Every model, trainer and kernel call of this crate runs on one.
///
/// ```
/// let gpu = rime::Gpu::new()?; // the default adapter (or the one named by the RIME_ADAPTER variable)
/// let info = gpu.info();
/// assert!(!info.name.is_empty() && info.max_storage_binding > 0);
/// # Ok::<(), rime::Error>(())
/// ```
pub struct Gpu {
    dev: Device,
}

/// What a [`Gpu`] is and what it offers.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    /// The adapter's name as the driver reports it (e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// Vulkan, Metal, Dx12, ...
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, Cpu, ...
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// A CPU adapter (lavapipe, WARP): rime then reads frozen weights through texture copies.
    pub is_cpu: bool,
    /// Subgroup operations available (faster attention and matrix-vector kernels).
    pub subgroups: bool,
    /// `f16` arithmetic in shaders.
    pub shader_f16: bool,
    /// GPU timestamps (per-kernel profiles).
    pub timestamps: bool,
    /// Largest storage buffer one kernel may bind, in bytes.
    pub max_storage_binding: u64,
    /// Largest workgroup, in invocations.
    pub max_workgroup_invocations: u32,
    /// Frozen weights are read through texture copies on this adapter.
    pub texture_twins: bool,
    /// Every adapter wgpu listed, as `name (backend, type)`.
    pub adapters_seen: Vec<String>,
}

impl Gpu {
    /// The default adapter: the one named by the `RIME_ADAPTER` environment variable when set, else the first
    /// hardware GPU, else a CPU adapter.
    pub fn new() -> Result<Gpu> {
        Ok(Gpu { dev: Device::new(&DeviceOptions::default())? })
    }

    /// The first adapter whose name contains `name` (case-insensitive); an error lists the adapters seen.
    pub fn by_name(name: &str) -> Result<Gpu> {
        Ok(Gpu { dev: Device::new(&DeviceOptions { adapter: Some(name.to_string()) })? })
    }

    /// Wraps a device made with the kernel crate's own options.
    pub fn from_device(dev: Device) -> Gpu {
        Gpu { dev }
    }

    /// Name, backend, limits and features.
    pub fn info(&self) -> GpuInfo {
        let d = &self.dev;
        let i = d.info();
        GpuInfo {
            name: i.name.clone(),
            backend: format!("{:?}", i.backend),
            device_type: format!("{:?}", i.device_type),
            driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
            is_cpu: d.is_cpu(),
            subgroups: d.has_subgroups(),
            shader_f16: d.has_f16(),
            timestamps: d.has_timestamps(),
            max_storage_binding: d.max_binding(),
            max_workgroup_invocations: d.limits().max_compute_invocations_per_workgroup,
            texture_twins: d.uses_texture_twins(),
            adapters_seen: d
                .adapters_seen()
                .iter()
                .map(|a| format!("{} ({}, {})", a.name, a.backend, a.device_type))
                .collect(),
        }
    }

    /// Copies `data` to a new f32 tensor of `shape` on the GPU.
    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        Ok(self.dev.upload_f32(data, shape)?)
    }

    /// Reads a tensor back (waits for the kernels that write it).
    pub fn download(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(self.dev.download_f32(t)?)
    }

    /// The kernel crate's device, for calls below this facade (`rime::kernels::raw`).
    pub fn device(&self) -> &Device {
        &self.dev
    }
}
