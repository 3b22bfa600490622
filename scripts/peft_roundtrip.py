"""Hugging Face round trip (issue 14): adapters rime trains, loaded by peft + transformers, and adapters peft
trains, loaded by `rime eval` / `rime embed`; logits (and embeddings) compared, every warning peft and
transformers raise while loading an adapter captured.

rime → PyTorch, for every method rime trains on BERT (lora, dora, pissa init, rslora, ia3, prompt, prefix) and
both heads:
  - `--head hf`: loaded as a user would, `AutoModelForSequenceClassification.from_pretrained(BASE, id2label=...)`
    then `PeftModel.from_pretrained(model, ADAPTER)` (what `AutoPeftModelForSequenceClassification` does), labels
    from the adapter's rime.json;
  - `--head mean`: transformers has no such class; the few lines of `MeanPooled` below rebuild it (a BertModel
    with a `head` Linear on the mask-weighted mean of the real tokens) and peft loads the adapter into it.
PyTorch's logits vs `rime eval --logits` on the same texts (max abs difference), and peft's missing / unexpected
adapter keys and warnings (all must be none).

PyTorch → rime, for lora, dora, rslora, ia3, prompt, prefix: a tiny peft adapter trained in PyTorch on
BertForSequenceClassification (task_type SEQ_CLS, peft's defaults: `classifier` trained, pooler frozen), saved by
peft as it is (no rime.json; labels are class ids), then `rime eval --logits` and `rime embed --no-normalize`
against PyTorch's logits and mean-pooled last hidden states.

    /work/venv/bin/python scripts/peft_roundtrip.py [--rime target/debug/rime] [--model DIR] [--steps N]
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings

import torch
from peft import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType,
                  get_peft_model)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification, BertModel
from transformers.modeling_outputs import SequenceClassifierOutput

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
MAX_LEN = 64


class MeanPooled(BertModel):
    """rime's `--head mean` in PyTorch: a linear `head` on the mean of the real tokens' last hidden states."""

    prompt_tokens = 0  # soft-prompt rows in front (prompt tuning): not pooled

    def __init__(self, config):
        super().__init__(config, add_pooling_layer=False)
        self.head = torch.nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                past_key_values=None, labels=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in ("position_ids",)}
        # transformers 5's BertModel takes peft's prefix as `cache` (it has no `past_key_values`).
        h = super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            inputs_embeds=inputs_embeds, cache=past_key_values, **kwargs).last_hidden_state
        m = attention_mask[:, -h.shape[1]:].clone().to(h.dtype)  # prefix tuning: keys only have the prefix
        m[:, :self.prompt_tokens] = 0
        pooled = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
        return SequenceClassifierOutput(logits=self.head(pooled))


class BertForSequenceClassificationWithCache(BertForSequenceClassification):
    """peft 0.21.2's prefix tuning under transformers 5.25: peft hands the prefix to a `past_key_values` argument
    that neither BertForSequenceClassification nor BertModel has any more (BertModel calls it `cache`), and raises
    "Model does not support past key values" for its own prefix adapters too. This shim passes it on; the head is
    BertForSequenceClassification's, unchanged."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, past_key_values=None, **kwargs):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds, cache=past_key_values)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(out.pooler_output)),
                                        hidden_states=(out.last_hidden_state,))


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
    msgs = [m for m in msgs + h.records if "is_gradient_checkpointing" not in m]
    return out, msgs


def rows(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def write(path, items):
    with open(path, "w") as f:
        for x in items:
            f.write(json.dumps(x) + "\n")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout


def torch_logits(model, tok, texts):
    model.eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        return model(**enc).logits.float()


def torch_embed(model, tok, texts, prompt_tokens):
    """Mean of the real tokens' last hidden states (rime embed --no-normalize)."""
    model.eval()
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        h = model(**enc, output_hidden_states=True).hidden_states[-1]
        h = h[:, prompt_tokens:]
        m = enc["attention_mask"].to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


RIME_METHODS = {
    "lora": ["--method", "lora", "--rank", "4", "--alpha", "8"],
    "dora": ["--method", "lora", "--rank", "4", "--alpha", "8", "--dora"],
    "pissa": ["--method", "lora", "--rank", "4", "--alpha", "8", "--init", "pissa"],
    "rslora": ["--method", "lora", "--rank", "4", "--alpha", "8", "--rslora"],
    "ia3": ["--method", "ia3"],
    "prompt": ["--method", "prompt", "--num-virtual-tokens", "4", "--lr", "3e-2"],
    "prefix": ["--method", "prefix", "--num-virtual-tokens", "4", "--lr", "1e-2"],
}


def rime_to_torch(a, work, tok, texts):
    out = []
    for head in ("hf", "mean"):
        for name, flags in RIME_METHODS.items():
            if a.methods and name not in a.methods.split(","):
                continue
            d = os.path.join(work, f"rime-{name}-{head}")
            run([a.rime, "train", "--model", a.model, "--train", a.train, "--eval", a.eval, *flags, "--head", head,
                 "--max-steps", str(a.steps), "--batch-size", "8", "--max-length", str(MAX_LEN), "--out", d,
                 "--force", "--save-every", "0"])
            adapter = os.path.join(d, "best")
            lpath = os.path.join(d, "logits.jsonl")
            run([a.rime, "eval", "--model", a.model, "--adapter", adapter, "--data", a.eval, "--max-length",
                 str(MAX_LEN), "--logits", lpath])
            want = torch.tensor([r["logits"] for r in rows(lpath)])
            labels = json.load(open(os.path.join(adapter, "rime.json")))["rime_labels"]
            id2label = dict(enumerate(labels))
            label2id = {l: i for i, l in enumerate(labels)}
            cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
            if head == "hf":
                cls = BertForSequenceClassificationWithCache if name == "prefix" else AutoModelForSequenceClassification
                base = cls.from_pretrained(a.model, id2label=id2label, label2id=label2id)
            else:
                MeanPooled.prompt_tokens = cfg.get("num_virtual_tokens", 0) if cfg["peft_type"] == "PROMPT_TUNING" else 0
                base = MeanPooled.from_pretrained(a.model, num_labels=len(labels))
            model, msgs = captured(lambda: PeftModel.from_pretrained(base, adapter))
            res, msgs2 = captured(lambda: model.load_adapter(adapter, adapter_name="check"))
            missing = [k for k in res.missing_keys if ".check" in k or "check." in k]
            # peft reports the prompt table of prompt learning as unexpected for its own adapters too (it loads it
            # beside the model's state dict).
            unexpected = [k for k in res.unexpected_keys if k != "prompt_embeddings"]
            model.set_adapter("default")
            got = torch_logits(model, tok, texts)
            diff = (got - want).abs().max().item()
            out.append(("rime→peft", name, head, diff, len(missing), len(unexpected), msgs + msgs2))
            print(f"{'rime→peft':10} {name:7} {head:5} max|Δlogits| {diff:.2e}  missing {len(missing)}  "
                  f"unexpected {len(unexpected)}  warnings {len(msgs + msgs2)}", flush=True)
            for m in (msgs + msgs2)[:3]:
                print("      ", m.strip().splitlines()[0][:200])
    return out


PEFT_METHODS = {
    "lora": lambda: LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"]),
    "dora": lambda: LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"],
                               use_dora=True),
    "rslora": lambda: LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"],
                                 use_rslora=True),
    "ia3": lambda: IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["key", "value", "output.dense"],
                             feedforward_modules=r".*layer\.\d+\.output\.dense$"),
    "prompt": lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4),
    "prefix": lambda: PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4),
}


def torch_to_rime(a, work, tok, texts, train_rows, label_names, eval_ids):
    out = []
    y = torch.tensor([label_names.index(r["label"]) for r in train_rows])
    for name, make in PEFT_METHODS.items():
        if a.methods and name not in a.methods.split(","):
            continue
        torch.manual_seed(0)
        cls = BertForSequenceClassificationWithCache if name == "prefix" else AutoModelForSequenceClassification
        base = cls.from_pretrained(a.model, num_labels=len(label_names))
        model = get_peft_model(base, make())
        # The LoRA B factors and the prompt start at zero / random: train a few steps so every part matters.
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for step in range(a.steps):
            i = torch.arange(step * 8, step * 8 + 8) % len(train_rows)
            enc = tok([train_rows[j]["text"] for j in i], padding=True, truncation=True, max_length=MAX_LEN,
                      return_tensors="pt")
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, y[i])
            loss.backward()
            opt.step()
            opt.zero_grad()
        d = os.path.join(work, f"peft-{name}")
        model.save_pretrained(d)
        want = torch_logits(model, tok, texts)
        p = getattr(model.peft_config["default"], "num_virtual_tokens", 0)
        prompt = p if model.peft_config["default"].peft_type.value == "PROMPT_TUNING" else 0
        want_e = torch_embed(model, tok, texts, prompt)
        lpath = os.path.join(d, "logits.jsonl")
        run([a.rime, "eval", "--model", a.model, "--adapter", d, "--data", eval_ids, "--max-length", str(MAX_LEN),
             "--logits", lpath])
        got = torch.tensor([r["logits"] for r in rows(lpath)])
        diff = (got - want).abs().max().item()
        tf = os.path.join(work, "texts.txt")
        with open(tf, "w") as f:
            f.write("\n".join(texts) + "\n")
        emb = run([a.rime, "embed", "--model", a.model, "--adapter", d, "--file", tf, "--no-normalize",
                   "--max-length", str(MAX_LEN)])
        got_e = torch.tensor([json.loads(line)["embedding"] for line in emb.splitlines() if line.strip()])
        ediff = (got_e - want_e).abs().max().item()
        out.append(("peft→rime", name, "hf", diff, ediff))
        print(f"{'peft→rime':10} {name:7} hf    max|Δlogits| {diff:.2e}  max|Δembedding| {ediff:.2e}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rime", default=os.path.join(ROOT, "target", "debug", "rime"))
    ap.add_argument("--model", default=os.path.join(os.environ.get("RIME_MODELS", "models"), "all-minilm-l6-v2"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=32, help="evaluation texts")
    ap.add_argument("--only", choices=["rime", "peft"], help="one direction")
    ap.add_argument("--methods", help="comma-separated subset of the methods")
    a = ap.parse_args()
    a.model = os.path.abspath(a.model)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="rime-roundtrip-") as work:
        train_rows = rows(os.path.join(ROOT, "data", "fine_foods", "train.jsonl"))[:64]
        eval_rows = rows(os.path.join(ROOT, "data", "fine_foods", "test.jsonl"))[:a.rows]
        a.train, a.eval = os.path.join(work, "train.jsonl"), os.path.join(work, "eval.jsonl")
        write(a.train, train_rows)
        write(a.eval, eval_rows)
        label_names = sorted({r["label"] for r in train_rows})
        eval_ids = os.path.join(work, "eval_ids.jsonl")
        write(eval_ids, [{"text": r["text"], "label": label_names.index(r["label"])} for r in eval_rows])
        tok = AutoTokenizer.from_pretrained(a.model)
        texts = [r["text"] for r in eval_rows]
        res = []
        if a.only != "peft":
            res += rime_to_torch(a, work, tok, texts)
        if a.only != "rime":
            res += torch_to_rime(a, work, tok, texts, train_rows, label_names, eval_ids)
    print("\n| direction | method | head | max abs Δ logits | max abs Δ embedding | missing / unexpected keys | warnings |")
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for r in res:
        if r[0] == "rime→peft":
            _, m, h, diff, miss, unexp, msgs = r
            print(f"| rime → peft | {m} | {h} | {diff:.1e} | | {miss} / {unexp} | {len(msgs)} |")
            bad += diff > 1e-5 or miss or unexp or len(msgs)
        else:
            _, m, h, diff, ediff = r
            print(f"| peft → rime | {m} | {h} | {diff:.1e} | {ediff:.1e} | | |")
            bad += diff > 1e-5 or ediff > 1e-5
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
