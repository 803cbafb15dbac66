#!/usr/bin/env bash
# The accelerator check: one command, under 8 minutes on one GPU or TPU host.
#
#   benchmarks/accelerator_check.sh [--quick] [OUT_DIR]     (default OUT_DIR: accelerator_check)
#
# 1. Throughput and MFU (benchmarks.throughput, train steps): U-Net-64 at 256x256 and
#    512x512, FCN-8s at 512x1024, float32 and bfloat16, on one device.
# 2. Spatial partitions (U-Net-64 at 512x512 split over 2 devices), when there are >= 2.
# 3. End-to-end training from a generated folder of 512x512 JPEGs (benchmarks.pipeline:
#    a nearly free model, so the host and the loop are what is timed): img/s end to end
#    and the step's own, the data-wait share, with 0 and 'auto' data workers.
# Writes OUT_DIR/accelerator_check.json (every record) and OUT_DIR/accelerator_check.md
# (the tables). --quick: tiny models and folders, seconds on a CPU (CI runs it).
set -euo pipefail

quick=0
out=accelerator_check
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -*) echo "unknown flag $arg; usage: $0 [--quick] [OUT_DIR]" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
python="${PYTHON:-python}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

devices=$("$python" -c "import jax; print(jax.local_device_count())")
auto_workers=$("$python" -c "from flaxseg.data.pipeline import auto_worker_count as a; print(a())")
if [ "$quick" = 1 ]; then
  "$python" -m benchmarks.throughput --models=unet --features=4 --depth=2 \
    --image_sizes=32,32x48 --batch_sizes=2 --dtype=float32,bfloat16 --steps=3 --warmup=1 \
    --pipeline_batches=0 --out_dir="$out/throughput"
  "$python" -m benchmarks.pipeline --quick --formats=jpg --out_dir="$out/pipeline"
else
  "$python" -m benchmarks.throughput --models=unet --features=64 --image_sizes=256,512 \
    --batch_sizes=8 --dtype=float32,bfloat16 --steps=10 --pipeline_batches=0 \
    --out_dir="$out/throughput"
  "$python" -m benchmarks.throughput --models=fcn8s --image_sizes=512x1024 --batch_sizes=4 \
    --dtype=float32,bfloat16 --steps=10 --pipeline_batches=0 --out_dir="$out/throughput_fcn"
  if [ "$devices" -ge 2 ]; then
    "$python" -m benchmarks.throughput --models=unet --features=64 --image_sizes=512 \
      --batch_sizes=8 --dtype=bfloat16 --parallel=mesh --num_devices=2 \
      --spatial_partitions=1,2 --steps=10 --pipeline_batches=0 --out_dir="$out/spatial"
  fi
  "$python" -m benchmarks.pipeline --sizes=512x512 --formats=jpg --count=256 \
    --crop=512x512 --batch_size=32 --batches=16 --workers="0,$auto_workers" \
    --train_steps=60 --out_dir="$out/pipeline"
fi

"$python" - "$out" <<'EOF'
import glob, json, os, sys

out = sys.argv[1]
records, tables = [], []
for path in sorted(glob.glob(os.path.join(out, "*", "*.jsonl"))):
    part = os.path.basename(os.path.dirname(path))
    with open(path) as f:
        records += [{"part": part, **json.loads(line)} for line in f if line.strip()]
    table = os.path.splitext(path)[0] + ".md"
    table = table if os.path.exists(table) else os.path.join(os.path.dirname(path), "results.md")
    with open(table) as f:
        tables.append(f"## {part}\n\n{f.read().strip()}\n")
with open(os.path.join(out, "accelerator_check.json"), "w") as f:
    json.dump(records, f, indent=1)
with open(os.path.join(out, "accelerator_check.md"), "w") as f:
    f.write("\n".join(tables))
print("\n".join(tables))
print(f"Wrote {out}/accelerator_check.json ({len(records)} records) and accelerator_check.md.")
EOF
