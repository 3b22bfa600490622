//! Issue #13 for merges: non-finite outputs and overflowing parameters refused by name with nothing written,
//! out-of-range slerp `t`, unknown keys, an output that is one of the inputs, and the recovery from killed merges
//! (stale staging folders removed, a backup of the previous output restored), plus folding a classification
//! adapter (its head written beside the model).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rime_io::{AdapterConfig, AdapterTensor, Checkpoint, PeftAdapter};
use rime_kernels::{Device, DeviceOptions};
use rime_merge::{combine_lora, fold_lora, merge, parse_size, Combination, CombineOptions, MergeConfig, MergeOptions};

fn dev() -> &'static Device {
    static D: OnceLock<Device> = OnceLock::new();
    D.get_or_init(|| Device::new(&DeviceOptions::default()).expect("a wgpu adapter (lavapipe on CPU machines)"))
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rime-merge-checks-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A model folder with `emb.weight` [3, 4] = `fill(i)` and `q.weight` [4, 4] (ones).
fn write_model(dir: &Path, fill: impl Fn(usize) -> f32) {
    std::fs::create_dir_all(dir).unwrap();
    let emb: Vec<f32> = (0..12).map(&fill).collect();
    let q = vec![1.0f32; 16];
    let t: Vec<(String, Vec<usize>, &[f32])> =
        vec![("emb.weight".into(), vec![3, 4], &emb), ("q.weight".into(), vec![4, 4], &q)];
    rime_io::write_safetensors(dir.join("model.safetensors"), &t, &BTreeMap::new()).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
}

fn setup(tag: &str) -> PathBuf {
    let d = tmpdir(tag);
    write_model(&d.join("m0"), |i| i as f32 * 0.1);
    write_model(&d.join("m1"), |i| 1.0 - i as f32 * 0.05);
    d
}

fn run(d: &Path, yaml: &str, out: &Path, force: bool) -> rime_merge::Result<rime_merge::MergeReport> {
    let p = d.join("cfg.yaml");
    std::fs::write(&p, yaml).unwrap();
    let cfg = MergeConfig::from_file(&p)?;
    merge(dev(), &cfg, out, &MergeOptions { force, ..MergeOptions::default() })
}

fn leftovers(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("rime-merge-"))
        .collect()
}

/// The merge fails naming every needle; neither the output nor a staging folder is left.
fn refused(d: &Path, yaml: &str, needles: &[&str]) {
    let out = d.join("out");
    let e = run(d, yaml, &out, false).expect_err(yaml).to_string();
    for n in needles {
        assert!(e.contains(n), "error `{e}` should name `{n}`");
    }
    assert!(!out.exists(), "{e}: output written");
    assert!(leftovers(d).is_empty(), "{e}: staging left: {:?}", leftovers(d));
}

#[test]
fn non_finite_outputs_and_overflowing_parameters_are_refused() {
    let d = setup("finite");
    // 1e39 is finite in f64 but Inf in f32, where the merge computes.
    refused(&d, "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1e39}\n", &["weight", "1e39"]);
    refused(
        &d,
        "merge_method: task_arithmetic\nbase_model: m0\nmodels: [m1]\nparameters: {lambda: -1e39}\n",
        &["lambda"],
    );
    // Finite weights whose result overflows: the output tensor is refused by name.
    refused(
        &d,
        "merge_method: linear\nparameters: {normalize: false}\nmodels:\n  - model: m0\n    parameters: {weight: 3e38}\n  \
         - model: m1\n    parameters: {weight: 3e38}\n",
        &["emb.weight", "non-finite"],
    );
    // A NaN in an input propagates and is caught on the way out.
    write_model(&d.join("nan"), |i| if i == 5 { f32::NAN } else { 0.5 });
    refused(&d, "merge_method: linear\nmodels: [m0, nan]\n", &["emb.weight", "1 non-finite", "flat index 5"]);
    // slerp's t is an interpolation weight.
    refused(&d, "merge_method: slerp\nbase_model: m0\nmodels: [m1]\nparameters: {t: 1.5}\n", &["`t`", "1.5", "[0, 1]"]);
    refused(&d, "merge_method: slerp\nbase_model: m0\nmodels: [m1]\nparameters: {t: -0.1}\n", &["-0.1", "[0, 1]"]);
    // Unknown keys of a filter entry.
    refused(
        &d,
        "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: [{filter: emb, valeu: 2}, {value: 1}]}\n",
        &["valeu"],
    );
    // greedy_soup / atlas counts are not silently clamped.
    for (k, v) in [("batch_size", "0"), ("max_length", "3"), ("steps", "-2"), ("lr", "0"), ("examples", "1.5")] {
        let y = format!("merge_method: atlas\nbase_model: m0\nmodels: [m1]\nparameters: {{{k}: {v}}}\n");
        refused(&d, &y, &[&format!("`{k}`"), v]);
    }
    // A config built in code goes through the same checks.
    let mut cfg = MergeConfig::from_yaml_str(
        "merge_method: slerp\nbase_model: m0\nmodels: [m1]\nparameters: {t: 0.5}\n",
        &d.join("c.yaml"),
    )
    .unwrap();
    cfg.t = Some(rime_merge::Param::Num(2.0));
    let e = merge(dev(), &cfg, &d.join("out"), &MergeOptions::default()).unwrap_err().to_string();
    assert!(e.contains("[0, 1]"), "{e}");
    assert!(!d.join("out").exists());
}

#[test]
fn shard_sizes_beyond_u64_are_refused() {
    assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
    for s in ["99999999999999999999999", "18446744073709551616", "20000000000GB"] {
        let e = parse_size(s).expect_err(s).to_string();
        assert!(e.contains(s) && e.contains("larger"), "{e}");
    }
}

#[test]
fn an_output_that_is_or_holds_an_input_is_refused_even_with_force() {
    let d = setup("overlap");
    let e = run(&d, "merge_method: linear\nmodels: [m0, m1]\n", &d.join("m1"), true).unwrap_err().to_string();
    assert!(e.contains("is the input") && e.contains("m1"), "{e}");
    let e = run(&d, "merge_method: linear\nmodels: [m0, m1]\n", &d, true).unwrap_err().to_string();
    assert!(e.contains("holds the input"), "{e}");
    // The input is intact.
    let c = Checkpoint::open(d.join("m1")).unwrap();
    assert_eq!(c.get_f32("emb.weight").unwrap()[0], 1.0);
    assert!(leftovers(&d).is_empty());
}

/// A pid no process has (beyond Linux's pid_max).
const DEAD: u32 = 999_999_999;

#[test]
fn killed_merges_are_cleaned_up_and_a_lost_output_restored() {
    let d = setup("recover");
    let out = d.join("out");
    let yaml = "merge_method: linear\nmodels: [m0, m1]\n";
    // A staging folder of a killed merge is removed, and the report says so.
    let stale = d.join(format!(".out.rime-merge-tmp-{DEAD}"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"partial").unwrap();
    let r = run(&d, yaml, &out, false).unwrap();
    assert!(!stale.exists() && r.notes.iter().any(|n| n.contains("removed") && n.contains("killed")), "{:?}", r.notes);
    // A merge killed between the two renames of a forced replace left only the backup of the old output.
    let backup = d.join(format!(".out.rime-merge-old-{DEAD}"));
    std::fs::rename(&out, &backup).unwrap();
    let e = run(&d, yaml, &out, false).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    assert!(out.join("model.safetensors").is_file() && !backup.exists(), "the previous output is restored");
    // With force, the backup is restored and then replaced; no backup remains.
    std::fs::rename(&out, &backup).unwrap();
    let r = run(&d, yaml, &out, true).unwrap();
    assert!(r.notes.iter().any(|n| n.contains("restored")), "{:?}", r.notes);
    assert!(out.join("model.safetensors").is_file());
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
    // A staging folder of a live process (pid 1 always is) is never touched.
    let other = d.join(".out.rime-merge-tmp-1");
    std::fs::create_dir_all(&other).unwrap();
    run(&d, yaml, &out, true).unwrap();
    assert!(other.exists(), "pid 1 is alive: its staging folder stays");
}

/// A classification adapter as `rime train` writes it: LoRA on `q` plus a head under `modules_to_save`.
fn classifier_adapter(dir: &Path) -> PeftAdapter {
    let mut cfg = AdapterConfig::lora(2, 4.0, vec!["q".into()]);
    cfg.modules_to_save = vec!["head".into()];
    cfg.task_type = Some("SEQ_CLS".into());
    cfg.raw.insert("rime_labels".into(), serde_json::json!(["a", "b"]));
    let t = |name: &str, shape: Vec<usize>, x: f32| AdapterTensor {
        name: name.into(),
        data: (0..shape.iter().product::<usize>()).map(|i| x * (i as f32 + 1.0)).collect(),
        shape,
    };
    let ad = PeftAdapter::new(
        cfg,
        vec![
            t("base_model.model.q.lora_A.weight", vec![2, 4], 0.1),
            t("base_model.model.q.lora_B.weight", vec![4, 2], 0.01),
            t("base_model.model.head.weight", vec![2, 4], 0.5),
            t("base_model.model.head.bias", vec![2], 0.5),
        ],
    );
    ad.save(dir).unwrap();
    ad
}

#[test]
fn folding_a_classification_adapter_writes_its_head_beside_the_model() {
    let d = setup("fold_head");
    let ad = classifier_adapter(&d.join("adapter"));
    let out = d.join("folded");
    let r = fold_lora(&d.join("adapter"), &d.join("m0"), &out, None, &MergeOptions::default()).unwrap();
    assert!(r.notes.iter().any(|n| n.contains("head")), "{:?}", r.notes);
    let head = PeftAdapter::load(out.join("head")).unwrap();
    assert_eq!(head.config.peft_type, "RIME_PROBE");
    assert_eq!(head.config.raw["rime_labels"], serde_json::json!(["a", "b"]));
    assert_eq!(
        head.get("base_model.model.head.weight").unwrap().data,
        ad.get("base_model.model.head.weight").unwrap().data
    );
    // q folded: W + (4/2) B A; emb copied.
    let o = Checkpoint::open(&out).unwrap();
    assert_eq!(o.names(), vec!["emb.weight", "q.weight"]);
    let (a, b) = (
        &ad.get("base_model.model.q.lora_A.weight").unwrap().data,
        &ad.get("base_model.model.q.lora_B.weight").unwrap().data,
    );
    let q = o.get_f32("q.weight").unwrap();
    let want = 1.0 + 2.0 * (b[0] * a[0] + b[1] * a[4]);
    assert!((q[0] - want).abs() < 1e-6, "{} vs {want}", q[0]);
    // Factors for a module the base lacks are an error naming the tensor, not skipped.
    let bad = d.join("bad_adapter");
    let mut ad2 = ad.clone();
    for t in &mut ad2.tensors {
        t.name = t.name.replace(".q.", ".k.");
    }
    ad2.config.target_modules = vec!["k".into()];
    ad2.save(&bad).unwrap();
    let e = fold_lora(&bad, &d.join("m0"), &d.join("o2"), None, &MergeOptions::default()).unwrap_err().to_string();
    assert!(e.contains("base_model.model.k.lora_A.weight") && e.contains("does not have"), "{e}");
    assert!(!d.join("o2").exists());
}

#[test]
fn combine_refuses_overflowing_weights_and_adapters_without_factors() {
    let d = setup("combine");
    let a = d.join("a");
    classifier_adapter(&a);
    let opts = CombineOptions::new(Combination::Linear);
    let e = combine_lora(dev(), &[a.clone(), a.clone()], &[1e39, 1.0], &opts, &d.join("o"), false).unwrap_err();
    assert!(e.to_string().contains("weights") && e.to_string().contains("1e39"), "{e}");
    // A head-only adapter has no factors to combine.
    let h = d.join("h");
    let mut head = PeftAdapter::load(&a).unwrap();
    head.tensors.retain(|t| t.name.contains("head"));
    head.save(&h).unwrap();
    let e = combine_lora(dev(), &[a.clone(), h.clone()], &[0.5, 0.5], &opts, &d.join("o"), false).unwrap_err();
    assert!(e.to_string().contains(&h.display().to_string()) && e.to_string().contains("no LoRA factors"), "{e}");
    assert!(!d.join("o").exists() && leftovers(&d).is_empty());
}

/// Mounts a 2 MiB tmpfs at `dir`; false (after a loud SKIPPED line) when not root or mounting is not allowed.
fn small_tmpfs(dir: &Path) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    let root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    let ok = root
        && std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("\n!!!!!!!! SKIPPED (needs root for tmpfs): full-disk merge test !!!!!!!!\n");
    }
    ok
}

#[test]
fn a_full_disk_gives_a_clear_error_and_leaves_nothing() {
    let d = tmpdir("fulldisk");
    // 3 MiB of f32: more than the 2 MiB disk.
    std::fs::create_dir_all(d.join("big")).unwrap();
    let big = vec![0.5f32; 3 << 18];
    let t: Vec<(String, Vec<usize>, &[f32])> = vec![("w".into(), vec![3 << 18], &big)];
    rime_io::write_safetensors(d.join("big/model.safetensors"), &t, &BTreeMap::new()).unwrap();
    let disk = d.join("disk");
    if !small_tmpfs(&disk) {
        return;
    }
    let p = d.join("cfg.yaml");
    std::fs::write(&p, format!("merge_method: linear\nmodels: [{0}, {0}]\n", d.join("big").display())).unwrap();
    let cfg = MergeConfig::from_file(&p).unwrap();
    let res = merge(dev(), &cfg, &disk.join("out"), &MergeOptions::default());
    let left: Vec<_> = std::fs::read_dir(&disk).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    let _ = std::process::Command::new("umount").arg(&disk).status();
    let e = res.expect_err("the merge cannot fit").to_string();
    assert!(e.contains("out") && e.contains("No space left"), "{e}");
    assert!(left.is_empty(), "left on the full disk: {left:?}");
}

/// A model named like a Hugging Face Hub id (no such local folder) is refused with how to use a local copy;
/// a missing plain path is refused without that hint.
#[test]
fn hub_ids_in_model_say_how_to_point_at_a_local_copy() {
    let src = std::env::temp_dir().join(format!("rime-hub-{}", std::process::id())).join("c.yaml");
    let e = MergeConfig::from_yaml_str(
        "merge_method: linear\nmodels:\n  - model: sentence-transformers/all-MiniLM-L6-v2\n    parameters: {weight: 1}\n",
        &src,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("models[0]") && e.contains("Hugging Face Hub id") && e.contains("--local-dir"), "{e}");
    let e = MergeConfig::from_yaml_str(
        "merge_method: linear\nmodels:\n  - model: ./no/such/folder\n    parameters: {weight: 1}\n",
        &src,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not found") && !e.contains("Hub id"), "{e}");
}
