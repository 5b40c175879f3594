#!/bin/bash
# The CUDA paths on one GPU, a few minutes: both stages 300 steps (bf16), a SIGTERM stop and its
# resume, generation, and generation speed against diffusers. Run from the repository root on a
# machine with the project installed (`make install` there, or its packages on PYTHONPATH):
#   bash benchmarks/gpu_check.sh [RUNS_DIR]
# Stage 2 uses the clip-scratch text encoder (the MiniLM package is 88 MB, more than the lent
# machine here could be sent). Results: RUNS_DIR/{ae,ldm,stop}/log.jsonl, metrics.json, gen-*.json, and all of
# them gathered in RUNS_DIR/GPU_CHECK.json (benchmarks/gpu_summary.py; benchmarks/GPU_CHECK.json is a copy).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=${1:-/tmp/gpu-check}
PY=${PYTHON:-python3}
L="$PY -m accelerate.commands.launch --num_processes 1"
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
t "stage 1"
$L -m training.train_autoencoder --config configs/autoencoder/openmoji-32-f4.yaml output_dir=$R/ae train.max_steps=300 \
  train.batch_size=32 train.log_every=25 2>&1 | tr '\r' '\n' | grep -E "^(saved|error)"
t "stage 2"
$L -m training.train_ldm --config configs/ldm/openmoji-32.yaml output_dir=$R/ldm model.vae=$R/ae/vae model.text_encoder=clip-scratch \
  cache.dir=$R/cache train.max_steps=300 train.checkpoint_every=100 train.sample_every=150 2>&1 | tr '\r' '\n' | grep -E "^(saved|error)"
t "SIGTERM stop on the GPU, then resume"
$PY benchmarks/measure_stop.py $R/stop --config configs/ldm/openmoji-32.yaml model.vae=$R/ae/vae model.text_encoder=clip-scratch \
  cache.dir=$R/cache eval.num_prompts=0 | tail -1 | tee $R/stop.json
S=$($PY -c "import json; print([json.loads(l) for l in open('$R/stop/log.jsonl') if 'stopped' in l][0]['step'])")
$L -m training.train_ldm --config configs/ldm/openmoji-32.yaml output_dir=$R/stop model.vae=$R/ae/vae model.text_encoder=clip-scratch \
  cache.dir=$R/cache train.max_steps=$((S+20)) eval.num_prompts=0 2>&1 | tr '\r' '\n' | grep -E "^(resuming|saved|error)"
t "generate"
$PY -m ldm.generate --model $R/ldm/pipeline --prompt "red apple" --prompt "grinning face" --prompt "sun" --prompt "red heart" \
  --prompt "rocket" --num-images 6 --grid --out $R/gpu-grid.png 2>&1 | tail -1
t "generation speed"
for a in "--resolution 64 --batch 4" "--resolution 256 --batch 8"; do
  $PY benchmarks/generation_speed.py $a --steps 25 --repeats 3 --json $R/gen-$(echo $a | tr -d ' -').json 2>&1 | tail -6
done
$PY benchmarks/gpu_summary.py $R --stop-json $R/stop.json --json $R/GPU_CHECK.json
t "done"
