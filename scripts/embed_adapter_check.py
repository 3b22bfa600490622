"""Checks an embedding adapter written by `rime train --task embedding` against Hugging Face peft: loads it on the
bare encoder (`AutoModel` + `PeftModel.from_pretrained`, reporting any warning peft or transformers raises, e.g.
missing or unexpected keys), embeds a few sentences the sentence-transformers way (mean pool over the mask, the
first DIM values, L2-normalized) and compares them with `rime embed --adapter ADAPTER --dim DIM` on the same texts.

    /work/venv/bin/python scripts/embed_adapter_check.py RIME_BINARY MODEL_DIR ADAPTER_DIR [DIM]
"""
import json
import logging
import subprocess
import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

TEXTS = [
    "A man is eating food.",
    "A person on a horse jumps over a broken down airplane.",
    "Children smiling and waving at camera",
    "The kids are frowning",
]


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    rime, model_dir, adapter = sys.argv[1:4]
    dim = int(sys.argv[4]) if len(sys.argv) > 4 else None
    handler = Collect()
    for name in ("peft", "transformers"):
        logging.getLogger(name).addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = AutoModel.from_pretrained(model_dir)
        model = PeftModel.from_pretrained(base, adapter).eval()
    # transformers' own deprecation notices say nothing about the adapter
    notes = [n for n in handler.records + [str(w.message) for w in caught] if "deprecated" not in n]
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if dim:
        pooled = pooled[:, :dim]
    ref = torch.nn.functional.normalize(pooled, dim=-1)
    cmd = [rime, "embed", "--model", model_dir, "--adapter", adapter] + (["--dim", str(dim)] if dim else []) + TEXTS
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    got = torch.tensor([json.loads(line)["embedding"] for line in out.splitlines()])
    diff = (got - ref).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item()
    base_out = subprocess.run([rime, "embed", "--model", model_dir] + (["--dim", str(dim)] if dim else []) + TEXTS,
                              capture_output=True, text=True, check=True).stdout
    frozen = torch.tensor([json.loads(line)["embedding"] for line in base_out.splitlines()])
    moved = (frozen - ref).abs().max().item()
    print(json.dumps({"adapter": adapter, "dim": dim or got.shape[1], "peft_warnings": notes,
                      "max_abs_diff_rime_vs_peft": diff, "min_cosine": cos,
                      "max_abs_diff_frozen_vs_peft": moved}, indent=1))
    ok = diff < 1e-4 and not notes and moved > 10 * diff
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
