#!/usr/bin/env python3
"""Who is closer to the exact formula? For the geometric merge cases (model_stock, nuslerp, multislerp,
karcher, and arcee_fusion, whose masks are compared with the float64 mask) already run by scripts/mergekit_compare.py in WORK, evaluate each case's formula in float64 (numpy)
on the same float32 inputs and print, per case, the largest |mergekit - f64| and |rime - f64| over all float
tensors, and the tensor where mergekit is furthest off.

mergekit computes in the input dtype (float32 here): its norms and dot products of whole tensors are float32
reductions (torch.norm of MiniLM's 11.7M-element word embeddings is off by about 6e-4 relative), while rime
sums the Gram matrix with compensated float32 sums and forms the coefficients in float64.

Usage: V/bin/python scripts/mergekit_geo_f64.py --work /tmp/mk scripts/mergekit_cases/{model_stock,...}.yml
"""
import argparse
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file


def load_folder(folder: Path):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def value(setting, name, default=None):
    """mergekit's per-tensor parameter: a number, or [{filter, value}] (first substring match)."""
    if setting is None:
        return default
    if isinstance(setting, list):
        for e in setting:
            if e.get("filter") is None or e["filter"] in name:
                return e["value"]
        return default
    return setting


def vectors(x, how):
    """Views of x as [vectors, elements]: whole, rows (last dim) or columns (dim 0)."""
    if how == "rows" and x.ndim >= 2:
        return x.reshape(-1, x.shape[-1]), lambda y: y.reshape(x.shape)
    if how == "cols" and x.ndim >= 2:
        s = x.reshape(x.shape[0], -1)
        return s.T, lambda y: y.T.reshape(x.shape)
    return x.reshape(1, -1), lambda y: y.reshape(x.shape)


def model_stock(base, xs, filter_wise):
    b, back = vectors(base, "rows" if filter_wise and base.ndim >= 2 else "whole")
    vs = [vectors(x, "rows" if filter_wise and base.ndim >= 2 else "whole")[0] for x in xs]
    d = [v - b for v in vs]
    n = len(d)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            np_ = np.maximum(np.linalg.norm(d[i], axis=-1) * np.linalg.norm(d[j], axis=-1), 1e-6)
            cos.append(np.clip((d[i] * d[j]).sum(-1) / np_, -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))
    return back(t * sum(vs) / n + (1 - t) * b)


def nuslerp(t, v0, v1, how):
    a, back = vectors(v0, how)
    b = vectors(v1, how)[0]
    na = np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-7)
    nb = np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-7)
    c = np.clip(((a / na) * (b / nb)).sum(-1, keepdims=True), -1, 1)
    col = (1 - c * c) <= 1e-16
    th = np.arccos(np.where(col, 0.0, c))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)
    return back(np.where(col, (1 - t) * a + t * b, r))


def multislerp(ts, w, normalize, eps):
    if len(ts) == 1:
        return ts[0]
    w = np.array(w, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    flat = [t.ravel() for t in ts]
    n = np.array([np.linalg.norm(f) for f in flat])
    u = [f / (ni + eps) for f, ni in zip(flat, n)]
    m = sum(wi * ui for wi, ui in zip(w, u))
    mn = np.linalg.norm(m)
    if mn < eps:
        return (ts[0] * w[0] + ts[1] * w[1]).reshape(ts[0].shape)
    m = m / mn
    tr = sum(wi * (ui - (ui @ m) * m) for wi, ui in zip(w, u))
    tn = np.linalg.norm(tr) + eps
    r = m * np.cos(tn) + tr * (np.sin(tn) / tn)
    return (r * (n * w).sum()).reshape(ts[0].shape)


def karcher(ts, max_iter, tol):
    if len(ts) == 1:
        return ts[0]
    alphas = [1.0 / len(ts)] * len(ts)
    flat = [t.ravel() for t in ts]
    n = [np.linalg.norm(f) for f in flat]
    u = [f / ni if ni != 0 else np.zeros_like(f) for f, ni in zip(flat, n)]
    valid = [i for i in range(len(ts)) if n[i] > tol]
    if not valid:
        return ts[0] * 0
    s = sum(alphas[i] for i in valid)
    a = [alphas[i] / s for i in valid]
    m = sum(ai * u[i] for ai, i in zip(a, valid))
    mn = np.linalg.norm(m)
    m = u[valid[0]].copy() if mn < tol else m / mn
    for _ in range(max_iter):
        tg = np.zeros_like(m)
        for ai, i in zip(a, valid):
            d = np.clip(m @ u[i], -1, 1)
            th = np.arccos(d)
            if th < tol:
                continue
            tg += ai * (th / np.sin(th)) * (u[i] - d * m)
        tn = np.linalg.norm(tg)
        if tn < tol:
            break
        m = np.cos(tn) * m + np.sin(tn) * (tg / tn)
        un = np.linalg.norm(m)
        if un > tol:
            m = m / un
    return (sum(al * ni for al, ni in zip(alphas, n)) * m).reshape(ts[0].shape)


def arcee_fusion(b, x):
    """Exact quantiles (mergekit samples 1M elements at random above 1M)."""
    def soft(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True) + 1e-8

    p, q = soft(x), soft(b)
    imp = np.abs(x - b) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(imp.ravel())
    at = lambda f: s[int(np.float32(f) * np.float32(s.size - 1))]
    return b + (x - b) * (imp >= at(0.5) + 1.5 * (at(0.75) - at(0.25)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="+", type=Path)
    ap.add_argument("--work", required=True, type=Path)
    args = ap.parse_args()
    print("| case | max abs mergekit - f64 | max abs rime - f64 | where mergekit is furthest off |")
    print("|---|---|---|---|")
    for case in args.cases:
        cfg = yaml.safe_load(case.read_text())
        method, p = cfg["merge_method"], cfg.get("parameters") or {}
        base = cfg.get("base_model")
        ms = [m if isinstance(m, dict) else {"model": m} for m in cfg["models"]]
        others = [m for m in ms if m["model"] != base]
        names = [m["model"] for m in others]
        if method == "karcher":
            names = [m["model"] for m in ms] + ([base] if base and base not in [m["model"] for m in ms] else [])
        inputs = {nm: load_folder(args.work / nm) for nm in set(names + ([base] if base else []))}
        mk = load_folder(args.work / f"out-mk-{case.stem}")
        ri = load_folder(args.work / f"out-rime-{case.stem}")
        worst_mk, worst_ri, where, fusion = 0.0, 0.0, "", {}
        for k, x in inputs[names[0]].items():
            if not np.issubdtype(x.dtype, np.floating):
                continue
            xs = [inputs[nm][k].astype(np.float64) for nm in names]
            b = inputs[base][k].astype(np.float64) if base else None
            w = [value((m.get("parameters") or {}).get("weight", p.get("weight")), k) for m in others]
            if method == "model_stock":
                ref = model_stock(b, xs, bool(value(p.get("filter_wise"), k, False)))
            elif method == "nuslerp":
                flat = value(p.get("nuslerp_flatten"), k, True)
                how = "whole" if flat else ("cols" if value(p.get("nuslerp_row_wise"), k, False) else "rows")
                tot = w[0] + w[1]
                t = 0.5 if abs(tot) < 1e-6 else w[1] / tot
                ref = nuslerp(t, *(x - b for x in xs), how) + b if b is not None else nuslerp(t, *xs, how)
            elif method == "multislerp":
                norm_w = bool(value(p.get("normalize_weights"), k, True))
                eps = float(value(p.get("eps"), k, 1e-8))  # PyYAML reads 1e-8 as a string; pydantic converts it
                if b is not None and len(xs) > 1:
                    ref = multislerp([x - b for x in xs], w, norm_w, eps) + b
                else:
                    ref = multislerp(xs, w, norm_w, eps)
            elif method == "karcher":
                ref = karcher(xs, int(value(p.get("max_iter"), k, 10)), float(value(p.get("tol"), k, 1e-5)))
            elif method == "arcee_fusion":
                ref = arcee_fusion(b, xs[0])
                for tag, out in (("mk", mk), ("rime", ri)):
                    mask_off = int(((out[k] != inputs[base][k]) != (ref != b)).sum())
                    fusion[tag] = fusion.get(tag, 0) + mask_off
                    if x.size <= 1_000_000:
                        fusion[tag + "_small"] = fusion.get(tag + "_small", 0) + mask_off
                fusion["n"] = fusion.get("n", 0) + x.size
                fusion["n_small"] = fusion.get("n_small", 0) + (x.size if x.size <= 1_000_000 else 0)
            else:
                raise SystemExit(f"{case}: {method} is not a geometric method")
            dm = float(np.abs(mk[k].astype(np.float64) - ref).max())
            dr = float(np.abs(ri[k].astype(np.float64) - ref).max())
            if dm > worst_mk:
                worst_mk, where = dm, f"{k} {list(x.shape)}"
            worst_ri = max(worst_ri, dr)
        if fusion:
            pct = lambda t, n: f"{100 * fusion[t] / max(fusion[n], 1):.4f}%"
            where = (
                f"{where}; elements kept or dropped unlike float64: mergekit {pct('mk', 'n')}, rime "
                f"{pct('rime', 'n')} (tensors up to 1M elements, where mergekit does not sample: "
                f"{pct('mk_small', 'n_small')} / {pct('rime_small', 'n_small')})"
            )
        print(f"| {case.stem} | {worst_mk:.3g} | {worst_ri:.3g} | {where} |")


if __name__ == "__main__":
    main()
