"""Writes crates/rime-peft/tests/fixtures/peft_seq_cls_keys.json: the tensor names and the adapter_config.json
fields `modules_to_save` / `task_type` that real peft saves for `PeftModel(BertForSequenceClassification)`
(task_type SEQ_CLS) on a tiny random BERT of the shape rime's tests use (hidden 8, 2 layers, 2 heads,
3 labels), for LoRA (query, value), DoRA, IA3 (key, value, FFN output), prompt and prefix tuning. The Rust test
`hf_head` saves the same adapters from rime and compares names. Run with the venv beside rime:

    /work/venv/bin/python scripts/peft_seq_cls_keys.py
"""
import json
import os
import sys
import tempfile

from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from safetensors import safe_open
from transformers import BertConfig, BertForSequenceClassification


def tiny():
    cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=16, type_vocab_size=2, num_labels=3)
    return BertForSequenceClassification(cfg)


CONFIGS = {
    "lora": lambda: LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"]),
    "dora": lambda: LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"],
                               use_dora=True),
    # feedforward: the FFN's output linear only (rime's rule), not the attention output's `output.dense`.
    "ia3": lambda: IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["key", "value", "output.dense"],
                             feedforward_modules=r".*layer\.\d+\.output\.dense$"),
    "prompt": lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=3),
    "prefix": lambda: PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=3),
}


def main():
    out = {}
    for name, make in CONFIGS.items():
        model = get_peft_model(tiny(), make())
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            with safe_open(os.path.join(d, "adapter_model.safetensors"), "np") as f:
                keys = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        out[name] = {"keys": keys, "modules_to_save": cfg["modules_to_save"], "task_type": cfg["task_type"]}
    path = os.path.join(os.path.dirname(__file__), "..", "crates", "rime-peft", "tests", "fixtures",
                        "peft_seq_cls_keys.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {os.path.normpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
