#!/usr/bin/env bash
# Container smoke test: the first thing to run inside nvcr.io/nvidia/nemo:24.07 on ONE GPU, a few minutes
# long, before days of A100 time. From the repository root, after the install line (docs/compatibility.md):
#
#     bash scripts/container_smoke_test.sh
#
# NOT RUN BY US. This project has no GPU and no NeMo container; the GPU part below (steps 2-4: conversion,
# NeMo training, .nemo export, logits) has never been run by its authors. What a CPU machine can check of it
# (the command lines, the configs NeMo composes from them, the run folder's layout, the converters' argument
# parsers, NeMo's tokenizer and megatron-core's datasets on these files) is tested in CI against NeMo's own code
# (docs/nemo_launch.md); DAPT_SMOKE_DRY_RUN=1 runs step 1 and the launch dry run here.
#
# 1. CPU: the tiny pipeline (sample data, base tokenizer, a small Llama, adapted tokenizer, extended model,
#    Megatron data), the shapes NeMo's kernels accept (hidden 192, 6 heads of 32, 2 KV heads, vocabulary a
#    multiple of 1024);
# 2. GPU: `python -m dapt launch --profile tiny`: commands.sh converts the extended model to .nemo and runs a
#    handful of NeMo pretraining steps on the Megatron data (bf16, like the A100 profiles); the .nemo is written;
# 3. GPU/CPU: `python -m dapt export` turns the converted .nemo back into HF (NeMo's converter) and verifies it;
#    its logits must equal the extended HF model's up to bf16 rounding (a wrong layout gives unrelated logits);
# 4. the trained .nemo is exported and verified the same way; its logits against the start are reported.
#
# Settings (environment): DAPT_SMOKE_OUTPUT (default outputs/container_smoke), DAPT_SMOKE_STEPS (20),
# DAPT_SMOKE_BASE_STEPS (240, the tiny base model's pretraining steps), DAPT_SMOKE_DRY_RUN (0), PYTHON (python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/code${PYTHONPATH:+:$PYTHONPATH}"
out="${DAPT_SMOKE_OUTPUT:-outputs/container_smoke}"
steps="${DAPT_SMOKE_STEPS:-20}"
base_steps="${DAPT_SMOKE_BASE_STEPS:-240}"
dry_run="${DAPT_SMOKE_DRY_RUN:-0}"
python="${PYTHON:-python}"
started=$SECONDS

step() { echo; echo "== [$((SECONDS - started)) s] $*"; }

if [[ "$dry_run" != 1 ]]; then
    "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no GPU visible: run this \
inside nvcr.io/nvidia/nemo:24.07 with --gpus all (or set DAPT_SMOKE_DRY_RUN=1 for the CPU part)')"
fi

step "1/4 CPU: the tiny pipeline into $out"
# the embedded sample, only where it is absent (as notebook 1 does): never rebuilt under another Python, whose
# standard library (the general sample's source) differs, so runs on one checkout keep the same data
if ! compgen -G "code/data/*.jsonl" >/dev/null || ! compgen -G "code/heldout/general/*.jsonl" >/dev/null; then
    "$python" -m dapt sample-data
fi
"$python" -m dapt base-tokenizer --output "$out/base_tokenizer"
"$python" -m dapt base-model --tokenizer "$out/base_tokenizer/tokenizer.model" --output "$out/base_model" \
    --steps "$base_steps"
"$python" -m dapt tokenizer --base-tokenizer "$out/base_model" --output "$out/tokenizer" \
    --domain-vocab-size 4000 --max-added-tokens 1024
"$python" -m dapt embeddings --base-model "$out/base_model" --tokenizer "$out/tokenizer" \
    --output "$out/extended_model" --vocab-multiple 1024
for kind in domain general; do
    input=code/data
    [[ "$kind" == general ]] && input=code/general_data
    "$python" -m dapt data --tokenizer "$out/tokenizer" --input "$input" --output-prefix "$out/megatron_data/$kind"
done

launch=(--profile tiny --hf-model "$out/extended_model" --tokenizer "$out/tokenizer"
        --domain-data "$out/megatron_data/domain" --general-data "$out/megatron_data/general"
        --output "$out/nemo_launch" --run-dir "$out/nemo_run" --precision bf16-mixed
        --max-steps "$steps" --warmup-steps 2 --val-check-interval "$steps" --limit-val-batches 2)
if [[ "$dry_run" == 1 ]]; then
    step "2/4 (dry run) the NeMo commands that a GPU would run"
    "$python" -m dapt launch "${launch[@]}" --dry-run
    echo "DAPT_SMOKE_DRY_RUN=1: stopping before the GPU part."
    exit 0
fi

step "2/4 GPU: HF -> .nemo and $steps NeMo pretraining steps (commands.sh)"
"$python" -m dapt launch "${launch[@]}"
converted="$out/nemo_run/extended_model.nemo"
trained="$out/nemo_run/training/checkpoints/dapt.nemo"
test -f "$converted" && test -f "$trained"

step "3/4 the converted .nemo back to HF: logits must be the extended model's"
"$python" -m dapt export --source "$converted" --base-hf-model "$out/extended_model" --tokenizer "$out/tokenizer" \
    --output "$out/roundtrip_export"
"$python" -m dapt.nemo_launch.smoke --reference "$out/extended_model" --candidate "$out/roundtrip_export" \
    --tokenizer "$out/tokenizer" --heldout code/heldout/domain

step "4/4 the trained .nemo to HF, verified; how far $steps steps moved the logits"
"$python" -m dapt export --source "$trained" --base-hf-model "$out/extended_model" --tokenizer "$out/tokenizer" \
    --output "$out/trained_export"
"$python" -m dapt.nemo_launch.smoke --reference "$out/extended_model" --candidate "$out/trained_export" \
    --tokenizer "$out/tokenizer" --heldout code/heldout/domain --report-only

step "done: NeMo converted, trained, saved and exported the tiny model; the A100 profiles use the same commands"
