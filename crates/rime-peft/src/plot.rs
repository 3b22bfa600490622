//! A small PNG plot of the training curves (loss per step in blue, eval accuracy per epoch in orange,
//! both scaled to the frame; runs without accuracy (causal LM) put the eval loss per epoch in orange on the
//! loss scale), drawn without a plotting library's font dependencies.

use std::path::Path;

pub fn write_plot(jsonl: &Path, png: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(jsonl).map_err(|e| e.to_string())?;
    let mut losses = vec![];
    let mut accs = vec![];
    let mut eval_losses = vec![];
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        if let Some(l) = v["loss"].as_f64() {
            losses.push((v["step"].as_f64().unwrap_or(0.0), l));
        }
        if let Some(a) = v["eval_accuracy"].as_f64() {
            accs.push((v["step"].as_f64().unwrap_or(0.0), a));
        } else if let Some(l) = v["eval_loss"].as_f64() {
            eval_losses.push((v["step"].as_f64().unwrap_or(0.0), l));
        }
    }
    let (w, h) = (800usize, 400usize);
    let mut img = vec![255u8; w * h * 3];
    let max_step = losses.iter().chain(accs.iter()).map(|p| p.0).fold(1.0, f64::max);
    let max_loss = losses.iter().chain(eval_losses.iter()).map(|p| p.1).fold(1e-9, f64::max);
    // Accuracy is drawn on [0, 1]; eval losses on the loss scale.
    let mut dots: Vec<(f64, f64)> = accs.clone();
    dots.extend(eval_losses.iter().map(|&(s, l)| (s, l / max_loss)));
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < w && y < h {
            img[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    for x in 0..w {
        put(x, h - 20, [0, 0, 0]);
    }
    for y in 0..h {
        put(40, y, [0, 0, 0]);
    }
    let to_px = |s: f64, v: f64, vmax: f64| {
        let x = 40.0 + (s / max_step) * (w as f64 - 50.0);
        let y = (h as f64 - 20.0) - (v / vmax) * (h as f64 - 30.0);
        (x as usize, y.max(0.0) as usize)
    };
    for win in losses.windows(2) {
        let (a, b) = (to_px(win[0].0, win[0].1, max_loss), to_px(win[1].0, win[1].1, max_loss));
        line(&mut put, a, b, [31, 119, 180]);
    }
    for (s, a) in &dots {
        let (x, y) = to_px(*s, *a, 1.0);
        for dx in 0..7 {
            for dy in 0..7 {
                put(x + dx - 3.min(x), y + dy - 3.min(y), [255, 127, 14]);
            }
        }
    }
    let file = std::fs::File::create(png).map_err(|e| e.to_string())?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().map_err(|e| e.to_string())?;
    wr.write_image_data(&img).map_err(|e| e.to_string())
}

fn line(put: &mut impl FnMut(usize, usize, [u8; 3]), a: (usize, usize), b: (usize, usize), c: [u8; 3]) {
    let (x0, y0, x1, y1) = (a.0 as i64, a.1 as i64, b.0 as i64, b.1 as i64);
    let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
    for i in 0..=n {
        let x = x0 + (x1 - x0) * i / n;
        let y = y0 + (y1 - y0) * i / n;
        put(x as usize, y as usize, c);
        put(x as usize, (y + 1) as usize, c);
    }
}
