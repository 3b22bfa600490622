//! Dataset parsing: JSONL, quoted CSV with newlines and tabs, TSV, integer and string labels, the label map,
//! the seeded split, and every error case naming the file and line.

mod common;

use rime_io::{Columns, Dataset, DatasetFormat, LabelMap};

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn jsonl_with_string_labels_builds_a_sorted_label_map() {
    let dir = common::scratch("ds_jsonl");
    let p = write(
        &dir,
        "train.jsonl",
        "{\"text\": \"good\", \"label\": \"great\"}\n\n{\"text\": \"meh\\nok\", \"label\": \"other\"}\n{\"text\": \"wow\", \"label\": \"great\"}\n",
    );
    let ds = Dataset::load(&p, &Columns::default()).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.texts(), vec!["good", "meh\nok", "wow"]);
    assert_eq!(ds.examples[1].line, 3);
    let map = LabelMap::from_dataset(&ds).unwrap();
    assert_eq!(map.labels(), &["great".to_string(), "other".to_string()]);
    assert_eq!(map.encode(&ds).unwrap(), vec![0, 1, 0]);
}

#[test]
fn integer_labels_sort_numerically() {
    let dir = common::scratch("ds_int");
    let mut s = String::new();
    for (i, l) in [10, 2, 0, 2, 10, 1].iter().enumerate() {
        s.push_str(&format!("{{\"text\": \"t{i}\", \"label\": {l}}}\n"));
    }
    let p = write(&dir, "d.jsonl", &s);
    let ds = Dataset::load(&p, &Columns::default()).unwrap();
    let map = LabelMap::from_dataset(&ds).unwrap();
    assert_eq!(map.labels(), &["0", "1", "2", "10"].map(String::from));
    assert_eq!(map.encode(&ds).unwrap(), vec![3, 2, 0, 2, 3, 1]);
}

#[test]
fn quoted_csv_keeps_commas_newlines_tabs_and_quotes() {
    let dir = common::scratch("ds_csv");
    let p = write(
        &dir,
        "d.csv",
        "id,review,premise,label\n1,\"a, b\",\"p1\",pos\n2,\"line one\nline two\twith tab\",\"p2\",neg\n3,\"say \"\"hi\"\"\",p3,pos\n",
    );
    let cols = Columns { text: "review".into(), text_pair: Some("premise".into()), label: Some("label".into()) };
    let ds = Dataset::load(&p, &cols).unwrap();
    assert_eq!(ds.texts(), vec!["a, b", "line one\nline two\twith tab", "say \"hi\""]);
    assert_eq!(ds.text_pairs().unwrap(), vec!["p1", "p2", "p3"]);
    assert_eq!(ds.examples.iter().map(|e| e.line).collect::<Vec<_>>(), vec![2, 3, 5]);
    assert_eq!(ds.columns, vec!["id", "review", "premise", "label"]);
    let map = LabelMap::from_dataset(&ds).unwrap();
    assert_eq!(map.encode(&ds).unwrap(), vec![1, 0, 1]);
}

#[test]
fn tsv_with_quoted_tabs_and_integer_labels() {
    let dir = common::scratch("ds_tsv");
    let p = write(&dir, "d.tsv", "sentence\tlabel\nplain text\t1\n\"has\ta tab\"\t0\n\"two\nlines\"\t1\n");
    let ds =
        Dataset::load(&p, &Columns { text: "sentence".into(), text_pair: None, label: Some("label".into()) }).unwrap();
    assert_eq!(ds.texts(), vec!["plain text", "has\ta tab", "two\nlines"]);
    assert_eq!(LabelMap::from_dataset(&ds).unwrap().encode(&ds).unwrap(), vec![1, 0, 1]);
    // The format can be forced whatever the extension.
    let q = write(&dir, "d.txt", "sentence\tlabel\nx\t1\n");
    assert!(Dataset::load(&q, &Columns::default()).is_err());
    let ds = Dataset::load_as(
        &q,
        DatasetFormat::Tsv,
        &Columns { text: "sentence".into(), text_pair: None, label: Some("label".into()) },
    )
    .unwrap();
    assert_eq!(ds.len(), 1);
}

fn err(p: &std::path::Path, cols: &Columns) -> String {
    Dataset::load(p, cols).unwrap_err().to_string()
}

#[test]
fn error_cases_name_the_file_line_and_what_is_wrong() {
    let dir = common::scratch("ds_err");
    let c = Columns::default();

    // Empty datasets.
    for (name, body) in
        [("e.jsonl", ""), ("e2.jsonl", "\n\n"), ("e.csv", ""), ("e2.csv", "text,label\n"), ("e.tsv", "text\tlabel\n")]
    {
        let p = write(&dir, name, body);
        let e = err(&p, &c);
        assert!(e.contains(name) && e.contains("empty"), "{name}: {e}");
    }

    // Missing columns list the columns there are, with file and line.
    let p = write(&dir, "m.jsonl", "{\"text\": \"a\", \"label\": 1}\n{\"txt\": \"b\", \"label\": 0}\n");
    let e = err(&p, &c);
    assert!(e.contains("m.jsonl") && e.contains("line 2") && e.contains("`text`") && e.contains("txt"), "{e}");
    let p = write(&dir, "m.csv", "sentence,target\nx,1\n");
    let e = err(&p, &c);
    assert!(e.contains("m.csv") && e.contains("line 1") && e.contains("`text`") && e.contains("sentence"), "{e}");
    let e = err(&p, &Columns { text: "sentence".into(), text_pair: None, label: Some("label".into()) });
    assert!(e.contains("label column `label`") && e.contains("target"), "{e}");
    let e = err(&p, &Columns { text: "sentence".into(), text_pair: Some("hyp".into()), label: None });
    assert!(e.contains("`hyp`"), "{e}");

    // Malformed rows.
    let p = write(&dir, "bad.jsonl", "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"a\", \n");
    let e = err(&p, &c);
    assert!(e.contains("bad.jsonl") && e.contains("line 2") && e.contains("JSON"), "{e}");
    let p = write(&dir, "arr.jsonl", "[1,2]\n");
    assert!(err(&p, &c).contains("line 1"));
    let p = write(&dir, "num.jsonl", "{\"text\": 5, \"label\": 1}\n");
    let e = err(&p, &c);
    assert!(e.contains("`text`") && e.contains("expected a string"), "{e}");
    let p = write(&dir, "lab.jsonl", "{\"text\": \"a\", \"label\": null}\n");
    let e = err(&p, &c);
    assert!(e.contains("label") && e.contains("null"), "{e}");
    let p = write(&dir, "ragged.csv", "text,label\na,1\nb,1,extra\n");
    let e = err(&p, &c);
    assert!(e.contains("ragged.csv") && e.contains("line 3") && e.contains("3 fields"), "{e}");
    let p = write(&dir, "nolab.csv", "text,label\na,\n");
    let e = err(&p, &c);
    assert!(e.contains("line 2") && e.contains("empty label"), "{e}");

    // One class only.
    let p = write(&dir, "one.jsonl", "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"x\"}\n");
    let ds = Dataset::load(&p, &c).unwrap();
    let e = LabelMap::from_dataset(&ds).unwrap_err().to_string();
    assert!(e.contains("one.jsonl") && e.contains("only one class") && e.contains("\"x\""), "{e}");

    // An eval label never seen in training.
    let tr = write(&dir, "tr.jsonl", "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"y\"}\n");
    let ev = write(&dir, "ev.jsonl", "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"zebra\"}\n");
    let map = LabelMap::from_dataset(&Dataset::load(&tr, &c).unwrap()).unwrap();
    let e = map.encode(&Dataset::load(&ev, &c).unwrap()).unwrap_err().to_string();
    assert!(e.contains("ev.jsonl") && e.contains("line 2") && e.contains("`zebra`"), "{e}");

    // Unlabeled data loads without a label column, but has no label map.
    let ds = Dataset::load(&ev, &Columns { text: "text".into(), text_pair: None, label: None }).unwrap();
    assert!(ds.examples.iter().all(|e| e.label.is_none()));
    assert!(LabelMap::from_dataset(&ds).unwrap_err().to_string().contains("no label column"));

    // A missing file.
    let e = err(&dir.join("nope.jsonl"), &c);
    assert!(e.contains("nope.jsonl"), "{e}");
}

#[test]
fn seeded_split_is_deterministic_disjoint_and_sized() {
    let (tr, ev) = rime_io::split_indices(100, 0.2, 42);
    assert_eq!((tr.len(), ev.len()), (80, 20));
    let (tr2, ev2) = rime_io::split_indices(100, 0.2, 42);
    assert_eq!((&tr, &ev), (&tr2, &ev2));
    let (_, ev3) = rime_io::split_indices(100, 0.2, 43);
    assert_ne!(ev, ev3);
    let mut all: Vec<usize> = tr.iter().chain(ev.iter()).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    // Tiny datasets still get one row on each side.
    assert_eq!(rime_io::split_indices(2, 0.01, 0).1.len(), 1);
    assert_eq!(rime_io::split_indices(2, 0.99, 0).0.len(), 1);
}

#[test]
fn fine_foods_train_and_test_load() {
    let Some(train) = Some(common::golden("../data/fine_foods/train.jsonl")).filter(|p| p.exists()) else {
        eprintln!("SKIPPED: shared/data/fine_foods not found");
        return;
    };
    let test = train.with_file_name("test.jsonl");
    let tr = Dataset::load(&train, &Columns::default()).unwrap();
    let te = Dataset::load(&test, &Columns::default()).unwrap();
    assert_eq!((tr.len(), te.len()), (4000, 1000));
    let map = LabelMap::from_dataset(&tr).unwrap();
    assert_eq!(map.labels(), &["great".to_string(), "other".to_string()]);
    let ids = map.encode(&te).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 658);
    let (a, b) = tr.split(0.1, 7).unwrap();
    assert_eq!((a.len(), b.len()), (3600, 400));
}
