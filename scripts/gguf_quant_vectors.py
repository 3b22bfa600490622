#!/usr/bin/env python3
"""Test vectors for rime-io's GGUF block dequantizers, made by the `gguf` Python package (llama.cpp's gguf-py).

For each type it writes crates/rime-io/tests/data/gguf_quants/<TYPE>.blocks (the raw GGUF blocks) and
<TYPE>.f32 (gguf.quants.dequantize of those blocks, little-endian f32). Q8_0, Q4_0, Q4_1 and Q5_0 blocks come
from gguf.quants.quantize of a fixed random tensor (plus one block of random bytes with a finite scale, so
every nibble and high bit pattern occurs); gguf-py cannot quantize Q4_K and Q6_K, so their blocks are random
bytes with finite f16 scales (any bytes are a valid K-quant block). The Rust test
crates/rime-io/tests/gguf_vectors.rs checks `rime_io::gguf::dequantize` against them bit for bit.

Run with a venv that has `gguf` and numpy (rime used gguf 0.19.0, numpy 2.4):
    python3 -m venv /work/venv-gguf && /work/venv-gguf/bin/pip install gguf numpy
    /work/venv-gguf/bin/python scripts/gguf_quant_vectors.py
"""

import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "rime-io", "tests", "data", "gguf_quants")

# (type, block size in values, block bytes, byte offsets of the f16 scales inside a block)
TYPES = [
    (T.Q8_0, 32, 34, [0]),
    (T.Q4_0, 32, 18, [0]),
    (T.Q4_1, 32, 20, [0, 2]),
    (T.Q5_0, 32, 22, [0]),
    (T.Q4_K, 256, 144, [0, 2]),
    (T.Q6_K, 256, 210, [208]),
]


def random_blocks(rng, n_blocks, block_bytes, scale_offsets):
    """Random bytes with every f16 scale replaced by a finite value of either sign in [1e-3, 0.1]."""
    b = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in scale_offsets:
        s = (rng.uniform(1e-3, 0.1, size=n_blocks) * rng.choice([-1.0, 1.0], size=n_blocks)).astype(np.float16)
        b[:, off : off + 2] = s.view(np.uint8).reshape(n_blocks, 2)
    return b


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(16)
    for qtype, bs, bb, offs in TYPES:
        if bs == 32:
            # 31 quantized blocks of a tensor [31, 32] with a few large values, then one random block.
            x = rng.standard_normal((31, bs)).astype(np.float32)
            x[0, 3] = 7.0
            x[20, 17] = -5.0
            q = quantize(x, qtype).reshape(-1, bb)
            blocks = np.concatenate([q, random_blocks(rng, 1, bb, offs)])
        else:
            blocks = random_blocks(rng, 4, bb, offs)
        raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1)
        y = dequantize(raw.reshape(1, -1), qtype).astype(np.float32).reshape(-1)
        assert y.size == blocks.shape[0] * bs, (qtype.name, y.size)
        assert np.all(np.isfinite(y)), qtype.name
        raw.tofile(os.path.join(OUT, f"{qtype.name}.blocks"))
        y.astype("<f4").tofile(os.path.join(OUT, f"{qtype.name}.f32"))
        print(f"{qtype.name}: {blocks.shape[0]} blocks, {raw.size} bytes, {y.size} values")


if __name__ == "__main__":
    main()
