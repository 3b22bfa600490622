//! Specialization of shaders and the recorded unit of GPU work ([`Dispatch`]).

use std::sync::Arc;

/// How one shader is specialised: a short generated WGSL prelude (`alias T = f32;`, helper loads for a
/// storage dtype) plus pipeline-overridable constants (tile sizes, workgroup size).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spec {
    pub prelude: String,
    pub constants: Vec<(String, f64)>,
}

impl Spec {
    pub fn new() -> Self {
        Spec::default()
    }
    pub fn prelude(mut self, p: impl Into<String>) -> Self {
        self.prelude.push_str(&p.into());
        self.prelude.push('\n');
        self
    }
    pub fn constant(mut self, name: &str, value: f64) -> Self {
        self.constants.push((name.to_string(), value));
        self
    }
    pub(crate) fn key(&self) -> String {
        let mut k = self.prelude.clone();
        for (n, v) in &self.constants {
            k.push_str(&format!("|{n}={v}"));
        }
        k
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub file: String,
    pub entry: String,
    pub spec: String,
}

/// One kernel launch, ready to record any number of times (its bindings and parameters are fixed).
pub struct Dispatch {
    pub(crate) pipeline: Arc<wgpu::ComputePipeline>,
    pub(crate) bind_group: wgpu::BindGroup,
    pub(crate) workgroups: [u32; 3],
    pub(crate) uniform: Option<wgpu::Buffer>,
    pub label: String,
}

impl Dispatch {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }
    pub fn workgroups(&self) -> [u32; 3] {
        self.workgroups
    }
    /// The uniform parameter buffer, for callers that update a parameter between steps (e.g. the Adam step).
    pub fn params_buffer(&self) -> Option<&wgpu::Buffer> {
        self.uniform.as_ref()
    }
}
