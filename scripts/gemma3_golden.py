"""Golden outputs of Gemma 3 270M (the Q4_K_M GGUF) from transformers, for crates/rime-models/tests/gemma.rs.

transformers loads the GGUF with `gguf_file=` (the `gguf` package dequantizes every tensor to f32, as rime
does; Gemma's norm gains lose llama.cpp's +1 and regain it in Gemma3RMSNorm), runs the fixed prompt in f32 on
the CPU with eager attention, and writes:
  input_ids     [T]        the prompt's ids (BOS first), which rime's tokenizer must reproduce
  logits_last3  [3, V]     logits of the last three positions over the whole vocabulary (f32, 3 MB)
  argmax        [T]        argmax of every position
  greedy        [8]        generate(do_sample=False, max_new_tokens=8) after the prompt
and the prompt in the file's metadata.

Usage: /work/venv/bin/python scripts/gemma3_golden.py [GGUF] [OUT]
  GGUF defaults to $RIME_MODELS/gemma-3-270m-q4_k_m.gguf (scripts/fetch-models.sh puts it there),
  OUT to crates/rime-models/tests/data/gemma3_270m_golden.safetensors.
Needs torch, transformers and gguf (pip install gguf).
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "The quick brown fox jumps over the lazy dog. Fine-tuning a small language model on a laptop"

here = os.path.dirname(os.path.abspath(__file__))
gguf = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("RIME_MODELS", os.path.join(here, "..", "models")), "gemma-3-270m-q4_k_m.gguf")
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "crates", "rime-models", "tests", "data", "gemma3_270m_golden.safetensors")

folder, name = os.path.split(os.path.abspath(gguf))
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager")
model.eval()

ids = tok(PROMPT, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0].float()
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]

print("config:", {k: getattr(model.config, k, None) for k in ["head_dim", "sliding_window", "query_pre_attn_scalar", "rope_parameters", "layer_types", "final_logit_softcapping", "rms_norm_eps"]})
print("prompt ids:", ids[0].tolist())
print("argmax:", logits.argmax(-1).tolist())
print("greedy:", gen.tolist(), repr(tok.decode(gen)))
save_file(
    {
        "input_ids": ids[0].to(torch.int64).contiguous(),
        "logits_last3": logits[-3:].contiguous(),
        "argmax": logits.argmax(-1).to(torch.int64).contiguous(),
        "greedy": gen.to(torch.int64).contiguous(),
    },
    out,
    metadata={"prompt": PROMPT, "source": "transformers Gemma3ForCausalLM, gguf_file=" + name},
)
print("wrote", out, os.path.getsize(out), "bytes")
