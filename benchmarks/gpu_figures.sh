#!/usr/bin/env bash
# Issue 6's GPU figures, on one GPU, as JSON lines: maelab bench for MAE ViT-B/16, ViT-L/16 and
# the CIFAR-10 ViT-T/2 (with HF ViTMAE beside ViT-B), then the time-to-accuracy recipes.
#   bash benchmarks/gpu_figures.sh bench|fast|best [RESULTS_DIR]     (default RESULTS_DIR: outputs/perf)
# Each part fits a 10-minute command; `best` resumes its run directory when it is run again.
# CIFAR-10 is read from MAELAB_CIFAR10 (or data/cifar10).
set -euo pipefail
part=${1:?usage: gpu_figures.sh bench|fast|best [RESULTS_DIR]}
results=${2:-outputs/perf}
mkdir -p "$results"
maelab() { python3 -m maelab "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/gpu.txt"

case $part in
bench)  # bf16, compiled, per-device batch 256 (the CIFAR model: 4096), synthetic data of each shape
  maelab bench +experiment=mae_vitb data.batch_size=256 --steps 40 --warmup 15 --compare hf | tee -a "$results/bench.jsonl"
  maelab bench +experiment=mae_vitl data.batch_size=256 --steps 30 --warmup 10 | tee -a "$results/bench.jsonl"
  maelab bench +experiment=mae_vitt_cifar10 augment=rrc_flip data.batch_size=4096 --steps 40 --warmup 15 | tee -a "$results/bench.jsonl"
  ;;
fast)  # a new run directory each time
  run="$results/cifar10_fast/$(date +%Y-%m-%d_%H-%M-%S)"
  maelab train +experiment=cifar10_fast trainer=gpu hydra.run.dir="$run"
  cat "$run/results.json"
  ;;
best)  # resumable: a second command continues the stages from their last.ckpt
  resume=null
  [ -d "$results/cifar10_best" ] && resume=last
  timeout --signal=TERM --kill-after=60 "${MAELAB_BEST_TIMEOUT:-540}" \
    python3 -m maelab train +experiment=cifar10_best trainer=gpu hydra.run.dir="$results/cifar10_best" ckpt_path=$resume \
    || { rc=$?; [ $rc -eq 124 ] && echo "stopped by the time limit: run 'best' again to resume"; exit $rc; }
  cat "$results/cifar10_best/results.json"
  ;;
*) echo "unknown part $part: bench, fast or best" >&2; exit 2 ;;
esac
