#!/usr/bin/env python3
"""PyTorch + Hugging Face peft side of rime's text classification: LoRA on all-MiniLM-L6-v2 with rime's recipe.

The reference row of issue 15's tables (text-pair SNLI, the LST comparison on fine_foods): the same training
`rime train` runs by default (README "What the main job does"), in PyTorch + peft, on a JSONL file with rime's
column flags, reporting per epoch eval accuracy, macro-F1, training examples/s, peak RSS and the activation
memory of a training step.

The recipe (rime's defaults: crates/rime-peft/src/{config,classify,classifier,trainer}.rs,
crates/rime-peft/src/methods/lora.rs, crates/rime-cli/src/train.rs)
-------------------------------------------------------------------------------------------------------
- backbone: `BertModel` from the model folder (default $RIME_MODELS/all-minilm-l6-v2), frozen, without dropout
  (rime's BERT has none: hidden and attention dropout set to 0), without the pooler (the mean head does not
  read it); attention through transformers' default implementation (`sdpa`; --attn eager for the explicit one);
- LoRA r=8, alpha=16 (scale 2) on `query` and `value` of all 6 layers (peft's suffix match, 12 modules),
  lora_dropout 0, bias none, A kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(in)), B zero (peft's default init, which
  rime copies);
- head: nn.Linear(hidden, classes) on the mask-weighted mean of the last hidden states (sum over real tokens /
  their count; sentence-transformers' pooling, rime's `--head mean`), torch's default Linear init (weight and
  bias U(+-1/sqrt(hidden))), trained and saved with the adapter (peft `modules_to_save=["head"]`);
- labels: strings, classes = the sorted distinct training labels (numerically when every label is an integer,
  rime's LabelMap); an eval label unseen in training is an error naming the file and line, as in rime;
- tokenization: the model folder's fast tokenizer (tokenizer.json), with special tokens; with
  --text-pair-column the two texts are encoded as a pair ([CLS] a [SEP] b [SEP], token types 0/1), truncated to
  --max-length 128 longest-first (rime's Tokenizer::set_max_length = tokenizers' LongestFirst); the number of
  truncated rows is reported;
- cross-entropy, mean over the rows of the batch (a short last batch is kept);
- torch.optim.AdamW(lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01) over all trainable tensors in one
  group (LoRA A, B, head weight and bias: rime decays the bias too), foreach=False (rime's shader follows torch's
  single-tensor AdamW); schedule constant, warmup 0 (linear/cosine with warmup: rime's LrSchedule::factor =
  transformers' get_{linear,cosine}_schedule_with_warmup); clip_grad_norm_(1.0) over the trainable tensors;
- batch 32, batches grouped by length as rime's `batches_by_length` (Hugging Face's group_by_length): each
  epoch e, with a generator seeded by seed + e, shuffle the rows, cut them into mega-batches of 50 batches, sort
  each by length (longest first, stable), cut into batches, shuffle the batch order; each batch is padded to
  its longest row (rime pads to a 32-token bucket: padding is masked, so the values are the same, only the work
  differs); seed 0; evaluation on --eval after every epoch (rime without --eval holds out a seeded 10% of
  --train, which this script does not do: --eval is required);
- metrics as rime's: accuracy, macro-F1 averaged over all classes (a class absent from predictions and labels
  counts as F1 0), eval loss = mean cross-entropy; rime keeps the best epoch's adapter, so the summary reports
  the best epoch (by accuracy, the first on ties) and the last one; every epoch is in `history`.

What is measured
----------------
- train examples/s of each epoch: rows stepped / wall time of that epoch's training loop (batch building,
  forward, backward, clipping, update; evaluation and tokenization excluded, as rime's StepLog);
- activation memory of a training step: the bytes of the tensors autograd saves for backward, collected with
  torch.autograd.graph.saved_tensors_hooks during the forward pass; tensors whose storage is a parameter or a
  buffer (the frozen weights matmuls keep for the input gradient) are counted apart, and storages saved twice
  are counted once. Per epoch: the largest step (with its [batch, tokens] shape) and the mean over steps; at the
  end, one step (forward and backward, no update) on a full [batch-size, max-length] batch of training rows
  padded to max-length, the fixed-shape number to set beside rime's executor report;
- peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss, the process' high-water mark at each epoch's end
  (so it includes loading the model and tokenizing); the summary's `peak_rss_mib` is the one after the last
  epoch, before the fixed-shape step (whose own high-water mark is `activation_fixed_step.peak_rss_mib_after`);
- threads: torch.set_num_threads(--threads), 2 by default (the 2-core machine of the README's tables; with
  other processes busy, OpenMP threads that spin on shared cores make the speed unreliable: record the load).

Commands
--------
    # SNLI text pairs (issue 15), the data committed in data/snli_cls_demo
    /work/venv/bin/python scripts/peft_text_baseline.py --train data/snli_cls_demo/train.jsonl \
        --eval data/snli_cls_demo/test.jsonl --text-column premise --text-pair-column hypothesis \
        --label-column label --epochs 3 --json /tmp/peft_snli.json
    # the main job's data (the LST table's reference row)
    /work/venv/bin/python scripts/peft_text_baseline.py --train data/fine_foods/train.jsonl \
        --eval data/fine_foods/test.jsonl --epochs 2 --json /tmp/peft_fine_foods.json

Tested with torch 2.15, transformers 5.25, peft 0.21.2 (the /work/venv of the README), Python 3.11, CPU.

Where it departs from rime
--------------------------
- Random streams: rime draws the head, LoRA A and the shuffles from Rust's StdRng (ChaCha) seeded by --seed;
  this script uses torch's generator seeded by --seed (head first, then LoRA A in module order; the batches of
  epoch e from seed + e). Same distributions, different draws: the runs agree statistically, not bit for bit
  (rime's parity test checks the step itself against PyTorch to 1e-5).
- Padding: to the batch's longest row here, to a multiple of 32 tokens in rime (the same values; rime computes
  more padded positions).
- Numerics: f32 on the CPU (MKL/oneDNN kernels, SDPA attention) vs rime's f32 compute shaders on lavapipe.
- Only JSONL input (rime also reads CSV/TSV); no --eval-fraction hold-out, checkpoints, patience,
  micro-batches, --weights f16/bf16, DoRA/PiSSA/rsLoRA, other methods, or the HF head (`--head hf`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np


def die(msg: str) -> "NoReturn":  # noqa: F821
    print(f"peft_text_baseline: error: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Data (rime-io's Dataset for JSONL, rime's LabelMap)
# ----------------------------------------------------------------------------------------------------------

def load_jsonl(path: str, text_col: str, pair_col: str | None, label_col: str) -> tuple[list, list | None, list, list]:
    """Texts, pair texts (or None), labels (as strings) and line numbers of a JSONL file; errors name file:line."""
    if not path.endswith(".jsonl"):
        die(f"{path}: only .jsonl files are read by this script")
    texts, pairs, labels, lines = [], [] if pair_col else None, [], []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        die(f"{path}: {e.strerror}")
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                die(f"{path}:{lineno}: not JSON ({e})")
            if not isinstance(obj, dict):
                die(f"{path}:{lineno}: not a JSON object")
            for col, what in ((text_col, "--text-column"), (pair_col, "--text-pair-column"), (label_col, "--label-column")):
                if col is None:
                    continue
                if col not in obj:
                    die(f"{path}:{lineno}: no key '{col}' ({what}); keys: {', '.join(sorted(obj))}")
            t = obj[text_col]
            if not isinstance(t, str):
                die(f"{path}:{lineno}: '{text_col}' is not a string")
            texts.append(t)
            if pair_col:
                p = obj[pair_col]
                if not isinstance(p, str):
                    die(f"{path}:{lineno}: '{pair_col}' is not a string")
                pairs.append(p)
            lab = obj[label_col]
            if isinstance(lab, bool) or not isinstance(lab, (str, int)):
                die(f"{path}:{lineno}: '{label_col}' is {json.dumps(lab)}, not a string or an integer")
            labels.append(str(lab))
            lines.append(lineno)
    if not texts:
        die(f"{path}: no rows")
    return texts, pairs, labels, lines


def label_names(labels: list[str]) -> list[str]:
    """rime's LabelMap: the distinct labels sorted, numerically when every one is an integer."""
    uniq = set(labels)
    try:
        return sorted(uniq, key=int)
    except ValueError:
        return sorted(uniq)


def encode_labels(labels: list[str], names: list[str], path: str, lines: list[int]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        if lab not in index:
            die(f"{path}:{lines[i]}: label '{lab}' is not among the training labels ({', '.join(names)})")
        out[i] = index[lab]
    return out


def tokenize(tok, texts: list[str], pairs: list[str] | None, max_length: int):
    """ids and token types per row, truncated longest-first to max_length; and how many rows lost tokens."""
    enc = tok(texts, pairs, truncation=True, max_length=max_length, padding=False, return_token_type_ids=True)
    full = tok(texts, pairs, truncation=False, padding=False, return_token_type_ids=False)
    truncated = sum(1 for a, b in zip(enc["input_ids"], full["input_ids"]) if len(b) > len(a))
    return enc["input_ids"], enc["token_type_ids"], truncated


# ----------------------------------------------------------------------------------------------------------
# Batches (rime-peft trainer.rs batches_by_length), padding, metrics (rime-peft metrics.rs)
# ----------------------------------------------------------------------------------------------------------

def batches_by_length(lens: list[int], batch: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lens), generator=g).tolist()
    batches = []
    for s in range(0, len(order), batch * 50):
        mega = sorted(order[s:s + batch * 50], key=lambda i: -lens[i])  # stable, longest first
        batches.extend(mega[j:j + batch] for j in range(0, len(mega), batch))
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def make_batch(ids, types, idx: list[int], pad_to: int | None = None):
    import torch

    t = pad_to or max(len(ids[i]) for i in idx)
    x = torch.zeros(len(idx), t, dtype=torch.long)
    tt = torch.zeros(len(idx), t, dtype=torch.long)
    m = torch.zeros(len(idx), t, dtype=torch.long)
    for r, i in enumerate(idx):
        n = min(len(ids[i]), t)
        x[r, :n] = torch.tensor(ids[i][:n])
        tt[r, :n] = torch.tensor(types[i][:n])
        m[r, :n] = 1
    return x, tt, m


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray, classes: int) -> dict:
    pred = logits.argmax(axis=1)  # first max, as rime's argmax_rows
    lg = logits.astype(np.float64)
    mx = lg.max(axis=1, keepdims=True)
    lse = (mx + np.log(np.exp(lg - mx).sum(axis=1, keepdims=True)))[:, 0]
    loss = float((lse - lg[np.arange(len(labels)), labels]).mean())
    f1 = 0.0
    for c in range(classes):
        tp = float(((pred == c) & (labels == c)).sum())
        fp = float(((pred == c) & (labels != c)).sum())
        fn = float(((pred != c) & (labels == c)).sum())
        d = 2 * tp + fp + fn
        f1 += 2 * tp / d if d > 0 else 0.0
    return {"accuracy": float((pred == labels).mean()), "macro_f1": f1 / classes, "loss": loss,
            "examples": int(len(labels))}


def lr_factor(schedule: str, warmup: int, total: int, step: int) -> float:
    """rime-graph LrSchedule::factor (= transformers' get_{linear,cosine}_schedule_with_warmup)."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return step / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return max(1.0 - progress, 0.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward (saved_tensors_hooks), each storage counted once;
    storages of parameters and buffers counted apart from activations."""

    def __init__(self, module):
        self.param_ptrs = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
        self.reset()

    def reset(self):
        self.seen: dict[int, tuple[int, bool]] = {}

    def pack(self, t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self.seen:
                self.seen[ptr] = (st.nbytes(), ptr in self.param_ptrs)
        except (RuntimeError, NotImplementedError):  # tensors without a storage: count their elements
            self.seen[id(t)] = (t.numel() * t.element_size(), False)
        return t

    @staticmethod
    def unpack(t):
        return t

    def totals(self) -> tuple[int, int]:
        act = sum(n for n, is_param in self.seen.values() if not is_param)
        par = sum(n for n, is_param in self.seen.values() if is_param)
        return act, par


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def train(args) -> int:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertModel

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    for name in ("config.json", "tokenizer.json"):
        if not (model_dir / name).is_file():
            die(f"{model_dir}: no {name} (a Hugging Face BERT folder is expected; scripts/fetch-models.sh fetches "
                "all-minilm-l6-v2)")
    t_load = time.perf_counter()
    tr_texts, tr_pairs, tr_labels, tr_lines = load_jsonl(args.train, args.text_column, args.text_pair_column,
                                                         args.label_column)
    ev_texts, ev_pairs, ev_labels, ev_lines = load_jsonl(args.eval, args.text_column, args.text_pair_column,
                                                         args.label_column)
    names = label_names(tr_labels)
    if len(names) < 2:
        die(f"{args.train}: one label only ('{names[0]}'); classification needs at least 2")
    tr_y = encode_labels(tr_labels, names, args.train, tr_lines)
    ev_y = encode_labels(ev_labels, names, args.eval, ev_lines)
    classes = len(names)

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if not tok.is_fast:
        die(f"{model_dir}: the tokenizer did not load as a fast (tokenizer.json) tokenizer")
    tr_ids, tr_types, tr_trunc = tokenize(tok, tr_texts, tr_pairs, args.max_length)
    ev_ids, ev_types, ev_trunc = tokenize(tok, ev_texts, ev_pairs, args.max_length)
    if tr_trunc + ev_trunc:
        log(f"{tr_trunc + ev_trunc} of {len(tr_ids) + len(ev_ids)} texts are longer than max_length "
            f"{args.max_length} tokens and were truncated")

    class Classifier(nn.Module):
        def __init__(self, backbone: nn.Module, hidden: int, classes: int):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(hidden, classes)

        def forward(self, input_ids, token_type_ids, attention_mask):
            h = self.backbone(input_ids=input_ids, token_type_ids=token_type_ids,
                              attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1)
            return self.head(pooled)

    torch.manual_seed(args.seed)
    backbone, info = BertModel.from_pretrained(
        str(model_dir), add_pooling_layer=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=args.attn, output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        die(f"{model_dir}: missing {info.get('missing_keys')} / mismatched {info.get('mismatched_keys')} weights")
    model = Classifier(backbone, backbone.config.hidden_size, classes)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets, lora_dropout=args.lora_dropout,
                      bias="none", init_lora_weights=True, modules_to_save=["head"])
    model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora_modules = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    log(f"LoRA r={args.rank} alpha={args.alpha:g} on {len(lora_modules)} modules; {trainable} trainable parameters, "
        f"{frozen} frozen (incl. peft's frozen copy of the head); classes {names}; threads {args.threads}; "
        f"attention {backbone.config._attn_implementation}")
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                            foreach=False)
    n = len(tr_y)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(round(args.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(args.schedule, warmup, total, s))
    load_secs = time.perf_counter() - t_load
    log(f"training on {n} examples, {total} steps of {args.batch_size}; eval on {len(ev_y)} "
        f"(loaded and tokenized in {load_secs:.1f} s)")
    meter = SavedTensorMeter(model)
    lens = [len(x) for x in tr_ids]

    def evaluate():
        model.eval()
        order = sorted(range(len(ev_ids)), key=lambda i: len(ev_ids[i]))
        logits = np.zeros((len(ev_ids), classes), np.float32)
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(order), args.batch_size):
                idx = order[s:s + args.batch_size]
                x, tt, m = make_batch(ev_ids, ev_types, idx)
                logits[idx] = model(x, tt, m).float().numpy()
        secs = time.perf_counter() - t0
        model.train()
        return metrics_from_logits(logits, ev_y, classes), secs

    def step_on(idx, pad_to=None):
        x, tt, m = make_batch(tr_ids, tr_types, idx, pad_to)
        y = torch.from_numpy(tr_y[idx])
        meter.reset()
        if args.no_memory:
            logits = model(x, tt, m)
        else:
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                logits = model(x, tt, m)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss, tuple(x.shape)

    model.train()
    step, train_secs = 0, 0.0
    losses, history = [], []
    best = None
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        seen = 0
        act_max, act_max_shape, act_sum, par_at_max, steps_here = 0, None, 0, 0, 0
        for idx in batches_by_length(lens, args.batch_size, args.seed + epoch):
            if step >= total:
                break
            loss, shape = step_on(idx)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            lv = float(loss.item())
            if not math.isfinite(lv):
                die(f"loss became {lv} at step {step}")
            act, par = meter.totals()
            if act > act_max:
                act_max, act_max_shape, par_at_max = act, list(shape), par
            act_sum += act
            steps_here += 1
            losses.append(lv)
            seen += len(idx)
            if step % args.log_every == 0 or step + 1 == total:
                el = time.perf_counter() - t0
                log(f"step {step}: loss {lv:.4f}, lr {lr:.2e}, {seen / max(el, 1e-9):.2f} examples/s")
            step += 1
        secs = time.perf_counter() - t0
        train_secs += secs
        m, es = evaluate()
        improved = best is None or m["accuracy"] > best[1]["accuracy"]
        if improved:
            best = (epoch, m)
        load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None
        rec = {"epoch": epoch + 1, "step": step, "train_examples": seen, "train_seconds": secs,
               "train_examples_per_s": seen / max(secs, 1e-9), "eval_seconds": es,
               "eval_examples_per_s": m["examples"] / max(es, 1e-9),
               **{f"eval_{k}": v for k, v in m.items()},
               "activation_bytes_max_step": None if args.no_memory else act_max,
               "activation_max_step_shape": act_max_shape,
               "saved_param_bytes_at_max_step": None if args.no_memory else par_at_max,
               "activation_bytes_mean_step": None if args.no_memory else act_sum / max(steps_here, 1),
               "peak_rss_mib": rss_mib(), "loadavg_at_end": load}
        history.append(rec)
        mem = "" if args.no_memory else (f"; activations max {act_max / 2**20:.1f} MiB at {act_max_shape}, "
                                         f"mean {rec['activation_bytes_mean_step'] / 2**20:.1f} MiB")
        log(f"epoch {epoch + 1}: eval accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}"
            f"{'  (best)' if improved else ''}; train {rec['train_examples_per_s']:.2f} examples/s over {secs:.1f} s"
            f"{mem}; peak RSS {rec['peak_rss_mib']:.0f} MiB; load {' '.join(load or [])}")
        if step >= total:
            break

    # One step on a fixed [batch, max_length] shape (no update): the activation memory to set beside rime's.
    fixed = None
    peak_rss_training = rss_mib()
    if not args.no_memory:
        idx = sorted(range(n), key=lambda i: -lens[i])[:args.batch_size]
        _, shape = step_on(idx, pad_to=args.max_length)
        opt.zero_grad(set_to_none=True)
        act, par = meter.totals()
        fixed = {"shape": list(shape), "activation_bytes": act, "saved_param_bytes": par,
                 "peak_rss_mib_after": rss_mib()}
        log(f"activation memory of one step at {list(shape)}: {act / 2**20:.1f} MiB "
            f"(+ {par / 2**20:.1f} MiB of saved frozen weights, not counted)")

    if args.adapter_out:
        model.save_pretrained(args.adapter_out)
    last = history[-1]
    summary = {
        "tool": "pytorch+peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
        "model": str(model_dir), "train": args.train, "eval": args.eval,
        "text_column": args.text_column, "text_pair_column": args.text_pair_column, "label_column": args.label_column,
        "labels": names, "device": "cpu", "threads": args.threads,
        "attn_implementation": backbone.config._attn_implementation,
        "train_examples": n, "eval_examples": int(len(ev_y)), "truncated_rows": tr_trunc + ev_trunc,
        "epochs": len(history), "steps": step, "batch_size": args.batch_size, "max_length": args.max_length,
        "lr": args.lr, "weight_decay": args.weight_decay, "rank": args.rank, "alpha": args.alpha,
        "targets": args.targets, "lora_dropout": args.lora_dropout, "schedule": args.schedule,
        "warmup_ratio": args.warmup_ratio, "max_grad_norm": args.max_grad_norm, "seed": args.seed,
        "trainable_params": trainable,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "eval_accuracy": best[1]["accuracy"], "eval_macro_f1": best[1]["macro_f1"], "eval_loss": best[1]["loss"],
        "best_epoch": best[0] + 1,
        "last_eval_accuracy": last["eval_accuracy"], "last_eval_macro_f1": last["eval_macro_f1"],
        "train_seconds": train_secs, "train_examples_per_s": sum(h["train_examples"] for h in history) / max(train_secs, 1e-9),
        "load_seconds": load_secs,
        "activation_fixed_step": fixed,
        "peak_rss_mib": peak_rss_training,
        "history": history,
    }
    log(f"best epoch {summary['best_epoch']}: test accuracy {summary['eval_accuracy']:.4f}, macro-F1 "
        f"{summary['eval_macro_f1']:.4f}; {summary['train_examples_per_s']:.2f} train examples/s over "
        f"{train_secs:.1f} s; peak RSS {summary['peak_rss_mib']:.0f} MiB")
    line = json.dumps(summary)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


def main() -> int:
    default_model = os.path.join(os.environ.get("RIME_MODELS", "/work/models"), "all-minilm-l6-v2")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=default_model, help="Hugging Face BERT folder (default $RIME_MODELS/all-minilm-l6-v2)")
    p.add_argument("--train", required=True, help="training JSONL")
    p.add_argument("--eval", required=True, help="evaluation JSONL (same columns)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", default=None, help="second text of sentence pairs (encoded as a pair)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="query,value")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="constant")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="transformers' attention implementation")
    p.add_argument("--no-memory", action="store_true", help="skip the saved-tensor accounting")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the summary JSON line here")
    p.add_argument("--adapter-out", default=None, help="save the peft adapter (LoRA + head) here")
    args = p.parse_args()
    for name in ("epochs", "batch_size", "max_length", "rank", "threads"):
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.max_length < 3:
        die(f"--max-length must be at least 3 (got {args.max_length})")
    if args.max_steps is not None and args.max_steps < 1:
        die(f"--max-steps must be at least 1 (got {args.max_steps})")
    if not 0 <= args.lora_dropout < 1:
        die(f"--lora-dropout must be in [0, 1) (got {args.lora_dropout})")
    if not 0 <= args.warmup_ratio <= 1:
        die(f"--warmup-ratio must be in [0, 1] (got {args.warmup_ratio})")
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
