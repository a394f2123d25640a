#!/usr/bin/env bash
# Seed-compatible entry point (DeepSparkInference's scripts/infer_ssd_fp16_performance.sh):
#   bash scripts/infer_ssd_fp16_performance.sh [--bs 32] [--precision auto|fp16|bf16|fp32]
#   MODEL=tiny bash scripts/infer_ssd_fp16_performance.sh     (the embedded model)
# Engine-only throughput of the TVM engine against ONNX Runtime in the same run
# (pytest -m perf, pytest-benchmark), written to out/perf_ssd.json and out/perf_ssd.md/.png.
# Speed does not depend on the weights: without WEIGHT it uses the random-init SSD300. The exit
# code is the speed gate's (the TVM engine's floor, a ratio to ONNX Runtime in the same run).
set -euo pipefail
# shellcheck source=scripts/_common.sh
. "$(dirname "$0")/_common.sh"
mkdir -p out
weight_args=()
if [ -n "${WEIGHT:-}" ]; then weight_args=(--weight "$WEIGHT"); fi
rm -f out/perf_ssd.json
rc=0
.venv/bin/python -m pytest tests/test_perf.py -m perf -k test_engine_only --perf-model "$MODEL" \
  --backends tvm --precisions "$precision" --perf-batches "$bs" \
  --benchmark-json out/perf_ssd.json "${weight_args[@]}" "${trust_args[@]}" || rc=$?
# the report also when the floor is missed: the numbers are what one looks at then
if [ -s out/perf_ssd.json ]; then
  .venv/bin/ssd-pipeline report out/perf_ssd.json --markdown out/perf_ssd.md --plot out/perf_ssd.png
fi
exit "$rc"
