# Sourced by the seed-compatible scripts: parse "--bs N --precision P", resolve the
# precision for the TVM engine on this host, and TRUST_CHECKPOINT=1 -> --trust-checkpoint
# (a full unpickle of $WEIGHT, which can run code: only for a file you trust).
# fp16 is the original's GPU precision; this TVM
# build runs CPU engines only (CUDA engines compile but need a CUDA runtime), so on a CPU:
# bf16 where avx512_bf16 exists, else fp32 — and the script says so.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bs=32; precision=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --bs) bs="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    *) echo "error: unknown argument $1 (use --bs N --precision auto|fp16|bf16|fp32)" >&2; exit 2 ;;
  esac
done
case "$bs" in ''|*[!0-9]*|0) echo "error: --bs must be a positive integer, got '$bs'" >&2; exit 2 ;; esac
case "$precision" in
  auto|fp16)
    if grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then new=bf16; why="the CPU has avx512_bf16"
    else new=fp32; why="this CPU has no avx512_bf16"; fi
    echo "[ssd_pipeline] precision $precision -> $new: fp16 is a GPU precision and this host runs the CPU engine ($why)" >&2
    precision=$new ;;
  bf16|fp32) ;;
  *) echo "error: unknown precision $precision (auto, fp16, bf16 or fp32)" >&2; exit 2 ;;
esac
MODEL=${MODEL:-ssd300}
case "$MODEL" in
  ssd300|tiny) ;;
  *) echo "error: unknown MODEL=$MODEL (ssd300, the default as in the original, or tiny)" >&2; exit 2 ;;
esac
trust_args=()
if [ "${TRUST_CHECKPOINT:-0}" = 1 ]; then trust_args=(--trust-checkpoint); fi
