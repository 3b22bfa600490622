#!/usr/bin/env python3
"""Run the same mergekit YAML through `mergekit-yaml` (mergekit 0.1.5) and `rime merge`, and compare.

For each case (a YAML file under scripts/mergekit_cases/ unless given), both tools merge into WORK/out-mk-CASE
and WORK/out-rime-CASE with the current directory set to WORK, so that relative model paths in the case
(`base`, `v1`, `v2`, `v3`, or others made by --make-*) resolve the same way for both. The table gives, per case:
max abs difference over all tensors, the share of differing elements, tensors only one side wrote, wall time
and peak RSS of each process (`/usr/bin/time`). For the random methods (case names with `dare` or `della`) a
second table compares the kept share and the mean / std of the merged delta (out - base) of both tools.

Inputs (made once in WORK, seeded):
  --make-minilm MODEL   base = a copy of MODEL (an HF BERT folder, e.g. models/all-minilm-l6-v2), v1..v3 = the
                        base plus uniform noise of +-0.01 / 0.02 / 0.03 on every float tensor (seeds 1..3).
  --make-llama          a tiny random Llama in HF format (transformers' LlamaConfig: hidden 64, 4 layers, 4
                        heads, intermediate 128, vocab 256, untied lm_head, float32) with a WordLevel tokenizer:
                        lbase (seed 0), l1..l3 = lbase plus noise of +-0.01 / 0.02 / 0.03 (seeds 11..13), and
                        lvocab: lbase plus noise (seed 14) with a different vocabulary (tokens 3..12 in reverse
                        order, the last six replaced by new ones; rows moved with their tokens), for
                        tokenizer_source cases.

Besides the tensors, the table's last column lists side files that disagree: config.json's
num_hidden_layers / vocab_size, the tokenizer's vocabulary (tokenizer.json or vocab.txt) and
chat_template.jinja.

mergekit 0.1.5 needs a one-line patch to merge BERT (mergekit/plan.py: `[w_in.name] + list(w_in.aliases or
[])`, the aliases are a tuple): this script applies it to the venv's mergekit if it is missing.

Usage:
  V/bin/python scripts/mergekit_compare.py --work /tmp/mk --make-minilm models/all-minilm-l6-v2 \
      --rime target/release/rime [CASE.yml ...] [--json out.json]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

HERE = Path(__file__).resolve().parent
# Cases whose method draws random masks: compared by statistics as well (delta_stats).
RANDOM = re.compile(r"dare|della")


def patch_mergekit():
    import mergekit.plan as plan

    p = Path(plan.__file__)
    text = p.read_text()
    old = "[w_in.name] + (w_in.aliases or [])"
    if old in text:
        p.write_text(text.replace(old, "[w_in.name] + list(w_in.aliases or [])"))
        print(f"patched {p} (BERT aliases are a tuple)", file=sys.stderr)


def st_files(folder: Path):
    return sorted(folder.glob("*.safetensors"))


def load_folder(folder: Path):
    """Tensors as numpy arrays; bfloat16 (which numpy lacks) widened to float32, exactly."""
    from safetensors.torch import load_file as torch_load
    import torch

    out = {}
    for f in st_files(folder):
        for k, v in torch_load(str(f)).items():
            out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def ulps(x, y, dtype):
    """Distance in units in the last place of `dtype` (float16, bfloat16 or float32) between x and y: the largest,
    and how many elements are more than 1 ulp apart."""
    import torch

    def key(a):
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        i = t.view(torch.int16 if dtype != torch.float32 else torch.int32).to(torch.int64)
        lo = -(2 ** 15) if dtype != torch.float32 else -(2 ** 31)
        return torch.where(i >= 0, i, lo - i)

    if not x.size:
        return 0, 0
    d = (key(x) - key(y)).abs()
    return int(d.max()), int((d > 1).sum())


def make_minilm(model: Path, work: Path):
    base = work / "base"
    if not base.exists():
        shutil.copytree(model, base)
    for i, amp in [(1, 0.01), (2, 0.02), (3, 0.03)]:
        d = work / f"v{i}"
        if d.exists():
            continue
        shutil.copytree(model, d)
        rng = np.random.default_rng(i)
        for f in st_files(d):
            ts = load_file(str(f))
            for k, v in ts.items():
                if np.issubdtype(v.dtype, np.floating):
                    ts[k] = (v + rng.uniform(-amp, amp, v.shape).astype(v.dtype)).astype(v.dtype)
            save_file(ts, str(f), metadata={"format": "pt"})


LLAMA_TOKENS = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, 256)]


def save_llama_tokenizer(tokens, folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def make_llama(work: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = work / "lbase"
    if not base.exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=256, tie_word_embeddings=False,
                          max_position_embeddings=128)
        model = LlamaForCausalLM(cfg).to(torch.float32)
        model.save_pretrained(str(base), safe_serialization=True)
        save_llama_tokenizer(LLAMA_TOKENS, base)
    for i, amp in [(1, 0.01), (2, 0.02), (3, 0.03), (4, 0.02)]:
        name = "lvocab" if i == 4 else f"l{i}"
        d = work / name
        if d.exists():
            continue
        shutil.copytree(base, d)
        rng = np.random.default_rng(10 + i)
        for f in st_files(d):
            ts = load_file(str(f))
            for k, v in ts.items():
                if np.issubdtype(v.dtype, np.floating):
                    ts[k] = (v + rng.uniform(-amp, amp, v.shape).astype(v.dtype)).astype(v.dtype)
            if name == "lvocab":
                tokens = list(LLAMA_TOKENS)
                tokens[3:13] = tokens[3:13][::-1]
                tokens[250:] = [f"new{j}" for j in range(250, 256)]
                # row r of lvocab holds the token tokens[r]: the old row of that token (new tokens: a fresh row).
                old = {t: r for r, t in enumerate(LLAMA_TOKENS)}
                for k in ("model.embed_tokens.weight", "lm_head.weight"):
                    v = ts[k]
                    ts[k] = np.stack([v[old[t]] if t in old else v[r] * 0.5 for r, t in enumerate(tokens)])
            save_file(ts, str(f), metadata={"format": "pt"})
        if name == "lvocab":
            for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
                (d / f).unlink(missing_ok=True)
            save_llama_tokenizer(tokens, d)


def side_files(a: Path, b: Path):
    """Side files where the two outputs disagree."""
    bad = []

    def cfg(p):
        try:
            return json.loads((p / "config.json").read_text())
        except Exception:
            return {}

    ca, cb = cfg(a), cfg(b)
    for k in ("num_hidden_layers", "vocab_size"):
        if ca.get(k) != cb.get(k):
            bad.append(f"config {k} {ca.get(k)} vs {cb.get(k)}")

    def vocab(p):
        tj = p / "tokenizer.json"
        if tj.exists():
            j = json.loads(tj.read_text())
            v = dict(j["model"]["vocab"]) if isinstance(j["model"]["vocab"], dict) else \
                {e[0]: i for i, e in enumerate(j["model"]["vocab"])}
            v.update({e["content"]: e["id"] for e in j.get("added_tokens", [])})
            return v
        vt = p / "vocab.txt"
        if vt.exists():
            return {t: i for i, t in enumerate(vt.read_text().splitlines())}
        return None

    va, vb = vocab(a), vocab(b)
    if va != vb:
        bad.append("tokenizer vocabulary")
    ta, tb = [(p / "chat_template.jinja").read_text() if (p / "chat_template.jinja").exists() else None
              for p in (a, b)]
    if ta != tb:
        bad.append("chat_template.jinja")
    return bad


def timed(cmd, cwd):
    """Runs cmd under /usr/bin/time; returns (rc, seconds, peak_rss_mb, stderr_tail)."""
    full = ["/usr/bin/time", "-f", "@@TIME %e %M"] + cmd
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run(full, cwd=cwd, capture_output=True, text=True, env=env)
    m = re.search(r"@@TIME ([0-9.]+) ([0-9]+)", p.stderr)
    secs, rss = (float(m.group(1)), int(m.group(2)) / 1024) if m else (float("nan"), float("nan"))
    tail = "\n".join(l for l in p.stderr.splitlines() if not l.startswith("@@TIME"))[-1500:]
    return p.returncode, secs, rss, tail


def compare(a: Path, b: Path):
    ta, tb = load_folder(a), load_folder(b)
    only = sorted(set(ta) ^ set(tb))
    import torch

    st = {}
    for f in st_files(b):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            st.update({k: v.get("dtype") for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    tdt = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    maxabs, diff, total, shape_bad, max_ulps, beyond1 = 0.0, 0, 0, [], 0, 0
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.shape != y.shape:
            shape_bad.append(k)
            continue
        if not np.issubdtype(x.dtype, np.floating):
            diff += int((x != y).sum())
            total += x.size
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        d = np.abs(x64 - y64)
        maxabs = max(maxabs, float(d.max()) if d.size else 0.0)
        if st.get(k) in tdt:
            u, m = ulps(x, y, tdt[st[k]])
            max_ulps, beyond1 = max(max_ulps, u), beyond1 + m
        diff += int((x64 != y64).sum())
        total += x.size
    return {
        "max_abs": maxabs,
        "differ": diff / max(total, 1),
        "max_ulps": max_ulps,
        "beyond_1ulp": beyond1 / max(total, 1),
        "elements": total,
        "only_one_side": only,
        "shape_mismatch": shape_bad,
        "dtypes": sorted({str(v.dtype) for v in tb.values()}),
    }


def delta_stats(out: Path, base: Path):
    """For the random methods (DARE, DELLA): the share of elements that moved from the base (kept), and the mean
    and std of the merged delta out - base over all float tensors."""
    to, tb = load_folder(out), load_folder(base)
    kept, n, s, s2 = 0, 0, 0.0, 0.0
    for k, v in to.items():
        if k not in tb or not np.issubdtype(v.dtype, np.floating) or v.shape != tb[k].shape:
            continue
        d = v.astype(np.float64) - tb[k].astype(np.float64)
        kept += int((d != 0).sum())
        n += d.size
        s += float(d.sum())
        s2 += float((d * d).sum())
    mean = s / max(n, 1)
    return {"kept": kept / max(n, 1), "mean": mean, "std": max(s2 / max(n, 1) - mean * mean, 0.0) ** 0.5}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help="YAML files (default: scripts/mergekit_cases/*.yml)")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--rime", default="target/release/rime", help="the rime binary")
    ap.add_argument("--mergekit", default=str(Path(sys.executable).parent / "mergekit-yaml"))
    ap.add_argument("--make-minilm", type=Path)
    ap.add_argument("--make-llama", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--skip-mergekit", action="store_true", help="reuse earlier mergekit outputs in WORK")
    args = ap.parse_args()
    patch_mergekit()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.make_minilm:
        make_minilm(args.make_minilm.resolve(), args.work)
    if args.make_llama:
        make_llama(args.work)
    cases = [Path(c) for c in args.cases] or sorted((HERE / "mergekit_cases").glob("*.yml"))
    rime = str(Path(args.rime).resolve())
    results = []
    for case in cases:
        name = case.stem
        cfg = args.work / f"{name}.yml"
        shutil.copy(case, cfg)
        mk_out, rime_out = args.work / f"out-mk-{name}", args.work / f"out-rime-{name}"
        r = {"case": name}
        if not (args.skip_mergekit and mk_out.exists()):
            shutil.rmtree(mk_out, ignore_errors=True)
            rc, s, m, tail = timed([args.mergekit, cfg.name, mk_out.name, "--copy-tokenizer", "--no-write-model-card"], args.work)
            r.update(mk_rc=rc, mk_s=s, mk_rss_mb=m)
            if rc != 0:
                r["mk_error"] = tail
        rc, s, m, tail = timed([rime, "merge", cfg.name, "--out", rime_out.name, "--force"], args.work)
        r.update(rime_rc=rc, rime_s=s, rime_rss_mb=m)
        if rc != 0:
            r["rime_error"] = tail
        if r.get("mk_rc", 0) == 0 and mk_out.exists() and rc == 0 and st_files(mk_out):
            r.update(compare(mk_out, rime_out))
            r["side_files_differ"] = side_files(mk_out, rime_out)
            if RANDOM.search(name) and (args.work / "base").exists():
                r["stats_mk"] = delta_stats(mk_out, args.work / "base")
                r["stats_rime"] = delta_stats(rime_out, args.work / "base")
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
    print("| case | max abs diff | elements differing | more than 1 ulp apart | mergekit s / MB | rime s / MB | speed-up | side files |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "max_abs" in r:
            extra = ""
            if r["only_one_side"] or r["shape_mismatch"]:
                extra = f" (tensor sets differ: {len(r['only_one_side'])} one-sided, {len(r['shape_mismatch'])} shapes)"
            d = f"{r['max_abs']:.3g}{extra}"
            frac = f"{100 * r['differ']:.4g}%"
        else:
            d = "mergekit failed" if r.get("mk_rc") else "rime failed" if r.get("rime_rc") else "-"
            frac = "-"
        mk = f"{r.get('mk_s', float('nan')):.2f} / {r.get('mk_rss_mb', float('nan')):.0f}"
        ri = f"{r['rime_s']:.2f} / {r['rime_rss_mb']:.0f}"
        sp = f"{r.get('mk_s', float('nan')) / max(r['rime_s'], 1e-9):.1f}x"
        side = ", ".join(r.get("side_files_differ", [])) or ("equal" if "max_abs" in r else "-")
        b1 = f"{100 * r['beyond_1ulp']:.4g}%" if "beyond_1ulp" in r else "-"
        print(f"| {r['case']} | {d} | {frac} | {b1} | {mk} | {ri} | {sp} | {side} |")
    rnd = [r for r in results if "stats_mk" in r]
    if rnd:
        print()
        print("Random methods (different generators, compared by statistics of the merged delta out - base):")
        print("| case | kept share mergekit / rime | delta mean mergekit / rime | delta std mergekit / rime |")
        print("|---|---|---|---|")
        for r in rnd:
            a, b = r["stats_mk"], r["stats_rime"]
            print(f"| {r['case']} | {100 * a['kept']:.3f}% / {100 * b['kept']:.3f}% | {a['mean']:.3g} / {b['mean']:.3g} "
                  f"| {a['std']:.5g} / {b['std']:.5g} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("rime_rc") == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
