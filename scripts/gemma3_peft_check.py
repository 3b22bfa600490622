"""Loads a LoRA adapter that `rime train --task causal-lm` wrote for Gemma 3 270M into Hugging Face peft on the
transformers-loaded GGUF (`Gemma3ForCausalLM`), reports peft's missing/unexpected-key warnings, and prints the
greedy continuation of a prompt with the adapter, to compare with `rime generate --adapter`.

    /work/venv/bin/python scripts/gemma3_peft_check.py GGUF ADAPTER_DIR "prompt" [N_TOKENS]
"""
import logging
import os
import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    gguf, adapter, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    folder, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    h = Collect()
    logging.getLogger().addHandler(h)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter)
    msgs = [str(x.message) for x in w] + h.records
    bad = [m for m in msgs if "missing" in m.lower() or "unexpected" in m.lower()]
    print("peft warnings about keys:", bad if bad else "none")
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
    print("greedy with the adapter:", out.tolist(), repr(tok.decode(out)))
    sys.exit(1 if bad else 0)


main()
