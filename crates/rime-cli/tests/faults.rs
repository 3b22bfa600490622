//! Fault injection through the `rime` binary: SIGKILL at random points of a training run and a crash between
//! the two renames of a checkpoint commit (`RIME_TEST_CRASH_AT`), each resumed to the end and compared with a
//! straight run (adapter within 1e-5, the logged losses and evaluations too); a full disk (a small tmpfs,
//! root only) while checkpointing; and stdout closed or full.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{checkpoint_diff, model, rime, tmp, write_labelled};

/// 32 rows, batch 8: 4 steps an epoch, 2 epochs.
fn train_cmd(m: &Path, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = rime();
    c.args(["train", "--model", m.to_str().unwrap(), "--train", data.to_str().unwrap(), "--eval"])
        .arg(data)
        .args(["--batch-size", "8", "--max-length", "16", "--lr", "5e-3", "--epochs", "2", "--out"])
        .arg(out)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn wait_out(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

fn jsonl(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The run's results equal the straight run's: the best adapter and the checkpoint within 1e-5, every step
/// logged once with the same loss, the same evaluations in metrics.json's history.
fn assert_same_run(straight: &Path, other: &Path) {
    let diff = checkpoint_diff(straight, other);
    assert!(diff < 1e-5, "checkpoint differs from the straight run by {diff}");
    let best = |d: &Path| {
        let ad = rime_io::peft::PeftAdapter::load(d.join("best")).unwrap();
        let mut t: Vec<(String, Vec<f32>)> = ad.tensors.into_iter().map(|t| (t.name, t.data)).collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    for ((na, a), (nb, b)) in best(straight).iter().zip(&best(other)) {
        assert_eq!(na, nb);
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "best/{na} differs by {worst}");
    }
    let (la, lb) = (jsonl(straight), jsonl(other));
    let steps = |l: &[serde_json::Value]| l.iter().filter_map(|v| v["step"].as_u64()).collect::<Vec<_>>();
    assert_eq!(steps(&la), steps(&lb), "the same log lines, each once");
    for (a, b) in la.iter().zip(&lb) {
        for k in ["loss", "eval_accuracy", "eval_loss"] {
            if let (Some(x), Some(y)) = (a[k].as_f64(), b[k].as_f64()) {
                assert!((x - y).abs() < 1e-5, "{k}: {a} vs {b}");
            }
        }
    }
    let metrics = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("metrics.json")).unwrap()).unwrap()
    };
    let (ma, mb) = (metrics(straight), metrics(other));
    for k in ["steps", "best_epoch", "eval_accuracy"] {
        assert_eq!(ma[k], mb[k], "{k}");
    }
    assert!((ma["eval_loss"].as_f64().unwrap() - mb["eval_loss"].as_f64().unwrap()).abs() < 1e-5);
    assert_eq!(ma["history"].as_array().unwrap().len(), mb["history"].as_array().unwrap().len(), "{mb}");
}

/// A seed from the clock (printed, so a failure can be replayed with RIME_TEST_SEED).
fn seed() -> u64 {
    let s = std::env::var("RIME_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    eprintln!("RIME_TEST_SEED={s}");
    s
}

fn next(s: &mut u64) -> u64 {
    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *s >> 33
}

/// SIGKILL a run at two random moments (of the first run, then of its resume), then resume to the end: the
/// results equal a straight run's. A crash between the two renames of the first checkpoint commit, taken
/// after the last step of epoch 0 and before its evaluation, resumes from the staged checkpoint and runs the
/// missed evaluation.
#[test]
fn killed_runs_resume_to_the_straight_result() {
    let Some(m) = model() else { return };
    let d = tmp("kill");
    let data = d.join("d.jsonl");
    write_labelled(&data, 32, "lovely fresh and tasty", "broken seal, stale");
    let straight = d.join("straight");
    let t = Instant::now();
    let o = wait_out(train_cmd(&m, &data, &straight, &["--save-every", "2"]).spawn().unwrap());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = t.elapsed();

    // Crash between the renames of the second commit: the checkpoint at step 4 (epoch 0's last step, before
    // its evaluation) is staged whole, the one at step 2 moved aside, none under `checkpoint/`.
    let crashed = d.join("crashed");
    let o = wait_out(
        train_cmd(&m, &data, &crashed, &["--save-every", "2"])
            .env("RIME_TEST_CRASH_AT", "checkpoint-commit:2")
            .spawn()
            .unwrap(),
    );
    assert!(!o.status.success(), "the crash hook fired");
    assert!(crashed.join("checkpoint.tmp/COMPLETE").exists() && crashed.join("checkpoint.old").exists());
    assert!(!crashed.join("checkpoint").exists());
    let o = wait_out(train_cmd(&m, &data, &crashed, &["--save-every", "2", "--resume"]).spawn().unwrap());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("at step 4") && err.contains("epoch 0: eval"), "{err}");
    assert_same_run(&straight, &crashed);

    let mut s = seed();
    let killed = d.join("killed");
    let mut kills = 0;
    for round in 0..8 {
        let extra: &[&str] = if round == 0 { &["--save-every", "2"] } else { &["--save-every", "2", "--resume"] };
        let mut child = train_cmd(&m, &data, &killed, extra).spawn().unwrap();
        if kills < 2 {
            // Anywhere from loading the model to the last evaluation.
            let at = Duration::from_millis(next(&mut s) % full.as_millis().max(1) as u64);
            std::thread::sleep(at);
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                eprintln!("killed after {at:?}");
            }
            kills += 1;
            wait_out(child);
            continue;
        }
        let o = wait_out(child);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() || err.contains("finished"), "{err}");
        break;
    }
    assert_same_run(&straight, &killed);
    std::fs::remove_dir_all(&d).ok();
}

/// A full disk while checkpointing: a clear error that names the disk's complaint, the previous checkpoint
/// kept whole, no partial checkpoint.tmp. Needs root for the tmpfs (CI runs as root).
#[test]
fn full_disk_during_a_checkpoint_keeps_the_previous_one() {
    let Some(m) = model() else { return };
    let d = tmp("full");
    let data = d.join("d.jsonl");
    write_labelled(&data, 32, "crunchy and sweet", "soggy, mouldy");
    let mnt = d.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    // One checkpoint (adapter + Adam moments) takes about 0.9 MB here: 1.5 MB holds one, not a second staged
    // beside it.
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1500k", "tmpfs"]).arg(&mnt).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: full_disk_during_a_checkpoint_keeps_the_previous_one needs root to mount a tmpfs");
        std::fs::remove_dir_all(&d).ok();
        return;
    }
    let out = mnt.join("run");
    let o = wait_out(train_cmd(&m, &data, &out, &["--save-every", "1"]).spawn().unwrap());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let state = std::fs::read_to_string(out.join("checkpoint/state.json"));
    let leftover = out.join("checkpoint.tmp").exists();
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(!o.status.success(), "the disk filled up: {err}");
    assert!(err.contains("No space left") && err.contains("previous checkpoint"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(state.is_ok_and(|s| s.contains("global_step")), "the previous checkpoint is kept");
    assert!(!leftover, "no partial checkpoint.tmp is left");
    std::fs::remove_dir_all(&d).ok();
}

/// stdout closed early (a pipe into `head -c1`) ends quietly with status 0; a full stdout (/dev/full) is an
/// error message and status 1; neither panics. A non-empty --out is refused without --force.
#[test]
fn closed_or_full_stdout_never_panics_and_out_is_not_replaced() {
    let Some(m) = model() else { return };
    let mut child = rime()
        .args(["inspect", m.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is written
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let o = rime().args(["inspect", m.to_str().unwrap()]).stdout(full).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("writing to stdout") && !err.contains("panicked"), "{err}");
    }
    // A full stderr loses the messages, nothing else: the refusal's status, not a panic's 101.
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let o = rime()
            .args(["train", "--model", m.to_str().unwrap(), "--batch-size", "0", "--out"])
            .arg(std::env::temp_dir().join(format!("rime-faults-{}-never", std::process::id())))
            .stderr(full)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
    }
    let d = tmp("force");
    let data = d.join("d.jsonl");
    write_labelled(&data, 8, "crunchy", "soggy");
    let out: PathBuf = d.join("run");
    std::fs::create_dir_all(out.join("best")).unwrap();
    std::fs::write(out.join("best/notes.txt"), "mine").unwrap();
    let o = wait_out(train_cmd(&m, &data, &out, &[]).spawn().unwrap());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--force") && err.contains("--resume"), "{err}");
    assert!(out.join("best/notes.txt").exists());
    std::fs::remove_dir_all(&d).ok();
}
