//! Adapter choice and the device: which GPU runs rime, what it offers, and the caches that make repeated
//! launches cheap (compiled pipelines, pooled buffers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::pipeline::{Dispatch, PipelineKey, Spec};
use crate::tensor::{DType, Tensor, TextureTwin};

/// How to pick an adapter.
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    /// The requested GPU: a case-insensitive substring of the adapter name; when `None`, the RIME_ADAPTER
    /// environment variable, else the best adapter (discrete > integrated > any).
    pub adapter: Option<String>,
}

/// One adapter as wgpu reports it; `rime info` prints these.
#[derive(Debug, Clone)]
pub struct AdapterReport {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
}

impl AdapterReport {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        AdapterReport {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
        }
    }
}

/// The GPU device rime runs on, with its queue, chosen features and caches.
pub struct Device {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: wgpu::Limits,
    adapters_seen: Vec<AdapterReport>,
    modules: Mutex<HashMap<(String, String), Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    pool: Mutex<HashMap<u64, Vec<Arc<wgpu::Buffer>>>>,
    errors: Arc<Mutex<Vec<String>>>,
    /// The f32 scratch that quantized weights are dequantized into before a large product (see
    /// [`Device::dequant_scratch`]).
    scratch: Mutex<Option<Tensor>>,
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u32 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    }
}

impl Device {
    /// Pick an adapter (by name if asked, else discrete > integrated > any) and open a device on it with the
    /// adapter's own limits and whichever of SHADER_F16, SUBGROUP and TIMESTAMP_QUERY it has.
    ///
    /// ```
    /// use rime_kernels::{Device, DeviceOptions};
    ///
    /// // The default GPU (or the one RIME_ADAPTER names); `adapter: Some("nvidia".into())` asks for one by name.
    /// let dev = Device::new(&DeviceOptions::default())?;
    /// let name = &dev.info().name;
    /// assert!(dev.adapters_seen().iter().any(|a| &a.name == name));
    /// assert!(dev.max_binding() > 0, "largest storage binding in bytes");
    /// # Ok::<(), rime_kernels::Error>(())
    /// ```
    pub fn new(opts: &DeviceOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        // The primary backends first; GL only when none of them has an adapter (its probing is noisy).
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        if adapters.is_empty() {
            adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        }
        let adapters_seen: Vec<AdapterReport> =
            adapters.iter().map(|a| AdapterReport::from_info(&a.get_info())).collect();
        if adapters.is_empty() {
            return Err(Error::NoAdapter);
        }
        let (wanted, source_name) = match (&opts.adapter, std::env::var("RIME_ADAPTER")) {
            (Some(w), _) => (Some(w.clone()), "the requested GPU name"),
            (None, Ok(w)) if !w.is_empty() => (Some(w), "the RIME_ADAPTER environment variable"),
            _ => (None, ""),
        };
        let adapter = match wanted {
            Some(w) => {
                let lw = w.to_lowercase();
                adapters
                    .into_iter()
                    .filter(|a| a.get_info().name.to_lowercase().contains(&lw))
                    .min_by_key(|a| backend_rank(a.get_info().backend))
                    .ok_or_else(|| Error::AdapterNotFound {
                        wanted: w.clone(),
                        source_name: source_name.to_string(),
                        seen: adapters_seen.iter().map(|a| a.name.clone()).collect::<Vec<_>>().join(", "),
                    })?
            }
            None => adapters
                .into_iter()
                .min_by_key(|a| {
                    let i = a.get_info();
                    (type_rank(i.device_type), backend_rank(i.backend))
                })
                .ok_or(Error::NoAdapter)?,
        };
        let info = adapter.get_info();
        let wanted_features = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let features = adapter.features() & wanted_features;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("rime"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice { adapter: info.name.clone(), msg: e.to_string() })?;
        // Validation errors outside an error scope would otherwise panic inside wgpu; keep them and
        // report them from the next `run`.
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        Ok(Device {
            device,
            queue,
            info,
            features,
            limits,
            adapters_seen,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            errors,
            scratch: Mutex::new(None),
        })
    }

    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }
    pub fn features(&self) -> wgpu::Features {
        self.features
    }
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
    pub fn adapters_seen(&self) -> &[AdapterReport] {
        &self.adapters_seen
    }
    /// A CPU adapter (lavapipe): kernels pick their barrier-free register-tiled variants.
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }
    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }
    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size
    }
    pub fn wgpu_device(&self) -> &wgpu::Device {
        &self.device
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    // ---------------------------------------------------------------- buffers and tensors

    fn buffer(&self, bytes: u64) -> Arc<wgpu::Buffer> {
        let size = bytes.max(4).next_multiple_of(4);
        if let Some(b) = self.pool.lock().ok().and_then(|mut p| p.get_mut(&size).and_then(|v| v.pop())) {
            return b;
        }
        Arc::new(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    fn check_size(&self, name: &str, bytes: u64) -> Result<()> {
        if bytes > self.max_binding() {
            return Err(Error::TooLarge { name: name.to_string(), bytes, limit: self.max_binding() });
        }
        Ok(())
    }

    /// An uninitialised tensor (contents unspecified: pooled buffers are reused).
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = dtype.storage_bytes(shape.iter().product());
        self.check_size("(new tensor)", bytes)?;
        Ok(Tensor::new(self.buffer(bytes), shape.to_vec(), dtype))
    }

    /// The device's dequantization scratch, at least `elems` f32 values: the quantized matmul launchers
    /// ([`crate::ops::matmul`] with a [`DType::Q`] weight) dequantize a weight into it before a product of many
    /// rows and run the f32 matmul. One scratch serves every weight, since dispatches run in order; it grows
    /// to the largest weight asked for (a dispatch recorded earlier keeps the smaller one it was given, so
    /// reserve the largest first: [`Device::reserve_dequant_scratch`]).
    pub fn dequant_scratch(&self, elems: usize) -> Result<Tensor> {
        let mut s = self.scratch.lock().map_err(|_| Error::Gpu {
            what: "the dequantization scratch".into(),
            msg: "its lock is poisoned (a thread panicked holding it)".into(),
        })?;
        if let Some(t) = s.as_ref().filter(|t| t.numel() >= elems) {
            return Ok(t.clone());
        }
        let t = self.empty(&[elems.max(1)], DType::F32)?;
        *s = Some(t.clone());
        Ok(t)
    }

    /// Size the dequantization scratch for a weight of `elems` values now (a model loader calls it with its
    /// largest quantized weight), so that every product shares one buffer.
    pub fn reserve_dequant_scratch(&self, elems: usize) -> Result<()> {
        self.dequant_scratch(elems).map(|_| ())
    }

    /// Bytes of the dequantization scratch (0 when no quantized product ran).
    pub fn dequant_scratch_bytes(&self) -> u64 {
        self.scratch.lock().ok().and_then(|s| s.as_ref().map(|t| t.bytes())).unwrap_or(0)
    }

    /// A zero-filled tensor.
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.empty(shape, dtype)?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.clear_buffer(&t.buffer, 0, None);
        self.queue.submit([enc.finish()]);
        Ok(t)
    }

    /// Give a tensor's buffer back to the pool for reuse by later allocations of the same size.
    pub fn recycle(&self, t: Tensor) {
        if let Ok(buf) = Arc::try_unwrap(t.buffer) {
            if let Ok(mut p) = self.pool.lock() {
                p.entry(buf.size()).or_default().push(Arc::new(buf));
            }
        }
    }

    /// Whether [`Device::with_texture_twin`] makes twins here: on CPU adapters, unless `RIME_TEXTURE_TWINS=0`.
    pub fn uses_texture_twins(&self) -> bool {
        self.is_cpu() && texture_twins_enabled()
    }

    /// The tensor with a texture twin ([`TextureTwin`]) when it can have one and the adapter is a CPU one (the
    /// only kind where the texture path measured faster): an f32 or f16 matrix [.., cols] (rgba32float or
    /// rgba16float texels) whose rows are 256-byte multiples (the copy's row alignment: cols % 64 == 0 for f32,
    /// cols % 128 for f16) and within the adapter's 2-D texture size. Any other tensor comes back unchanged. The
    /// copy is queued now; the buffer must not be written afterwards while the twin is in use (frozen weights
    /// only; [`Device::write_f32`] refreshes it).
    pub fn with_texture_twin(&self, t: &Tensor) -> Result<Tensor> {
        let (rows, cols) = (t.rows(), t.last_dim());
        let max = self.limits.max_texture_dimension_2d as usize;
        let format = match t.dtype {
            DType::F32 => wgpu::TextureFormat::Rgba32Float,
            DType::F16 => wgpu::TextureFormat::Rgba16Float,
            _ => return Ok(t.clone()),
        };
        if !self.uses_texture_twins()
            || t.rank() < 2
            || t.texture.is_some()
            || rows == 0
            || cols == 0
            || !(cols * t.dtype.size()).is_multiple_of(256)
            || cols / 4 > max
            || rows > max
        {
            return Ok(t.clone());
        }
        let size = wgpu::Extent3d { width: (cols / 4) as u32, height: rows as u32, depth_or_array_layers: 1 };
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let texture = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("rime texture twin"),
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        let view = texture.create_view(&Default::default());
        let twin = TextureTwin { texture, view, rows, cols, dtype: t.dtype };
        self.refresh_twin(&t.buffer, &twin);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu { what: format!("texture twin of a {:?} tensor", t.shape), msg: e.to_string() });
        }
        let mut out = t.clone();
        out.texture = Some(Arc::new(twin));
        Ok(out)
    }

    /// Queue the copy of a buffer into its texture twin.
    fn refresh_twin(&self, buffer: &wgpu::Buffer, tw: &TextureTwin) {
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some((tw.cols * tw.dtype.size()) as u32),
                    rows_per_image: Some(tw.rows as u32),
                },
            },
            wgpu::TexelCopyTextureInfo {
                texture: &tw.texture,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            tw.texture.size(),
        );
        self.queue.submit([enc.finish()]);
    }

    /// Upload raw little-endian bytes as a tensor of `dtype` (f16/bf16 are stored packed, two per word).
    pub fn upload_bytes(&self, name: &str, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != dtype.size() * n {
            return Err(Error::Shape {
                op: "upload",
                msg: format!("tensor '{name}': {} bytes for shape {shape:?} of {dtype:?}", bytes.len()),
            });
        }
        self.check_size(name, bytes.len() as u64)?;
        let padded_len = bytes.len().max(4).next_multiple_of(4);
        let buffer = if padded_len == bytes.len() {
            self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(name),
                contents: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            })
        } else {
            let mut v = bytes.to_vec();
            v.resize(padded_len, 0);
            self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(name),
                contents: &v,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            })
        };
        Ok(Tensor::new(Arc::new(buffer), shape.to_vec(), dtype))
    }

    /// Upload f32 values as a tensor of `shape` (row-major); [`Device::download_f32`] reads one back.
    ///
    /// ```
    /// # use rime_kernels::{Device, DeviceOptions, DType};
    /// # let dev = Device::new(&DeviceOptions::default())?;
    /// let t = dev.upload_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    /// assert_eq!((t.shape.as_slice(), t.dtype), ([2, 3].as_slice(), DType::F32));
    /// assert_eq!(dev.download_f32(&t)?, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    /// // The element count must match the shape.
    /// assert!(dev.upload_f32(&[1.0, 2.0], &[3]).is_err());
    /// # Ok::<(), rime_kernels::Error>(())
    /// ```
    pub fn upload_f32(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes("(f32 data)", bytemuck::cast_slice(data), shape, DType::F32)
    }
    pub fn upload_u32(&self, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes("(u32 data)", bytemuck::cast_slice(data), shape, DType::U32)
    }
    pub fn upload_f16(&self, data: &[half::f16], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes("(f16 data)", bytemuck::cast_slice(data), shape, DType::F16)
    }
    pub fn upload_bf16(&self, data: &[half::bf16], shape: &[usize]) -> Result<Tensor> {
        self.upload_bytes("(bf16 data)", bytemuck::cast_slice(data), shape, DType::BF16)
    }

    /// Overwrite a tensor's contents (queued before the next submit).
    pub fn write_f32(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        if t.dtype != DType::F32 || data.len() != t.numel() {
            return Err(Error::Shape {
                op: "write_f32",
                msg: format!("{} values into {:?} tensor of shape {:?}", data.len(), t.dtype, t.shape),
            });
        }
        self.queue.write_buffer(&t.buffer, 0, bytemuck::cast_slice(data));
        // A frozen weight rewritten in place (PiSSA's and SVFit's residuals) keeps its twin in step.
        if let Some(tw) = &t.texture {
            self.refresh_twin(&t.buffer, tw);
        }
        Ok(())
    }

    /// Read back the raw bytes of a tensor (blocks until the GPU is done).
    pub fn download_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        let len = t.buffer.size();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("rime readback"),
            size: len,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&t.buffer, 0, &staging, 0, len);
        self.queue.submit([enc.finish()]);
        let bytes = self.map_read(&staging)?;
        Ok(bytes[..t.dtype.size() * t.numel()].to_vec())
    }

    /// Map a MAP_READ buffer, wait, and copy it out.
    pub fn map_read(&self, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Gpu { what: "readback".into(), msg: e.to_string() }),
            Err(e) => return Err(Error::Gpu { what: "readback".into(), msg: e.to_string() }),
        }
        let view = slice.get_mapped_range().map_err(|e| Error::Gpu { what: "readback".into(), msg: e.to_string() })?;
        let out = view.to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Read an F32 tensor back (waits for the queued work); see [`Device::upload_f32`] for an example.
    pub fn download_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        if t.dtype != DType::F32 {
            return Err(Error::DType { op: "download_f32", got: t.dtype, expected: "F32" });
        }
        Ok(bytemuck::pod_collect_to_vec(&self.download_bytes(t)?))
    }
    pub fn download_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        if t.dtype != DType::U32 && t.dtype != DType::I32 {
            return Err(Error::DType { op: "download_u32", got: t.dtype, expected: "U32" });
        }
        Ok(bytemuck::pod_collect_to_vec(&self.download_bytes(t)?))
    }

    /// Block until all submitted work is done; report any GPU validation error raised meanwhile.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu { what: "poll".into(), msg: e.to_string() })?;
        self.take_errors("GPU work")
    }

    fn take_errors(&self, what: &str) -> Result<()> {
        let mut errs = self.errors.lock().map_err(|_| Error::Gpu { what: what.into(), msg: "poisoned".into() })?;
        if errs.is_empty() {
            return Ok(());
        }
        let msg = errs.join("; ");
        errs.clear();
        Err(Error::Gpu { what: what.into(), msg })
    }

    // ---------------------------------------------------------------- pipelines and dispatch

    /// The compiled pipeline for (shader file, entry point, specialization), built once and cached.
    pub fn pipeline(&self, file: &str, entry: &str, spec: &Spec) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = PipelineKey { file: file.to_string(), entry: entry.to_string(), spec: spec.key() };
        if let Some(p) = self.pipelines.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(p);
        }
        let module = self.module(file, &spec.prelude)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let constants: Vec<(&str, f64)> = spec.constants.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader { file: file.into(), entry: entry.into(), msg: e.to_string() });
        }
        let p = Arc::new(pipeline);
        if let Ok(mut m) = self.pipelines.lock() {
            m.insert(key, p.clone());
        }
        Ok(p)
    }

    fn module(&self, file: &str, prelude: &str) -> Result<Arc<wgpu::ShaderModule>> {
        let key = (file.to_string(), prelude.to_string());
        if let Some(m) = self.modules.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(m);
        }
        let source = crate::shaders::source_with_prelude(file, prelude)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(file),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader { file: file.into(), entry: "(module)".into(), msg: e.to_string() });
        }
        let m = Arc::new(module);
        if let Ok(mut c) = self.modules.lock() {
            c.insert(key, m.clone());
        }
        Ok(m)
    }

    /// Build one dispatch: `params` (if any) goes to a uniform buffer at binding 0; `bindings` are
    /// (binding index, tensor) for the storage buffers the entry point uses, exactly those.
    pub fn dispatch(
        &self,
        file: &str,
        entry: &str,
        spec: &Spec,
        params: Option<&[u8]>,
        bindings: &[(u32, &Tensor)],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        self.dispatch_with_textures(file, entry, spec, params, bindings, &[], workgroups)
    }

    /// [`Device::dispatch`] that also binds texture twins: `textures` are (binding index, twin).
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch_with_textures(
        &self,
        file: &str,
        entry: &str,
        spec: &Spec,
        params: Option<&[u8]>,
        bindings: &[(u32, &Tensor)],
        textures: &[(u32, &TextureTwin)],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let pipeline = self.pipeline(file, entry, spec)?;
        let uniform = params.map(|p| {
            let mut v = p.to_vec();
            v.resize(v.len().max(16).next_multiple_of(16), 0);
            self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("rime params"),
                contents: &v,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            })
        });
        let mut entries: Vec<wgpu::BindGroupEntry> = Vec::with_capacity(bindings.len() + 1);
        if let Some(u) = &uniform {
            entries.push(wgpu::BindGroupEntry { binding: 0, resource: u.as_entire_binding() });
        }
        for (i, t) in bindings {
            entries.push(wgpu::BindGroupEntry { binding: *i, resource: t.buffer.as_entire_binding() });
        }
        for (i, t) in textures {
            entries.push(wgpu::BindGroupEntry { binding: *i, resource: wgpu::BindingResource::TextureView(&t.view) });
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader { file: file.into(), entry: entry.into(), msg: format!("bind group: {e}") });
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::Shape {
                op: "dispatch",
                msg: format!("{entry}: workgroup grid {workgroups:?} exceeds the adapter's {max} per dimension"),
            });
        }
        Ok(Dispatch { pipeline, bind_group, workgroups, uniform, label: entry.to_string() })
    }

    /// Record dispatches into one compute pass, submit once and wait. For tests and one-off work; the graph
    /// executor records a whole step itself.
    pub fn run(&self, dispatches: &[Dispatch]) -> Result<()> {
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rime run") });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            for d in dispatches {
                d.record(&mut pass);
            }
        }
        self.queue.submit([enc.finish()]);
        self.wait()
    }

    /// Copy a whole tensor into another of the same byte size (queued).
    pub fn copy(&self, src: &Tensor, dst: &Tensor) -> Result<()> {
        if src.buffer.size() != dst.buffer.size() {
            return Err(Error::Shape { op: "copy", msg: format!("{:?} into {:?}", src.shape, dst.shape) });
        }
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, src.buffer.size());
        self.queue.submit([enc.finish()]);
        Ok(())
    }
}

/// `RIME_TEXTURE_TWINS=0` turns texture twins off (every product reads its rhs buffer): for A/B timing.
fn texture_twins_enabled() -> bool {
    std::env::var("RIME_TEXTURE_TWINS").map_or(true, |v| v != "0")
}

/// Split a 1-D count of workgroups into a 2-D grid within the per-dimension limit (65535 everywhere).
/// Shaders recover the flat index as `wid.x + wid.y * nwg.x` and must bounds-check.
pub fn grid_1d(groups: u32) -> [u32; 3] {
    if groups <= 65535 {
        [groups.max(1), 1, 1]
    } else {
        let y = groups.div_ceil(65535);
        [groups.div_ceil(y), y, 1]
    }
}

#[allow(unused)]
pub(crate) fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Device>();
}
