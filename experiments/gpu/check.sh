#!/usr/bin/env bash
# GPU figures in one command, for a session with a lent GPU (an H200 machine whose image has torch,
# transformers, peft and accelerate, but not deepspeed, datasets, hydra-core, omegaconf, lm-eval, wandb or
# stable-baselines3). Within 8 minutes: installs the wheels carried in .whl/ (filled here, before the call, by
# experiments/gpu/prepare_wheels.sh), then runs experiments/gpu/check.py (SFT MFU of a ~1.1B Llama, one
# DeepSpeed ZeRO-2 and one ZeRO-3 step, hf backend generation batch 1 vs 64, privacy scoring) and writes
# experiments/gpu_results.md (copied to $OUT when the device tool sets it, so that it comes back).
#
#   here:        bash experiments/gpu/prepare_wheels.sh
#   the device:  run(command="bash experiments/gpu/check.sh", carry=[".whl"], timeout_s=540)
#   a CPU check: bash experiments/gpu/check.sh --cpu-smoke --out /tmp/gpu_smoke.md   (seconds to a minute)
# lm-eval, wandb and stable-baselines3 are not carried: nothing the check runs imports them.
set -euo pipefail
cd "$(dirname "$0")/../.."

smoke=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && smoke=1; done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export PYTHONUNBUFFERED=1

if [ "$smoke" = 1 ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  exec "$PY" experiments/gpu/check.py "$@"
fi

PY=${PYTHON:-python3}
site=/tmp/teams_rl_site
if compgen -G ".whl/*.whl" >/dev/null; then
  start=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls .whl/*.whl | wc -l) carried wheels in $(( $(date +%s) - start )) s"
else
  echo "no .whl/*.whl: run experiments/gpu/prepare_wheels.sh here and carry .whl (the ZeRO sections need deepspeed)"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" DS_ACCELERATOR=cuda
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

rc=0
timeout 430 "$PY" experiments/gpu/check.py --budget-s 400 "$@" || rc=$?
if [ -n "${OUT:-}" ] && [ -f experiments/gpu_results.md ]; then cp experiments/gpu_results.md "$OUT/"; fi
exit "$rc"
