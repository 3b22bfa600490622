#!/usr/bin/env python3
"""PyTorch + Hugging Face peft side of rime's causal-LM LoRA step (issue 16's memory and speed table).

transformers loads the same GGUF rime trains (`gguf_file=`, dequantized to f32 by the `gguf` package), peft puts
LoRA r=8, alpha 16 on q_proj and v_proj of every layer (rime's causal-LM default: 60 modules on SmolLM2), dropout
0; AdamW(lr 1e-4, weight decay 0.01); every batch is `--batch-size` rows of exactly `--max-length` tokens of a
JSONL text column (rows shorter than that are skipped, longer ones cut: the fixed-shape step rime's table
measures), loss = next-token cross-entropy over every position. Reports per-step wall time after one warm-up
step, tokens/s, peak RSS and the bytes autograd saves for backward in one step.

    /work/venv/bin/python scripts/peft_causal_baseline.py --model $RIME_MODELS/smollm2-135m-instruct.Q4_1.gguf \
        --train /tmp/long.jsonl --batch-size 2 --max-length 256 --steps 3 --threads 2
"""

import argparse
import json
import os
import resource
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--train", required=True, help="JSONL with a text column")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    folder, name = os.path.split(os.path.abspath(a.model))
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    load_s = time.time() - t0
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
    )
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    rows = []
    with open(a.train) as f:
        for line in f:
            ids = tok(json.loads(line)[a.text_column])["input_ids"]
            if len(ids) >= a.max_length:
                rows.append(ids[: a.max_length])
    need = a.batch_size * (a.steps + 1)
    if len(rows) < need:
        raise SystemExit(f"{a.train}: {len(rows)} rows of at least {a.max_length} tokens, {need} needed")

    def batch(i):
        return torch.tensor(rows[i * a.batch_size : (i + 1) * a.batch_size])

    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.device.type == "cpu" else 0)
        return t

    times, losses = [], []
    for step in range(a.steps + 1):
        x = batch(step)
        s0 = time.perf_counter()
        if step == 1:
            saved.clear()
            ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        else:
            ctx = None
        if ctx:
            with ctx:
                out = model(input_ids=x, labels=x)
        else:
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - s0
        losses.append(out.loss.item())
        if step > 0:
            times.append(dt)
    step_s = sorted(times)[len(times) // 2]
    res = {
        "tool": "pytorch+peft",
        "versions": {"torch": torch.__version__},
        "model": a.model,
        "batch": [a.batch_size, a.max_length],
        "threads": a.threads,
        "trainable_params": trainable,
        "load_seconds": load_s,
        "step_seconds_median": step_s,
        "examples_per_s": a.batch_size / step_s,
        "tokens_per_s": a.batch_size * a.max_length / step_s,
        "losses": losses,
        "saved_for_backward_bytes_upper_bound": sum(saved),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
