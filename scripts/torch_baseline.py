"""PyTorch + peft baseline for `rime bench` (the same cases, measured side by side on one machine).

MiniLM LoRA training step (r=8, alpha=16, query+value, linear head on the mean pool, AdamW, batch 32,
sequence 128) with random weights of MiniLM's architecture (speed does not depend on the values), and f32
matmuls. Prints one JSON object per case. Usage: python3 scripts/torch_baseline.py [cpu|cuda]
"""
import json, sys, time
import torch

dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
if dev == "cpu":
    torch.set_num_threads(2)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

def sync():
    if dev == "cuda":
        torch.cuda.synchronize()

for n in (512, 1024, 2048, 4096):
    a = torch.randn(n, n, device=dev); b = torch.randn(n, n, device=dev)
    for _ in range(3):
        a @ b
    sync(); runs = []
    for _ in range(10):
        t = time.perf_counter(); a @ b; sync(); runs.append(time.perf_counter() - t)
    runs.sort()
    print(json.dumps({"name": f"torch_matmul_{n}", "shape": [n, n, n], "gflops": 2 * n**3 / runs[len(runs) // 2] / 1e9, "device": dev}))

from transformers import BertConfig, BertModel
from peft import LoraConfig, get_peft_model

cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512, hidden_act="gelu",
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
base = BertModel(cfg)
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])).to(dev)
head = torch.nn.Linear(384, 2).to(dev)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-3, weight_decay=0.01)
B, T = 32, 128
ids = torch.randint(0, 30522, (B, T), device=dev)
mask = torch.ones(B, T, device=dev, dtype=torch.long)
labels = torch.randint(0, 2, (B,), device=dev)

def step():
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
    loss = torch.nn.functional.cross_entropy(head(pooled), labels)
    opt.zero_grad(); loss.backward(); opt.step()
    return loss

for _ in range(3):
    step()
sync(); t = time.perf_counter()
for _ in range(20):
    step()
sync(); dt = (time.perf_counter() - t) / 20
print(json.dumps({"name": "torch_train_step_minilm_lora", "shape": [B, T], "examples_per_s": B / dt, "seconds_per_step": dt, "device": dev}))
