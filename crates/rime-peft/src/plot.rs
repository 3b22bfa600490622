//! The training plot, drawn with `plotters` as `training.png` and `training.svg`: the loss per step (faint)
//! with an exponentially smoothed line, the eval metric per epoch on its own right-hand axis (accuracy, or
//! the eval loss for tasks without accuracy), the learning rate in a panel below, labelled axes, a legend and
//! a title naming model, method and data. Text is drawn with DejaVu Sans (bundled, see
//! `assets/DejaVuSans-LICENSE.txt`), so no system font is needed.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::{Error, Result};

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 640);

/// The curves of a run, read from its log (`metrics.jsonl` lines).
#[derive(Debug, Clone, Default)]
pub struct Curves {
    /// (step, loss, learning rate)
    pub steps: Vec<(f64, f64, f64)>,
    /// (step, value) of each evaluation.
    pub evals: Vec<(f64, f64)>,
    /// What `evals` holds: `eval accuracy`, `eval MRR` or `eval loss`.
    pub eval_name: &'static str,
}

impl Curves {
    pub fn from_log(log: &[Value]) -> Curves {
        let has_acc = log.iter().any(|v| v["eval_accuracy"].is_number());
        let has_mrr = log.iter().any(|v| v["eval_mrr"].is_number());
        let (key, eval_name) = if has_acc {
            ("eval_accuracy", "eval accuracy")
        } else if has_mrr {
            ("eval_mrr", "eval MRR") // the embedding task's retrieval MRR at the full dim
        } else {
            ("eval_loss", "eval loss")
        };
        let mut c = Curves { eval_name, ..Curves::default() };
        for v in log {
            let step = v["step"].as_f64().unwrap_or(0.0);
            if let Some(l) = v["loss"].as_f64() {
                c.steps.push((step, l, v["lr"].as_f64().unwrap_or(0.0)));
            } else if let Some(e) = v[key].as_f64() {
                c.evals.push((step, e));
            }
        }
        c
    }

    /// The loss smoothed by a debiased exponential moving average (as TensorBoard's smoothing), heavier for
    /// longer runs.
    pub fn smoothed(&self) -> Vec<(f64, f64)> {
        let w = (1.0 - 10.0 / self.steps.len().max(1) as f64).clamp(0.0, 0.95);
        let mut ema = 0.0;
        self.steps
            .iter()
            .enumerate()
            .map(|(i, &(s, l, _))| {
                ema = w * ema + (1.0 - w) * l;
                (s, ema / (1.0 - w.powi(i as i32 + 1)).max(1e-12))
            })
            .collect()
    }
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // The bundled font parses; a failure would only leave the plot without text.
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).ok();
    });
}

/// Write `training.png` and `training.svg` of the run logged in `log` into `dir` (each written beside its
/// place, then renamed).
pub fn write_plots(log: &[Value], title: &str, dir: &Path) -> Result<()> {
    register_font();
    let c = Curves::from_log(log);
    let err = |p: &Path, e: String| Error::Msg(format!("{}: cannot draw the plot: {e}", p.display()));
    let png = dir.join("training.png");
    let tmp = dir.join("training.tmp.png");
    draw(BitMapBackend::new(&tmp, SIZE).into_drawing_area(), &c, title).map_err(|e| err(&png, e))?;
    std::fs::rename(&tmp, &png).map_err(|e| err(&png, e.to_string()))?;
    let svg = dir.join("training.svg");
    let tmp = dir.join("training.tmp.svg");
    draw(SVGBackend::new(&tmp, SIZE).into_drawing_area(), &c, title).map_err(|e| err(&svg, e))?;
    std::fs::rename(&tmp, &svg).map_err(|e| err(&svg, e.to_string()))
}

/// [`write_plots`] from a `metrics.jsonl` file.
pub fn write_plots_from_jsonl(jsonl: &Path, title: &str, dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(jsonl).map_err(|e| Error::Msg(format!("{}: {e}", jsonl.display())))?;
    let log: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    write_plots(&log, title, dir)
}

fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        vals.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &Curves, title: &str) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, (FONT, 24)).map_err(e)?;
    let (top, bottom) = root.split_vertically((72).percent_height());
    let max_step = c.steps.iter().map(|s| s.0).chain(c.evals.iter().map(|s| s.0)).fold(1.0, f64::max);
    let (lo, hi) = range(c.steps.iter().map(|s| s.1));
    let (elo, ehi) = if c.eval_name == "eval accuracy" { (0.0, 1.0) } else { range(c.evals.iter().map(|s| s.1)) };
    let mut chart = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .right_y_label_area_size(64)
        .build_cartesian_2d(0f64..max_step, lo.min(0.0)..hi)
        .map_err(e)?
        .set_secondary_coord(0f64..max_step, elo..ehi);
    chart
        .configure_mesh()
        .max_light_lines(4)
        .x_desc("step")
        .y_desc("training loss")
        .label_style((FONT, 14))
        .draw()
        .map_err(e)?;
    chart.configure_secondary_axes().y_desc(c.eval_name).label_style((FONT, 14)).draw().map_err(e)?;
    let raw = c.steps.iter().map(|s| (s.0, s.1));
    chart
        .draw_series(LineSeries::new(raw, BLUE.mix(0.3)))
        .map_err(e)?
        .label("loss per step")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.mix(0.3)));
    chart
        .draw_series(LineSeries::new(c.smoothed(), BLUE.stroke_width(2)))
        .map_err(e)?
        .label("loss (smoothed)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(c.evals.iter().copied(), ORANGE.stroke_width(2)))
        .map_err(e)?
        .label(format!("{} (per epoch)", c.eval_name))
        .legend(|(x, y)| Circle::new((x + 10, y), 4, ORANGE.filled()));
    chart.draw_secondary_series(c.evals.iter().map(|&p| Circle::new(p, 5, ORANGE.filled()))).map_err(e)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(e)?;
    let (_, lr_hi) = range(c.steps.iter().map(|s| s.2));
    // The right margin stands in for the upper chart's right axis, so the step axes line up.
    let mut lr = ChartBuilder::on(&bottom)
        .margin(12)
        .margin_right(12 + 64)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_step, 0f64..lr_hi.max(1e-12))
        .map_err(e)?;
    lr.configure_mesh()
        .max_light_lines(4)
        .x_desc("step")
        .y_desc("learning rate")
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style((FONT, 14))
        .draw()
        .map_err(e)?;
    lr.draw_series(LineSeries::new(c.steps.iter().map(|s| (s.0, s.2)), GREEN.stroke_width(2))).map_err(e)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> Vec<Value> {
        let mut v: Vec<Value> = (0..40)
            .map(|s| serde_json::json!({"step": s, "epoch": s / 20, "loss": 1.0 / (1.0 + s as f64), "lr": 1e-3}))
            .collect();
        v.push(serde_json::json!({"epoch": 0, "step": 20, "eval_accuracy": 0.7, "eval_loss": 0.6}));
        v.push(serde_json::json!({"epoch": 1, "step": 40, "eval_accuracy": 0.8, "eval_loss": 0.5}));
        v
    }

    #[test]
    fn curves_pick_accuracy_when_logged_and_smoothing_starts_at_the_first_loss() {
        let c = Curves::from_log(&log());
        assert_eq!((c.steps.len(), c.evals.len(), c.eval_name), (40, 2, "eval accuracy"));
        assert_eq!(c.evals[1], (40.0, 0.8));
        let s = c.smoothed();
        assert!((s[0].1 - 1.0).abs() < 1e-9, "debiased EMA starts at the first value: {}", s[0].1);
        assert!(s[39].1 > c.steps[39].1, "the smoothed line lags a falling loss");
        let lm = Curves::from_log(&[serde_json::json!({"epoch": 0, "step": 3, "eval_loss": 2.0})]);
        assert_eq!((lm.eval_name, lm.evals.len()), ("eval loss", 1));
    }

    /// Both files are written and hold text: the SVG its labels, the PNG dark pixels in the title strip
    /// (which holds nothing but the title), so a font that fails to load fails this test.
    #[test]
    fn png_and_svg_have_labels_and_a_title() {
        let dir = std::env::temp_dir().join(format!("rime-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_plots(&log(), "all-minilm-l6-v2 · lora · train.jsonl", &dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("training.svg")).unwrap();
        for want in ["training loss", "eval accuracy", "learning rate", "loss (smoothed)", "all-minilm-l6-v2"] {
            assert!(svg.contains(want), "training.svg lacks '{want}'");
        }
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(dir.join("training.png")).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        let ch = info.color_type.samples();
        let row = info.width as usize * ch;
        let dark = buf[..row * 28].chunks(ch).filter(|p| p[..3].iter().all(|&x| x < 100)).count();
        assert!(dark > 200, "the title strip has {dark} dark pixels: no text was drawn");
        std::fs::remove_dir_all(&dir).ok();
    }
}
