#!/bin/bash
# One device call: the whole micro recipe on the GPU, results under $OUT (see docs/micro-model.md).
# usage (on the device machine, repo root): bash scripts/micro_gpu_run.sh MAX_MINUTES [TIMEOUT_S]
# The held-out scores are computed afterwards on any machine (the test data regenerates from its seed).
source scripts/device_env.sh || exit 1
export TOKENIZERS_PARALLELISM=false
RUN=/tmp/run
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout ${2:-500} python -c "
from phi4mm.micro import run_recipe
run_recipe('$RUN', device='cuda', max_minutes=$1, evaluate=False, progress=True)
" > $OUT/recipe.log 2>&1
echo "recipe rc=$?"
( cd $RUN && tar czf - recipe.json model stages/*/log.jsonl stages/*/summary.json | split -b 15M - $OUT/run.tgz. )
ls -la $OUT
tail -c 1500 $OUT/recipe.log
