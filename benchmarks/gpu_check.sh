#!/usr/bin/env bash
# The first contact with a GPU, in one command of at most 8 minutes on a bare machine (issue 14):
#   1. the tests marked gpu (bf16, torch.compile, fused AdamW, CIFAR-10 on the device, mixup,
#      reconstructions from device tensors, peak memory);
#   2. maelab bench for MAE ViT-B/16 (bs 256), ViT-L/16 (bs 256) and CIFAR ViT-T/2 (bs 4096,
#      crops, flips and masking included), each beside HF ViTMAE eager and compiled, each against
#      its target, with a torch.profiler table for a workload that misses it;
#   3. a few epochs of mae_vitt_cifar10 on the CIFAR-10 JPEG copy through `maelab train`: img/s,
#      peak memory, the loss curve and a reconstruction PNG.
#
#   bash benchmarks/gpu_check.sh [--cpu] [OUT_DIR]      (OUT_DIR: default $OUT, else outputs/gpu_check)
#
# --cpu runs every part with tiny sizes on the CPU (a CI test does), so the GPU run cannot fail on
# a typo. CIFAR-10 comes from MAELAB_CIFAR10, else data/cifar10-jpeg, else the archive named by
# CIFAR10_ARCHIVE (default .device/cifar10-jpeg.tar.gz), extracted into data/.
# OUT_DIR receives six files (the device tool brings back at most eight): results.jsonl (one JSON
# object per part, then a summary), run.log, gpu_tests.log, profiles.txt, reconstructions.png,
# epoch_metrics.csv. A part that fails or runs out of time is recorded as such and the next runs.
set -uo pipefail
cpu=0
[ "${1:-}" = "--cpu" ] && { cpu=1; shift; }
out=${1:-${OUT:-outputs/gpu_check}}
work=${GPU_CHECK_WORK:-outputs/gpu_check_work}
budget=${GPU_CHECK_BUDGET_S:-460}  # seconds for all parts; each also has its own limit below
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd) work=$(cd "$work" && pwd)
results=$out/results.jsonl log=$out/run.log
: > "$results"
: > "$log"
start=$SECONDS
py() { python3 "$@"; }

record() {  # record PART RC SECONDS [JSON from the part]: one line of results.jsonl
  py - "$@" >> "$results" <<'PY'
import json, sys
part, rc, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
text = sys.argv[4].strip().splitlines()[-1] if len(sys.argv) > 4 and sys.argv[4].strip() else ""
try:
    found = json.loads(text) if text.startswith("{") else {}
except json.JSONDecodeError:
    found = {}
line = {"part": part, "rc": rc, "seconds": round(seconds, 1)}
if rc in (124, 137):
    line["error"] = "ran out of its time limit"
elif rc:
    line["error"] = f"exit status {rc}; see run.log"
print(json.dumps({**line, **found}))
PY
}

part() {  # part NAME LIMIT_S COMMAND...: run it within its limit and the whole budget, record it
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - start)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    record "$name" 124 0 '{"error": "skipped: the check ran out of its time budget"}'
    return
  fi
  echo "== $name (at most ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS stdout rc
  stdout=$(timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" 2>>"$log")  # a command or a function below
  rc=$?
  printf '%s\n' "$stdout" >> "$log"
  record "$name" "$rc" "$((SECONDS - t0))" "$stdout"
  tail -1 "$results"
}

export cpu out work
export -f py

# --- what this machine is --------------------------------------------------------------------
part env 60 python3 -c '
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu (" + platform.machine() + ")",
                  "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
                  "bf16": cuda and torch.cuda.is_bf16_supported(), "python": platform.python_version()}))'

# --- CIFAR-10 --------------------------------------------------------------------------------
if [ -z "${MAELAB_CIFAR10:-}" ]; then
  archive=${CIFAR10_ARCHIVE:-.device/cifar10-jpeg.tar.gz}
  if [ ! -d data/cifar10-jpeg/train ] && [ -f "$archive" ]; then
    mkdir -p data && tar xzf "$archive" -C data
  fi
  [ -d data/cifar10-jpeg/train ] && export MAELAB_CIFAR10=$PWD/data/cifar10-jpeg
fi

# --- 1. the gpu tests ------------------------------------------------------------------------
gpu_tests() {
  python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs > "$out/gpu_tests.log" 2>&1
  local rc=$?
  py - "$out/gpu_tests.log" <<'PY'
import json, re, sys
lines = open(sys.argv[1]).read().strip().splitlines()
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", lines[-1] if lines else "")}
print(json.dumps({"tests": counts, "summary": lines[-1] if lines else ""}))
PY
  return $rc
}
export -f gpu_tests
if [ $cpu = 1 ]; then export MAELAB_GPU_REHEARSAL=1; fi
part gpu_tests 130 gpu_tests

# --- 2. maelab bench beside HF ViTMAE --------------------------------------------------------
bench() {  # bench NAME LIMIT_S TARGET_IMG_PER_S OVERRIDES...
  local name=$1 limit=$2 target=$3; shift 3
  if [ $cpu = 1 ]; then  # tiny sizes, a real trace by torch.compile without generating kernels
    set -- "$@" data.batch_size=4 model.depth=1 model.embed_dim=64 model.num_heads=2 task.decoder_depth=1 \
      task.decoder_width=32 task.decoder_heads=2 --steps 2 --warmup 1 --compile --compile-backend eager
  else
    set -- "$@" --steps 30 --warmup 10
  fi
  part "$name" "$limit" python3 -m maelab bench "$@" --compare hf --target "$target" --profile "$out/profiles.txt"
}
: > "$out/profiles.txt"
bench bench_vitb 100 5900 +experiment=mae_vitb data.batch_size=256
bench bench_vitl 120 3300 +experiment=mae_vitl data.batch_size=256
bench bench_cifar 70 37000 +experiment=mae_vitt_cifar10 augment=rrc_flip data.batch_size=4096

# --- 3. mae_vitt_cifar10 through maelab train ------------------------------------------------
epochs() {
  local run=$work/epoch
  rm -rf "$run"
  if [ $cpu = 1 ]; then
    set -- trainer=cpu trainer.max_epochs=2 trainer.limit_train_batches=3 trainer.limit_val_batches=1 \
      data.batch_size=16 task.effective_batch_size=null model.depth=1 model.embed_dim=32 model.num_heads=2 \
      task.decoder_depth=1 task.decoder_width=16 task.decoder_heads=2 callbacks.knn_monitor=null \
      callbacks.throughput.window=1
  else  # 12 steps an epoch: windows of 4 steps, the steady state from epochs 2 and 3 (compilation excluded)
    set -- trainer=gpu trainer.max_epochs=3 callbacks.throughput.window=4
  fi
  python3 -m maelab train +experiment=mae_vitt_cifar10 augment=rrc_flip task.compile=true trainer.log_every_n_steps=1 \
    trainer.enable_progress_bar=false hydra.run.dir="$run" "$@" >&2 || return $?
  cp "$(ls "$run"/reconstructions/*.png | tail -1)" "$out/reconstructions.png"
  cp "$(find "$run" -name metrics.csv | head -1)" "$out/epoch_metrics.csv"
  py - "$run/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("epochs", "global_step", "effective_batch_size", "train/img_per_s", "peak_memory_gb", "elapsed_s")
print(json.dumps({**{k: r[k] for k in keys}, "last": r["last"]}))
PY
}
export -f epochs
if [ -n "${MAELAB_CIFAR10:-}" ]; then
  part epoch_cifar 80 epochs
else
  record epoch_cifar 1 0 '{"error": "no CIFAR-10: set MAELAB_CIFAR10 or put cifar10-jpeg.tar.gz at .device/"}'
fi

# --- the summary: every figure against its target ---------------------------------------------
py - "$results" <<'PY' | tee -a "$results"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
failed = [r["part"] for r in rows if r.get("rc")]
tests = next((r.get("tests") for r in rows if r["part"] == "gpu_tests"), None)
summary = {"part": "summary", "failed_parts": failed, "tests": tests, "targets": {}}
for r in rows:
    if r["part"].startswith("bench_") and "img_per_s" in r:
        summary["targets"][r["part"]] = {
            "img_per_s": r["img_per_s"], "target": r.get("target_img_per_s"), "met": r.get("target_met"),
            "speedup_vs_hf": r.get("speedup_vs_hf"), "speedup_vs_hf_eager": r.get("speedup_vs_hf_eager"),
        }
vitb = summary["targets"].get("bench_vitb", {})
if vitb.get("speedup_vs_hf") is not None:
    summary["targets"]["vitb_vs_hf"] = {"ratio": vitb["speedup_vs_hf"], "target": 1.3, "met": vitb["speedup_vs_hf"] >= 1.3}
print(json.dumps(summary))
PY
echo "gpu_check: $((SECONDS - start)) s; results in $out" | tee -a "$log"
