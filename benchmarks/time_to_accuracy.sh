#!/usr/bin/env bash
# Time to accuracy on CIFAR-10 (issue 15): `maelab train +experiment=cifar10_fast trainer=gpu` on the
# CIFAR-10 JPEG copy, timed from the command's start, with its figures collected in one folder.
#
#   bash benchmarks/time_to_accuracy.sh [--cpu] [EXPERIMENT] [OUT_DIR]
#       EXPERIMENT: cifar10_fast (default) or cifar10_best; OUT_DIR: default $OUT, else outputs/time_to_accuracy
#
# --cpu runs the same command with tiny sizes and a few batches per epoch on the CPU (a CI test
# does), so that the GPU run cannot fail on anything a CPU would have shown. RUN_DIR=<a pipeline's
# directory> resumes that run (ckpt_path=last), e.g. cifar10_best over several commands.
# CIFAR-10 comes from MAELAB_CIFAR10, else data/cifar10-jpeg, else the archive named by
# CIFAR10_ARCHIVE (default .device/cifar10-jpeg.tar.gz), extracted into data/.
# OUT_DIR receives seven files (the device tool brings back at most eight): summary.json (test
# top-1, wall-clock in all and per stage, throughput), results.json (the pipeline's), run.log,
# pretrain_metrics.csv, pretrain_loss.png (the loss curve), reconstructions.png, finetune_metrics.csv.
set -uo pipefail
cpu=0
[ "${1:-}" = "--cpu" ] && { cpu=1; shift; }
experiment=${1:-cifar10_fast}
out=${2:-${OUT:-outputs/time_to_accuracy}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
log=$out/run.log
: > "$log"

if [ -z "${MAELAB_CIFAR10:-}" ]; then
  archive=${CIFAR10_ARCHIVE:-.device/cifar10-jpeg.tar.gz}
  if [ ! -d data/cifar10-jpeg/train ] && [ -f "$archive" ]; then
    mkdir -p data && tar xzf "$archive" -C data
  fi
  [ -d data/cifar10-jpeg/train ] || { echo "no CIFAR-10: set MAELAB_CIFAR10 or put cifar10-jpeg.tar.gz at .device/" >&2; exit 2; }
  export MAELAB_CIFAR10=$PWD/data/cifar10-jpeg
fi

run=${RUN_DIR:-outputs/time_to_accuracy/$experiment/$(date +%Y-%m-%d_%H-%M-%S)}
resume=null
[ -n "${RUN_DIR:-}" ] && [ -d "$RUN_DIR" ] && resume=last
if [ $cpu = 1 ]; then  # tiny model, three batches an epoch, one validation batch: every part, in seconds
  set -- trainer=cpu trainer.max_epochs=2 trainer.limit_train_batches=3 trainer.limit_val_batches=1 \
    data.batch_size=16 task.effective_batch_size=null model.depth=1 model.embed_dim=32 model.num_heads=2 \
    'stages.pretrain.overrides=["task.decoder_depth=1","task.decoder_width=16","task.decoder_heads=2"]'
else
  set -- trainer=gpu
fi

start=$(date +%s.%N)
python3 -m maelab train +experiment="$experiment" trainer.enable_progress_bar=false hydra.run.dir="$run" \
  ckpt_path=$resume "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
end=$(date +%s.%N)
[ "$rc" = 0 ] || { echo "time_to_accuracy: $experiment stopped with exit status $rc; see $log" >&2; exit "$rc"; }

cp "$run/results.json" "$out/results.json"
cp "$(find "$run/pretrain" -name metrics.csv | head -1)" "$out/pretrain_metrics.csv"
cp "$(find "$run/finetune" -name metrics.csv | head -1)" "$out/finetune_metrics.csv"
cp "$(ls "$run"/pretrain/reconstructions/*.png | tail -1)" "$out/reconstructions.png"
python3 - "$out" "$start" "$end" <<'PY' | tee -a "$log"
import csv, json, sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

out, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
results = json.loads((out / "results.json").read_text())
stages = {}
for name, stage in results["stages"].items():
    full = json.loads((Path(stage["output_dir"]) / "results.json").read_text())
    stages[name] = {k: full.get(k) for k in ("epochs", "global_step", "elapsed_s", "wall_clock_s", "train/img_per_s",
                                             "peak_memory_gb", "effective_batch_size", "lr")}
    stages[name]["last"] = full["last"]
summary = {
    "experiment": results["name"],
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "acc1": results["acc1"],
    "acc1_measured": results["acc1_measured"],
    "wall_clock_s": round(end - start, 1),  # this script's command, interpreter start included
    "pipeline_wall_clock_s": results["wall_clock_s"],
    "stages": stages,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

rows = [r for r in csv.DictReader(open(out / "pretrain_metrics.csv")) if r.get("train/loss")]
steps, losses = [int(r["step"]) for r in rows], [float(r["train/loss"]) for r in rows]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(steps, losses)
ax.set(xlabel="optimizer step", ylabel="train/loss", title=f"{results['name']}: pretraining loss ({summary['device']})")
fig.tight_layout()
fig.savefig(out / "pretrain_loss.png", dpi=100)
print(json.dumps({k: summary[k] for k in ("experiment", "device", "acc1", "wall_clock_s")}))
PY
