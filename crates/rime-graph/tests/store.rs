//! The parameter store by name: lookups and the duplicate check stay constant-time, so a checkpoint of many
//! tensors loads in linear time.

mod common;

use rime_graph::ParamStore;

#[test]
fn a_store_of_100k_parameters_fills_and_finds_in_linear_time() {
    let dev = common::dev();
    let t = dev.upload_bytes("p", &[0u8; 4], &[1], rime_kernels::DType::F32).unwrap();
    let mut store = ParamStore::new();
    let n = 100_000;
    for i in 0..n {
        assert_eq!(store.add(&format!("extra.{i}"), t.clone(), false).unwrap().0, i);
    }
    assert_eq!(store.len(), n);
    assert_eq!(store.find("extra.77777").map(|id| id.0), Some(77_777));
    assert!(store.find("extra.100000").is_none());
    let e = store.add("extra.5", t.clone(), true).unwrap_err().to_string();
    assert!(e.contains("extra.5") && e.contains("twice"), "{e}");
    assert_eq!(store.get(store.id("extra.5").unwrap()).name, "extra.5");
}
