"""Loads adapters written by `rime train` with Hugging Face peft and reports every warning peft raises, so that a
rime adapter can be checked to load as peft's own do (issue 14). The adapter's base is loaded as the bare
encoder (`AutoModel`), so rime's classification head (`modules_to_save: ["head"]`, a module transformers' bare
encoder lacks) is reported separately, as peft's unexpected keys.

    python3 -m venv V && V/bin/pip install torch transformers peft
    V/bin/python scripts/peft_load_check.py MODEL_DIR ADAPTER_DIR [ADAPTER_DIR ...]
"""
import logging
import sys
import warnings

from peft import PeftModel
from transformers import AutoModel


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    model_dir, adapters = sys.argv[1], sys.argv[2:]
    bad = 0
    for a in adapters:
        handler = Collect()
        for name in ("peft", "transformers"):
            logging.getLogger(name).addHandler(handler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base = AutoModel.from_pretrained(model_dir)
            model = PeftModel.from_pretrained(base, a)
        for name in ("peft", "transformers"):
            logging.getLogger(name).removeHandler(handler)
        msgs = [str(w.message) for w in caught] + handler.records
        unexpected = [m for m in msgs if "Unexpected keyword" in m]
        others = [m for m in msgs if m not in unexpected]
        print(f"{a}: peft_type {model.peft_config['default'].peft_type.value}; "
              f"unexpected-keyword warnings: {len(unexpected)}; other warnings: {len(others)}")
        for m in unexpected + others:
            print("   ", m.strip().splitlines()[0][:300])
        bad += len(unexpected)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
