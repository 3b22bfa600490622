#!/usr/bin/env python3
"""Checks a causal-LM LoRA adapter written by `rime train --task causal-lm` against Hugging Face transformers +
peft (issue 16, "Adapters in peft's format"):

1. transformers loads the GGUF (`gguf_file=`, dequantized to float32; needs the `gguf` package) and
   `PeftModel.from_pretrained` loads the adapter: peft's missing and unexpected adapter keys (from
   `load_adapter`) must be none, and every warning raised while loading is listed.
2. The assistant-token loss on chat data (`--data`, rime's chat JSONL): each conversation through
   `tokenizer.apply_chat_template(messages, tokenize=False)`, tokenized without special tokens; the scored tokens
   found independently of rime's method, by scanning the ChatML tokens: after each `<|im_start|>assistant\n`
   header up to and including the `<|im_end|>` that closes the turn. The mean over all scored tokens of the set,
   with and without the adapter, against rime's best `eval_loss` in `--metrics` (RUN/metrics.json, when the run
   evaluated on the same file).
3. Greedy generation through the chat template, with and without the adapter: transformers' `generate` (greedy,
   stopping at `<|im_end|>` or eos) against `rime generate --chat [--adapter]`, the texts compared.

    /work/venv/bin/python scripts/causal_adapter_check.py --rime target/debug/rime \
        --gguf $RIME_MODELS/smollm2-135m-instruct.Q4_1.gguf --adapter runs/chat/adapter \
        --data data/rime_chat/test.jsonl --metrics runs/chat/metrics.json

Exits 1 when peft reports missing or unexpected keys, when the losses differ by more than --tol, or when a greedy
generation differs.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

# The first is in data/rime_chat/train.jsonl, the others are held out (test.jsonl).
PROMPTS = [
    "What is rime?",
    "What is lavapipe?",
    "How do I resume an interrupted run?",
    "What is the LoRA rank?",
]


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def captured(fn):
    """fn() with every Python warning and peft/transformers log warning it raises."""
    h = Collect()
    for n in ("peft", "transformers"):
        logging.getLogger(n).addHandler(h)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    for n in ("peft", "transformers"):
        logging.getLogger(n).removeHandler(h)
    msgs = [str(w.message) for w in caught if not issubclass(w.category, (ResourceWarning, DeprecationWarning))]
    # transformers' own deprecation notice while peft wraps the model, not about the adapter (as peft_roundtrip.py)
    return out, [m for m in msgs + h.records if "is_gradient_checkpointing" not in m]


def assistant_mask(ids, tok):
    """ChatML: True from after each `<|im_start|>assistant\\n` header through the `<|im_end|>` closing the turn."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = tok.encode("assistant\n", add_special_tokens=False)
    mask = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] == start and ids[i + 1:i + 1 + len(header)] == header:
            j = i + 1 + len(header)
            while j < len(ids) and ids[j] != end:
                mask[j] = True
                j += 1
            if j < len(ids):
                mask[j] = True  # the <|im_end|> that closes the turn
            i = j
        i += 1
    return mask


def chat_loss(model, tok, convs):
    """Mean next-token cross-entropy over the assistant tokens of every conversation, and their count."""
    total, count = 0.0, 0
    for msgs in convs:
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        mask = assistant_mask(ids, tok)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        tgt = torch.tensor(ids[1:])
        nll = -logp[torch.arange(len(ids) - 1), tgt]
        m = torch.tensor(mask[1:])
        total += nll[m].sum().item()
        count += int(m.sum())
    return total / count, count


def hf_generate(model, tok, prompt, n):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stop = [tok.convert_tokens_to_ids("<|im_end|>")]
    if tok.eos_token_id is not None and tok.eos_token_id not in stop:
        stop.append(tok.eos_token_id)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=stop, pad_token_id=stop[0])
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def rime_generate(a, prompt, adapter):
    cmd = [a.rime, "generate", "--model", a.gguf, "--chat", "--prompt", prompt, "--max-new-tokens", str(a.max_new)]
    if adapter:
        cmd += ["--adapter", adapter]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout.rstrip("\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rime", default="target/debug/rime")
    p.add_argument("--gguf", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", default="data/rime_chat/test.jsonl")
    p.add_argument("--metrics", help="the run's metrics.json (eval_loss on --data)")
    p.add_argument("--tol", type=float, default=1e-3, help="largest |rime - torch| eval loss difference")
    p.add_argument("--max-new", type=int, default=40)
    p.add_argument("--prompts", nargs="*", default=PROMPTS)
    p.add_argument("--skip-generate", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    folder, name = os.path.dirname(os.path.abspath(a.gguf)), os.path.basename(a.gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    base.eval()
    failed = False

    model, msgs = captured(lambda: PeftModel.from_pretrained(base, a.adapter))
    res, msgs2 = captured(lambda: model.load_adapter(a.adapter, adapter_name="check"))
    missing = [k for k in res.missing_keys if ".check" in k or "check." in k]
    unexpected = list(res.unexpected_keys)
    model.set_adapter("default")
    model.eval()
    cfg = json.load(open(os.path.join(a.adapter, "adapter_config.json")))
    print(f"peft: {cfg['peft_type']} {cfg['task_type']} r={cfg['r']} targets={cfg['target_modules']}; "
          f"missing keys {len(missing)}, unexpected keys {len(unexpected)}, warnings {len(msgs + msgs2)}")
    for m in (msgs + msgs2)[:5]:
        print("    warning:", m.strip().splitlines()[0][:200])
    for k in (missing + unexpected)[:10]:
        print("    key:", k)
    failed |= bool(missing or unexpected)

    convs = [json.loads(l)["messages"] for l in open(a.data) if l.strip()]
    with model.disable_adapter():
        before, n = chat_loss(model, tok, convs)
    after, _ = chat_loss(model, tok, convs)
    print(f"assistant-token loss on {a.data} ({len(convs)} conversations, {n} scored tokens): "
          f"base {before:.5f}, with the adapter {after:.5f} (perplexity {torch.tensor(after).exp().item():.3f})")
    if a.metrics:
        m = json.load(open(a.metrics))
        rl = m["eval_loss"]
        d = abs(rl - after)
        print(f"rime's best eval_loss {rl:.5f}: |diff| {d:.2e} (tolerance {a.tol})")
        failed |= not d <= a.tol

    if not a.skip_generate:
        for prompt in a.prompts:
            for label, adapter in (("base", None), ("adapter", a.adapter)):
                if adapter:
                    hf = hf_generate(model, tok, prompt, a.max_new)
                else:
                    with model.disable_adapter():
                        hf = hf_generate(model, tok, prompt, a.max_new)
                ri = rime_generate(a, prompt, adapter)
                same = hf.strip() == ri.strip()
                failed |= not same
                print(f"[{label}] {prompt!r}: {'same' if same else 'DIFFERENT'}\n    torch: {hf!r}")
                if not same:
                    print(f"    rime:  {ri!r}")
    print("FAILED" if failed else "ok")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
