#!/usr/bin/env bash
# Seed-compatible entry point (DeepSparkInference's scripts/infer_ssd_fp16_accuracy.sh), gated.
#   DATASETS_DIR=/path/to/coco WEIGHT=ssd300_coco_20210803_015428-d231a06e.pth \
#     bash scripts/infer_ssd_fp16_accuracy.sh [--bs 32] [--precision auto|fp16|bf16|fp32]
#   MODEL=tiny bash scripts/infer_ssd_fp16_accuracy.sh     (the embedded model: no data needed)
# Runs the accuracy gate (pytest -m accuracy: the floors, and the AP drop against PyTorch) on
# the TVM engine at the given batch and precision; the exit code is the gate's. The original's
# FP16 is a GPU precision: on a CPU this script says which precision it uses instead (bf16
# where the CPU has avx512_bf16, else fp32) and why.
set -euo pipefail
# shellcheck source=scripts/_common.sh
. "$(dirname "$0")/_common.sh"
data_args=()
if [ "$MODEL" = ssd300 ]; then
  : "${DATASETS_DIR:?error: set DATASETS_DIR to the COCO root (annotations/instances_val2017.json, images/val2017/)}"
  : "${WEIGHT:?error: set WEIGHT to ssd300_coco_20210803_015428-d231a06e.pth}"
  data_args=(--datasets-dir "$DATASETS_DIR" --weight "$WEIGHT")
fi
exec .venv/bin/python -m pytest tests/test_accuracy.py -m accuracy --require-data \
  --models "$MODEL" --backends tvm --precisions "$precision" --batch-size "$bs" \
  "${data_args[@]}" "${trust_args[@]}"
