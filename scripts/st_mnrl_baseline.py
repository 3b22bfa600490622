#!/usr/bin/env python3
"""sentence-transformers anchor for rime's embedding task (issue 15): contrastive fine-tuning of all-MiniLM-L6-v2 with
MultipleNegativesRankingLoss (scale 20, cosine), optionally wrapped in MatryoshkaLoss, then retrieval on held-out pairs.

Data: JSON lines {"anchor", "positive", "negative"} as written by scripts/fetch-snli.sh (the defaults are the
committed demo slice, data/snli_demo/). Training: the first --train-limit rows, shuffled with --seed into batches
of --batch-size (the last one may be short, as the HF trainer's default), AdamW with linear warmup (--warmup-ratio)
and linear decay, for --epochs (or exactly --steps). The candidates of each anchor are the batch's positives and,
unless --no-hard-negatives, its negatives too (MNRL's in-batch negatives). With --matryoshka D1,D2,...: the same
loss on each prefix of the embedding (truncate, then cosine), summed with equal weights (MatryoshkaLoss).

Evaluation (frozen model before training, and after): queries are the held-out anchors, the corpus is the distinct
held-out positives (duplicate positive texts are kept once; a query's answer is its positive's text); cosine
similarity on the embedding truncated to each dim and re-normalized; recall@1, recall@10 and MRR (full ranking, no
cut-off; ties count against the answer). Reports training examples/s (training loop only, no evaluation) and
peak RSS (resource.getrusage). Runs on CPU with --threads torch threads.

  python scripts/st_mnrl_baseline.py --train-limit 2000 --batch-size 32 --epochs 1 --matryoshka 32,64,128,256,384 \
      --json runs/st_mnrl_mrl.json
"""
import argparse
import json
import math
import os
import random
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def die(msg):
    print(f"st_mnrl_baseline: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("RIME_MINILM", "/work/models/all-minilm-l6-v2"),
                   help="sentence-transformers folder, or a plain HF BERT folder (mean pooling is added)")
    p.add_argument("--train", default=os.path.join(REPO, "data/snli_demo/train.jsonl"))
    p.add_argument("--test", default=os.path.join(REPO, "data/snli_demo/test.jsonl"))
    p.add_argument("--train-limit", type=int, default=2000, help="first N training triplets (0: all)")
    p.add_argument("--eval-limit", type=int, default=0, help="first N held-out pairs (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=0, help="exact number of optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--scale", type=float, default=20.0, help="MNRL scale (inverse temperature)")
    p.add_argument("--matryoshka", default="", help="comma-separated increasing dims, e.g. 32,64,128,256,384")
    p.add_argument("--eval-dims", default="32,64,128,256,384", help="dims evaluated (always includes the full dim)")
    p.add_argument("--no-hard-negatives", action="store_true", help="train on (anchor, positive) pairs only")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--save", default="", help="save the fine-tuned model to this folder")
    return p.parse_args()


def parse_dims(text, flag, hidden):
    try:
        dims = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        die(f"{flag} {text!r}: not a comma-separated list of integers")
    if any(d <= 0 for d in dims) or any(b <= a for a, b in zip(dims, dims[1:])):
        die(f"{flag} {text!r}: dims must be positive and increasing")
    if dims and dims[-1] > hidden:
        die(f"{flag} {text!r}: {dims[-1]} is above the embedding size {hidden}")
    return dims


def read_triplets(path, limit, need_negative):
    if not os.path.exists(path):
        die(f"{path} not found (run scripts/fetch-snli.sh, or pass --train/--test)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                die(f"{path}:{lineno}: not JSON ({e})")
            keys = ("anchor", "positive", "negative") if need_negative else ("anchor", "positive")
            for k in keys:
                v = obj.get(k)
                if not isinstance(v, str) or not v.strip():
                    die(f"{path}:{lineno}: field {k!r} is missing or empty")
            rows.append(obj)
    if limit and len(rows) < limit:
        print(f"st_mnrl_baseline: note: {path} has {len(rows)} rows, fewer than the limit {limit}", file=sys.stderr)
    return rows


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main():
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    import sentence_transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    t0 = time.perf_counter()
    # a plain HF folder (no modules.json) gets sentence-transformers' default modules: Transformer + mean Pooling
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.max_seq_length
    hidden = model.get_embedding_dimension()
    load_s = time.perf_counter() - t0

    mrl_dims = parse_dims(args.matryoshka, "--matryoshka", hidden)
    eval_dims = parse_dims(args.eval_dims, "--eval-dims", hidden)
    if hidden not in eval_dims:
        eval_dims.append(hidden)
    eval_dims = sorted(set(eval_dims) | set(mrl_dims))

    use_neg = not args.no_hard_negatives
    train = read_triplets(args.train, args.train_limit, use_neg)
    test = read_triplets(args.test, args.eval_limit, False)
    if len(train) < args.batch_size:
        die(f"{args.train}: {len(train)} rows, fewer than --batch-size {args.batch_size}")

    # held-out retrieval set: queries = anchors, corpus = distinct positives
    corpus, corpus_index = [], {}
    for r in test:
        if r["positive"] not in corpus_index:
            corpus_index[r["positive"]] = len(corpus)
            corpus.append(r["positive"])
    queries = [r["anchor"] for r in test]
    gold = torch.tensor([corpus_index[r["positive"]] for r in test])

    def evaluate():
        model.eval()
        t = time.perf_counter()
        with torch.no_grad():
            q = model.encode(queries, batch_size=args.eval_batch_size, convert_to_tensor=True,
                             normalize_embeddings=False, show_progress_bar=False).float()
            c = model.encode(corpus, batch_size=args.eval_batch_size, convert_to_tensor=True,
                             normalize_embeddings=False, show_progress_bar=False).float()
        out = {}
        for d in eval_dims:
            qd = torch.nn.functional.normalize(q[:, :d], dim=-1)
            cd = torch.nn.functional.normalize(c[:, :d], dim=-1)
            s = qd @ cd.T
            g = s.gather(1, gold[:, None])
            rank = (s > g).sum(1)  # 0-based rank of the answer
            out[str(d)] = {"recall@1": (rank < 1).float().mean().item(),
                           "recall@10": (rank < 10).float().mean().item(),
                           "mrr": (1.0 / (rank.float() + 1)).mean().item()}
        return out, time.perf_counter() - t

    before, eval_s_before = evaluate()
    rss_after_eval = peak_rss_mib()

    base_loss = losses.MultipleNegativesRankingLoss(model, scale=args.scale)
    loss_fn = losses.MatryoshkaLoss(model, base_loss, matryoshka_dims=mrl_dims) if mrl_dims else base_loss

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.steps if args.steps > 0 else max(1, round(steps_per_epoch * args.epochs))
    warmup = int(math.ceil(total_steps * args.warmup_ratio))
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    named = [(n, p) for n, p in loss_fn.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))

    rng = random.Random(args.seed)
    order, step, examples, losses_seen = [], 0, 0, []
    model.train()
    t_train = time.perf_counter()
    while step < total_steps:
        if not order:
            order = list(range(len(train)))
            rng.shuffle(order)
        idx, order = order[:args.batch_size], order[args.batch_size:]
        batch = [train[i] for i in idx]
        cols = ["anchor", "positive"] + (["negative"] if use_neg else [])
        features = []
        for col in cols:
            feats = model.preprocess([r[col] for r in batch])
            features.append({k: v.to(model.device) if hasattr(v, "to") else v for k, v in feats.items()})
        loss = loss_fn(features, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        examples += len(batch)
        losses_seen.append(loss.item())
        if step == 1 or step % 20 == 0 or step == total_steps:
            print(f"step {step}/{total_steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}", file=sys.stderr)
    train_s = time.perf_counter() - t_train
    rss_after_train = peak_rss_mib()

    after, eval_s_after = evaluate()
    if args.save:
        model.save(args.save)

    import transformers
    result = {
        "model": args.model, "train": args.train, "test": args.test,
        "train_rows": len(train), "test_queries": len(queries), "test_corpus": len(corpus),
        "batch_size": args.batch_size, "steps": total_steps, "epochs": args.epochs, "lr": args.lr,
        "warmup_steps": warmup, "weight_decay": args.weight_decay, "scale": args.scale,
        "hard_negatives": use_neg, "matryoshka": mrl_dims, "max_seq_length": args.max_seq_length,
        "seed": args.seed, "threads": args.threads,
        "loss_first": losses_seen[0], "loss_last": losses_seen[-1],
        "loss_last10_mean": sum(losses_seen[-10:]) / len(losses_seen[-10:]),
        "train_s": train_s, "train_examples_per_s": examples / train_s,
        "eval_s": [eval_s_before, eval_s_after], "load_s": load_s,
        "peak_rss_mib": rss_after_train, "peak_rss_mib_before_training": rss_after_eval,
        "before": before, "after": after,
        "versions": {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }

    label = "MNRL" + (f" + Matryoshka {','.join(map(str, mrl_dims))}" if mrl_dims else "")
    print(f"\n{label}: {len(train)} triplets, batch {args.batch_size}, {total_steps} steps, lr {args.lr}, seed {args.seed}; "
          f"held-out {len(queries)} queries over {len(corpus)} positives")
    print("| dim | R@1 before | R@1 after | R@10 before | R@10 after | MRR before | MRR after |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for d in eval_dims:
        b, a = before[str(d)], after[str(d)]
        print(f"| {d} | {b['recall@1']:.4f} | {a['recall@1']:.4f} | {b['recall@10']:.4f} | {a['recall@10']:.4f} | "
              f"{b['mrr']:.4f} | {a['mrr']:.4f} |")
    print(f"train: {examples} examples in {train_s:.1f} s = {examples / train_s:.2f} examples/s "
          f"({args.threads} torch thread(s)); loss {losses_seen[0]:.4f} -> {losses_seen[-1]:.4f}; "
          f"peak RSS {rss_after_train:.0f} MiB (after the first evaluation: {rss_after_eval:.0f} MiB)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
