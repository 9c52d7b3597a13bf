#!/bin/bash
# One device call: the whole micro recipe on the GPU, results under $OUT (see docs/micro-model.md).
# usage (on the device machine, repo root): bash scripts/micro_gpu_run.sh MAX_MINUTES
source scripts/device_env.sh || exit 1
export TOKENIZERS_PARALLELISM=false
RUN=/tmp/run
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 500 python -c "
from phi4mm.micro import run_recipe
run_recipe('$RUN', device='cuda', max_minutes=$1, evaluate=False, progress=True)
" > $OUT/recipe.log 2>&1
echo "recipe rc=$?"
( cd $RUN && tar czf $OUT/run.tgz recipe.json model stages/*/log.jsonl stages/*/summary.json ) && ls -la $OUT
timeout 70 python -c "
import json
from phi4mm.micro import evaluate_micro
r = evaluate_micro('$RUN/model', '$RUN/data/test', 'cuda')
json.dump(r, open('$OUT/eval.json', 'w'), indent=1)
print({k: (round(v['score'], 3), v['goal'], v['met']) for k, v in r.items()})
" 2>&1 | tail -5
tail -c 1500 $OUT/recipe.log
