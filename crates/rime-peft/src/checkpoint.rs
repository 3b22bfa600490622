//! The run's checkpoint folder and its crash-safe commit, the counters it records, and the output folder's
//! rules (refused when it holds something unless resuming or overwriting; cleaned after a failed run).
//!
//! A checkpoint is written into `checkpoint.tmp/` (adapter, optimizer state, `state.json`), every file synced,
//! then a `COMPLETE` marker written and synced. The commit renames `checkpoint/` to `checkpoint.old/`, the
//! complete `checkpoint.tmp/` to `checkpoint/`, and deletes `checkpoint.old/`. A crash at any point leaves at
//! least one complete checkpoint among the three names; [`recover`] picks the newest complete one (by
//! `global_step`) and puts it back under `checkpoint/`. A failed write (a full disk) removes its partial
//! `checkpoint.tmp/` and leaves the previous checkpoint as it was.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::trainer::{io_err, Evaluation};
use crate::{Error, Result};

/// The committed checkpoint's folder name.
pub const CHECKPOINT: &str = "checkpoint";
const TMP: &str = "checkpoint.tmp";
const OLD: &str = "checkpoint.old";
const COMPLETE: &str = "COMPLETE";
const STATE: &str = "state.json";

/// Everything a run writes into its output folder (removed with `overwrite`, and after a failure that left
/// no checkpoint).
pub(crate) const OUTPUTS: &[&str] = &[
    "best",
    "adapter",
    "best.tmp-write",
    "adapter.tmp-write",
    "best.old-write",
    "adapter.old-write",
    CHECKPOINT,
    TMP,
    OLD,
    "metrics.jsonl",
    "metrics.json",
    "metrics.tmp",
    "training.png",
    "training.svg",
    "training.tmp.png",
    "training.tmp.svg",
];

/// The counters of a run recorded with each checkpoint (`state.json`).
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    pub global_step: usize,
    /// The best score so far (None before the first evaluation).
    pub best_score: Option<f64>,
    pub best_epoch: Option<usize>,
    /// The step at which the last epoch end (evaluation, best adapter, patience) ran; None before the first.
    pub eval_step: Option<usize>,
    pub patience_left: Option<usize>,
    pub stopped_early: bool,
    /// Bytes of `metrics.jsonl` that belong to the checkpointed steps.
    pub log_bytes: u64,
    pub history: Vec<Value>,
    pub best: Option<Evaluation>,
    pub last: Option<Evaluation>,
}

impl State {
    /// `state.json`; `metric` names the best score's field (`best_accuracy`, `best_eval_loss`).
    pub fn to_json(&self, metric: &str) -> Value {
        let mut m = Map::new();
        m.insert("global_step".into(), json!(self.global_step));
        m.insert(format!("best_{metric}"), json!(self.best_score));
        m.insert("best_epoch".into(), json!(self.best_epoch));
        m.insert("eval_step".into(), json!(self.eval_step));
        m.insert("patience_left".into(), json!(self.patience_left));
        m.insert("stopped_early".into(), json!(self.stopped_early));
        m.insert("log_bytes".into(), json!(self.log_bytes));
        m.insert("history".into(), json!(self.history));
        m.insert("best".into(), self.best.as_ref().map_or(Value::Null, eval_to_json));
        m.insert("last".into(), self.last.as_ref().map_or(Value::Null, eval_to_json));
        Value::Object(m)
    }

    /// Read `dir/state.json`: a missing or malformed field is an error naming the file and the field.
    pub fn read(dir: &Path, metric: &str) -> Result<State> {
        let path = dir.join(STATE);
        let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| io_err(&path, format!("not JSON: {e}")))?;
        let f = Fields { v: &v, path: &path };
        Ok(State {
            global_step: f.count("global_step")?,
            best_score: f.opt_number(&format!("best_{metric}"))?,
            best_epoch: f.opt_count("best_epoch")?,
            eval_step: f.opt_count("eval_step")?,
            patience_left: f.opt_count("patience_left")?,
            stopped_early: f.get("stopped_early")?.as_bool().ok_or_else(|| f.bad("stopped_early", "true or false"))?,
            log_bytes: f.count("log_bytes")? as u64,
            history: f.get("history")?.as_array().ok_or_else(|| f.bad("history", "an array"))?.clone(),
            best: f.opt_eval("best")?,
            last: f.opt_eval("last")?,
        })
    }
}

/// The fields of a `state.json`, read strictly.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn bad(&self, field: &str, want: &str) -> Error {
        let got = self.v.get(field).map_or("missing".to_string(), |x| format!("{x}"));
        Error::Msg(format!("{}: field '{field}' is {got}; expected {want} (a damaged checkpoint)", self.path.display()))
    }

    fn get(&self, field: &str) -> Result<&Value> {
        self.v.get(field).ok_or_else(|| self.bad(field, "a value"))
    }

    fn count(&self, field: &str) -> Result<usize> {
        self.get(field)?.as_u64().map(|n| n as usize).ok_or_else(|| self.bad(field, "a whole number >= 0"))
    }

    fn opt_count(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field)? {
            Value::Null => Ok(None),
            x => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| self.bad(field, "a whole number or null")),
        }
    }

    fn opt_number(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field)? {
            Value::Null => Ok(None),
            x => x.as_f64().map(Some).ok_or_else(|| self.bad(field, "a number or null")),
        }
    }

    fn opt_eval(&self, field: &str) -> Result<Option<Evaluation>> {
        match self.get(field)? {
            Value::Null => Ok(None),
            x => eval_from_json(x).map(Some).ok_or_else(|| self.bad(field, "an evaluation or null")),
        }
    }
}

/// An evaluation as JSON (NaN, as a causal task's accuracy, is null).
fn eval_to_json(e: &Evaluation) -> Value {
    let m = &e.metrics;
    json!({
        "metrics": {"accuracy": m.accuracy, "macro_f1": m.macro_f1, "loss": m.loss, "examples": m.examples},
        "score": e.score,
        "values": e.values.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
    })
}

fn eval_from_json(v: &Value) -> Option<Evaluation> {
    let num = |x: &Value| match x {
        Value::Null => Some(f64::NAN),
        x => x.as_f64(),
    };
    let m = &v["metrics"];
    let metrics = crate::classifier::EvalMetrics {
        accuracy: num(&m["accuracy"])?,
        macro_f1: num(&m["macro_f1"])?,
        loss: num(&m["loss"])?,
        examples: m["examples"].as_u64()? as usize,
    };
    let mut values = vec![];
    for pair in v["values"].as_array()? {
        values.push((pair[0].as_str()?.to_string(), num(&pair[1])?));
    }
    Some(Evaluation { metrics, score: num(&v["score"])?, values })
}

/// Write a checkpoint of `state` into `out` crash-safely: `save` writes the adapter and optimizer state into
/// the staging folder it is given. On failure the staging folder is removed and the previous checkpoint kept.
pub(crate) fn write(out: &Path, state: &Value, save: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = out.join(TMP);
    remove(&tmp)?;
    let staged = stage(&tmp, state, save);
    if let Err(e) = staged {
        let _ = std::fs::remove_dir_all(&tmp);
        let kept = match std::fs::metadata(out.join(CHECKPOINT).join(STATE)) {
            Ok(_) => format!("the previous checkpoint in {} is kept", out.join(CHECKPOINT).display()),
            Err(_) => "there was no previous checkpoint".into(),
        };
        return Err(Error::Msg(format!("writing the checkpoint failed ({kept}; the partial one was removed): {e}")));
    }
    commit(out)
}

/// The checkpoint's files in `tmp`, synced, then the completeness marker.
fn stage(tmp: &Path, state: &Value, save: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| io_err(tmp, e))?;
    save(tmp)?;
    let path = tmp.join(STATE);
    std::fs::write(&path, serde_json::to_string_pretty(state).unwrap_or_default()).map_err(|e| io_err(&path, e))?;
    sync_tree(tmp)?;
    let marker = tmp.join(COMPLETE);
    std::fs::write(&marker, b"").map_err(|e| io_err(&marker, e))?;
    sync_path(&marker)?;
    sync_path(tmp)
}

/// Swap the complete staging folder in: checkpoint → old, tmp → checkpoint, delete old.
fn commit(out: &Path) -> Result<()> {
    let (dir, tmp, old) = (out.join(CHECKPOINT), out.join(TMP), out.join(OLD));
    remove(&old)?;
    if dir.exists() {
        std::fs::rename(&dir, &old).map_err(|e| io_err(&old, e))?;
    }
    crate::fault::point("checkpoint-commit");
    std::fs::rename(&tmp, &dir).map_err(|e| io_err(&dir, e))?;
    sync_path(out)?;
    remove(&old)
}

/// Whether `dir` holds a checkpoint that was written to the end: `checkpoint/` and `checkpoint.old/` only ever
/// hold complete ones (they are renamed from a complete staging folder); `checkpoint.tmp/` needs its marker.
fn complete(dir: &Path, staging: bool) -> bool {
    dir.join(STATE).is_file() && (!staging || dir.join(COMPLETE).is_file())
}

/// After a crash: the newest complete checkpoint among `checkpoint/`, `checkpoint.tmp/` and `checkpoint.old/`
/// back under `checkpoint/`, the others removed. Returns `checkpoint/` when there is one.
pub(crate) fn recover(out: &Path, metric: &str) -> Result<Option<PathBuf>> {
    let mut best: Option<(usize, &str)> = None;
    for (name, staging) in [(CHECKPOINT, false), (TMP, true), (OLD, false)] {
        let dir = out.join(name);
        if complete(&dir, staging) {
            let step = State::read(&dir, metric)?.global_step;
            if best.is_none_or(|(s, _)| step > s) {
                best = Some((step, name));
            }
        }
    }
    let Some((_, chosen)) = best else {
        remove(&out.join(TMP))?;
        return Ok(None);
    };
    let dir = out.join(CHECKPOINT);
    if chosen != CHECKPOINT {
        remove(&dir)?;
        std::fs::rename(out.join(chosen), &dir).map_err(|e| io_err(&dir, e))?;
        sync_path(out)?;
    }
    remove(&out.join(TMP))?;
    remove(&out.join(OLD))?;
    Ok(Some(dir))
}

/// After a crash inside [`replace_dir`] of `dir` (the best adapter): put the old folder back when the new one
/// never arrived, and drop the leftovers.
pub(crate) fn recover_dir(dir: &Path) -> Result<()> {
    let old = dir.with_extension("old-write");
    if !dir.exists() && old.exists() {
        std::fs::rename(&old, dir).map_err(|e| io_err(dir, e))?;
    }
    remove(&old)?;
    remove(&dir.with_extension("tmp-write"))
}

/// Whether `out` holds a committed checkpoint (a failed run then leaves its files for a resume).
pub(crate) fn has_checkpoint(out: &Path) -> bool {
    complete(&out.join(CHECKPOINT), false) || complete(&out.join(TMP), true) || complete(&out.join(OLD), false)
}

/// Refuse an output folder that holds anything, unless the run resumes it or may overwrite it.
pub(crate) fn check_output(out: &Path, resume: bool, overwrite: bool) -> Result<()> {
    if resume || overwrite {
        return Ok(());
    }
    match std::fs::read_dir(out).map(|mut entries| entries.next().is_none()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::OutputExists { path: out.to_path_buf() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) if out.exists() => Err(Error::OutputExists { path: out.to_path_buf() }),
        Err(e) => Err(io_err(out, e)),
    }
}

/// Remove a run's files from `out` (what [`OUTPUTS`] names; nothing else).
pub(crate) fn clear_outputs(out: &Path) -> Result<()> {
    for name in OUTPUTS {
        remove(&out.join(name))?;
    }
    Ok(())
}

/// A failed run: with no checkpoint to resume from, nothing of the run is left (its files, and the folder when
/// the run created it and it is empty). With a checkpoint, its files stay for a resume.
pub(crate) fn clean_after_failure(out: &Path, created: bool) {
    if has_checkpoint(out) {
        return;
    }
    let _ = clear_outputs(out);
    if created {
        let _ = std::fs::remove_dir(out); // only when empty
    }
}

/// Put the complete folder `tmp` in place of `dir` so that a crash at any point leaves one of them whole:
/// `dir` moves aside to `<dir>.old-write` first, and is deleted after `tmp` is renamed in.
pub(crate) fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let old = dir.with_extension("old-write");
    remove(&old)?;
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| io_err(&old, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| io_err(dir, e))?;
    remove(&old)
}

pub(crate) fn remove(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(|e| io_err(p, e)),
        Ok(_) => std::fs::remove_file(p).map_err(|e| io_err(p, e)),
        Err(_) => Ok(()),
    }
}

/// fsync a file or a folder (a folder's entries: the renames into it).
fn sync_path(p: &Path) -> Result<()> {
    std::fs::File::open(p).and_then(|f| f.sync_all()).map_err(|e| io_err(p, e))
}

/// fsync every file under `dir`.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let p = entry.map_err(|e| io_err(dir, e))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        }
        sync_path(&p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rime-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn state(step: usize) -> Value {
        State { global_step: step, eval_step: Some(step / 4 * 4), ..State::default() }.to_json("accuracy")
    }

    fn save_marker(step: usize) -> impl FnOnce(&Path) -> Result<()> {
        move |dir: &Path| std::fs::write(dir.join("data"), step.to_string()).map_err(|e| io_err(dir, e))
    }

    fn step_of(dir: &Path) -> usize {
        State::read(dir, "accuracy").unwrap().global_step
    }

    #[test]
    fn commits_and_a_crash_between_the_renames_keeps_the_newest() {
        let out = tmp("commit");
        write(&out, &state(2), save_marker(2)).unwrap();
        write(&out, &state(4), save_marker(4)).unwrap();
        assert_eq!(step_of(&out.join(CHECKPOINT)), 4);
        assert!(!out.join(TMP).exists() && !out.join(OLD).exists());
        // A crash after `checkpoint` → `checkpoint.old` and before `checkpoint.tmp` → `checkpoint`.
        std::fs::rename(out.join(CHECKPOINT), out.join(OLD)).unwrap();
        stage(&out.join(TMP), &state(6), save_marker(6)).unwrap();
        let dir = recover(&out, "accuracy").unwrap().unwrap();
        assert_eq!(step_of(&dir), 6, "the complete staged checkpoint is the newest");
        assert_eq!(std::fs::read_to_string(dir.join("data")).unwrap(), "6");
        assert!(!out.join(TMP).exists() && !out.join(OLD).exists());
        // A staged checkpoint without its marker (killed while writing) is not taken.
        stage(&out.join(TMP), &state(8), save_marker(8)).unwrap();
        std::fs::remove_file(out.join(TMP).join(COMPLETE)).unwrap();
        assert_eq!(step_of(&recover(&out, "accuracy").unwrap().unwrap()), 6);
        assert!(!out.join(TMP).exists(), "the incomplete one is removed");
        // Crashed before the first commit's second rename: only the old one is left.
        std::fs::rename(out.join(CHECKPOINT), out.join(OLD)).unwrap();
        assert_eq!(step_of(&recover(&out, "accuracy").unwrap().unwrap()), 6);
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn a_failed_write_removes_its_staging_and_keeps_the_previous() {
        let out = tmp("fail");
        write(&out, &state(2), save_marker(2)).unwrap();
        let e = write(&out, &state(4), |dir| {
            std::fs::write(dir.join("half"), "x").unwrap();
            Err(Error::Msg("No space left on device".into()))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("previous checkpoint") && e.contains("No space left"), "{e}");
        assert!(!out.join(TMP).exists(), "no partial checkpoint.tmp is left");
        assert_eq!(step_of(&out.join(CHECKPOINT)), 2);
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn damaged_state_names_the_file_and_field() {
        let out = tmp("state");
        let dir = out.join(CHECKPOINT);
        std::fs::create_dir_all(&dir).unwrap();
        let good = state(3);
        for (field, bad) in
            [("global_step", json!("many")), ("eval_step", json!(-1)), ("history", json!(3)), ("best", json!(1))]
        {
            let mut v = good.clone();
            v[field] = bad;
            std::fs::write(dir.join(STATE), v.to_string()).unwrap();
            let e = State::read(&dir, "accuracy").unwrap_err().to_string();
            assert!(e.contains("state.json") && e.contains(&format!("'{field}'")), "{e}");
        }
        let mut v = good.clone();
        v.as_object_mut().unwrap().remove("log_bytes");
        std::fs::write(dir.join(STATE), v.to_string()).unwrap();
        let e = State::read(&dir, "accuracy").unwrap_err().to_string();
        assert!(e.contains("'log_bytes' is missing"), "{e}");
        std::fs::write(dir.join(STATE), "{").unwrap();
        assert!(State::read(&dir, "accuracy").unwrap_err().to_string().contains("not JSON"));
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn evaluations_round_trip_with_nan() {
        let ev = Evaluation {
            metrics: crate::classifier::EvalMetrics { accuracy: f64::NAN, macro_f1: 0.5, loss: 1.25, examples: 3 },
            score: 1.25,
            values: vec![("eval_loss".into(), 1.25)],
        };
        let back = eval_from_json(&eval_to_json(&ev)).unwrap();
        assert!(back.metrics.accuracy.is_nan());
        assert_eq!((back.metrics.loss, back.score, back.values), (1.25, 1.25, ev.values));
    }

    #[test]
    fn output_folder_rules() {
        let out = tmp("out");
        check_output(&out, false, false).unwrap(); // empty
        check_output(&out.join("new"), false, false).unwrap(); // missing
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        assert!(matches!(check_output(&out, false, false), Err(Error::OutputExists { .. })));
        check_output(&out, true, false).unwrap();
        check_output(&out, false, true).unwrap();
        std::fs::create_dir_all(out.join("best")).unwrap();
        std::fs::write(out.join("metrics.jsonl"), "{}").unwrap();
        clean_after_failure(&out, true);
        assert!(out.join("notes.txt").exists(), "only the run's own files are removed");
        assert!(!out.join("best").exists() && !out.join("metrics.jsonl").exists());
        std::fs::remove_file(out.join("notes.txt")).unwrap();
        clean_after_failure(&out, true);
        assert!(!out.exists(), "a folder the run created is removed when empty");
    }

    #[test]
    fn replace_dir_recovers_from_a_crash_between_its_renames() {
        let out = tmp("replace");
        let (dir, tmpd) = (out.join("best"), out.join("best.tmp-write"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("v"), "1").unwrap();
        std::fs::create_dir_all(&tmpd).unwrap();
        std::fs::write(tmpd.join("v"), "2").unwrap();
        replace_dir(&tmpd, &dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("v")).unwrap(), "2");
        std::fs::rename(&dir, dir.with_extension("old-write")).unwrap(); // crashed before the second rename
        recover_dir(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("v")).unwrap(), "2");
        std::fs::remove_dir_all(&out).unwrap();
    }
}
