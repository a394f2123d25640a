#!/usr/bin/env bash
# Install the suite and its pinned stack into ./.venv (fresh machine or not; re-runs are cheap).
#   bash scripts/install.sh          runtime + TVM + test tools
# Order matters (shared/REFERENCE.md §5): the CPU torch wheel first (an unpinned torch pulls
# a multi-GB CUDA build), setuptools<81 (mmcv's setup.py and mmengine need pkg_resources),
# then mmcv 2.1.0 built from source with its ops against that torch (~7 min on 2 cores, once:
# pip caches the wheel), then everything else under constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$(date +%s)

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip_q() { pip install --disable-pip-version-check -q "$@"; }

pip_q -c constraints.txt torch 'setuptools<81' wheel numpy

if ! python -c "import mmcv, mmcv.ops" >/dev/null 2>&1; then
  echo "[install] building mmcv 2.1.0 with ops from source (first time ~7 min; cached after)"
  MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" pip_q --no-build-isolation -c constraints.txt mmcv
fi

pip_q -c constraints.txt -e '.[tvm,peers,test]'
python -c "import mmcv.ops, mmdet, onnxruntime, openvino, tvm; print('[install] ok: mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| onnxruntime', onnxruntime.__version__, '| openvino', openvino.__version__, '| tvm', tvm.__version__)"
echo "[install] done in $(( $(date +%s) - t0 )) s: activate with '. .venv/bin/activate'"
