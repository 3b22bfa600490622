//! Every shader parses and validates with naga for every declared specialization, and every shader file
//! is covered by at least one declared specialization.

use rime_kernels::shaders::{declared_specs, source_with_prelude, SHADERS};

#[test]
fn every_shader_validates_for_every_declared_specialization() {
    let specs = declared_specs();
    assert!(!specs.is_empty(), "no specializations declared");
    for (file, _) in SHADERS {
        assert!(specs.iter().any(|(f, _)| f == file), "{file} has no declared specialization");
    }
    for (file, spec) in &specs {
        let src = source_with_prelude(file, &spec.prelude).unwrap();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{file} ({spec:?}) does not parse:\n{}", e.emit_to_string(&src)));
        let mut v = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
        let info = v.validate(&module).unwrap_or_else(|e| panic!("{file} ({spec:?}) invalid: {e:?}"));
        // Apply the override constants too, as the pipeline would.
        let consts: naga::back::PipelineConstants = spec.constants.iter().map(|(k, v)| (k.clone(), *v)).collect();
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &consts)
            .unwrap_or_else(|e| panic!("{file} ({spec:?}) overrides: {e:?}"));
    }
}
