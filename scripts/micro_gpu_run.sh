#!/bin/bash
# One device call of the micro recipe; results under $OUT (see docs/micro-model.md).
# usage (on the device machine, repo root): bash scripts/micro_gpu_run.sh MAX_MINUTES TIMEOUT_S [STOP_AFTER]
# STOP_AFTER: end after that stage's phase and pack what the next call needs ($OUT/resume.tgz.*: unpack it
# into .run/ here and carry .run). A run carried in .run/ continues where it stopped.
# The held-out scores are computed afterwards on any machine (the test data regenerates from its seed).
source scripts/device_env.sh || exit 1
export TOKENIZERS_PARALLELISM=false RUN=/tmp/run STOP="${3:-}"
# A warm machine keeps /tmp from the call before: start clean, or a stale pack would be returned.
rm -rf $RUN /tmp/pack && mkdir -p $RUN && if [ -d .run ]; then cp -r .run/. $RUN/; fi
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout ${2:-500} python -c "
import os
from phi4mm.micro import run_recipe, pack_resume
s = run_recipe(os.environ['RUN'], device='cuda', max_minutes=$1, evaluate=False, progress=True,
               stop_after=os.environ['STOP'] or None)
if 'resume_base' in s:
    pack_resume(os.environ['RUN'], '/tmp/pack')
" > $OUT/recipe.log 2>&1
echo "recipe rc=$?"
if [ -d /tmp/pack ]; then
  tar czf - -C /tmp/pack . | split -b 15M - $OUT/resume.tgz.
else
  ( cd $RUN && tar czf - recipe.json model stages/*/log.jsonl stages/*/summary.json | split -b 15M - $OUT/run.tgz. )
fi
ls -la $OUT
tail -c 1500 $OUT/recipe.log
