#!/usr/bin/env bash
# The GPU figures of issue #6 (target 7) on a machine that has PyTorch and a GPU but no internet.
#
# Here, with internet:      python benchmarks/gpu_bundle.py [--present FILE]   (writes .gpu_bundle/)
# There, from the repo root: bash benchmarks/gpu_run.sh [BUNDLE]              (BUNDLE: .gpu_bundle)
#
# It installs the bundle's wheels into a temporary folder, gives SmolLM2-135M's architecture random
# weights (the real ones do not travel; the shapes, and so the speeds, are the same), and runs, on
# the GPU: a fit of configs/smollm2.yaml with an fp32 LM, with bf16 LM weights and under bf16
# autocast (trainer.precision bf16-mixed); the four benchmarks; and the whole default study.
# Results, the log, and summary.txt (every `name: ours X, baseline Y, ratio Z` line plus the wall
# times) go to $OUT, else benchmarks/results/gpu/.
# DEVICE=cpu ACCELERATOR=cpu QUICK=1 runs the same steps, small, on a CPU (to check this script).
set -euo pipefail

BUNDLE=${1:-.gpu_bundle}
RESULTS=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
ACCELERATOR=${ACCELERATOR:-gpu}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
mkdir -p "$RESULTS"

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$BUNDLE"/wheels/*.whl
export PYTHONPATH="$WORK/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
MODEL="$WORK/smollm2-135m-random"

if [[ -n "${QUICK:-}" ]]; then  # a check of the script, not figures
    STEP_ARGS=(--widths 4608 --batch 1024 --steps 1)
    HARVEST_ARGS=(--sequences 4 --metric_sequences 4 --ce_sequences 2)
    PRUNE_ARGS=(--repeats 1 --calibration_sequences 4 --eval_sequences 4)
    FIT_ARGS=(--data.train_tokens=16384 --data.eval_tokens=4096 --model.ce_eval_sequences=4)
    STUDY_ARGS=(--study.methods=[wanda] --study.sparsities=[0.5] --study.seeds=[0] --study.epochs=1
                --data.train_tokens=16384 --data.eval_tokens=4096)
else
    STEP_ARGS=(--steps 20)
    HARVEST_ARGS=() PRUNE_ARGS=(--prune_total) FIT_ARGS=() STUDY_ARGS=()
fi

timed() {  # timed NAME COMMAND...: runs it, goes on if it fails, adds "NAME_wall: N s" to the summary
    local name=$1 start=$SECONDS status=0
    shift
    "$@" || status=$?
    echo "${name}_wall: $((SECONDS - start)) s$([[ $status == 0 ]] || echo " (failed: exit $status)")" \
        | tee -a "$WORK/walls.txt"
}
fit() {  # fit DTYPE PRECISION: configs/smollm2.yaml on the random model, LM weights in DTYPE
    "$PY" -m lit_prune fit --config configs/smollm2.yaml --model.model_name="$MODEL" --model.lm_dtype="$1" \
        --trainer.precision="$2" --trainer.accelerator="$ACCELERATOR" --trainer.enable_progress_bar=false \
        --trainer.default_root_dir="$WORK/fit-$1-$2" --trainer.logger.init_args.save_dir="$WORK/fit-$1-$2/logs" \
        --model.export_dir="$WORK/fit-$1-$2/sae" "${FIT_ARGS[@]}"
}

{
    set +e  # one failing part does not stop the others
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    "$PY" benchmarks/random_model.py "$BUNDLE/smollm2-135m" "$MODEL"
    timed fit_fp32 fit float32 32-true
    timed fit_bf16_weights fit bfloat16 32-true
    timed fit_bf16_autocast fit float32 bf16-mixed
    timed sae_step "$PY" benchmarks/sae_step.py --device "$DEVICE" "${STEP_ARGS[@]}" --output "$RESULTS/sae_step.json"
    timed harvest "$PY" benchmarks/harvest.py --device "$DEVICE" --model "$MODEL" --trained_sae "$WORK/fit-float32-32-true/sae" \
        "${HARVEST_ARGS[@]}" --output "$RESULTS/harvest.json"
    timed prune "$PY" benchmarks/prune.py --device "$DEVICE" --model "$MODEL" "${PRUNE_ARGS[@]}" --output "$RESULTS/prune.json"
    timed study_parts "$PY" benchmarks/study_parts.py --device "$DEVICE" --output "$RESULTS/study_parts.json"
    timed study "$PY" -m lit_prune study --config configs/smollm2.yaml --model.model_name="$MODEL" \
        --trainer.accelerator="$ACCELERATOR" --study.workers=1 --study.checkpoints="$WORK/study" \
        --study.logs="$WORK/study-logs" --progress=false "${STUDY_ARGS[@]}"
} 2>&1 | tee "$RESULTS/log.txt"

{ grep -h ': ours ' "$RESULTS/log.txt" || true; cat "$WORK/walls.txt"; } > "$RESULTS/summary.txt"
cat "$RESULTS/summary.txt"
