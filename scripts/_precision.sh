# Sourced by the seed-compatible scripts: resolve --precision for the TVM engine on this host.
# fp16 is the original's GPU precision; this TVM build runs CPU engines only (CUDA engines
# compile but need a CUDA runtime), so on a CPU: bf16 where avx512_bf16 exists, else fp32.
case "$precision" in
  auto|fp16)
    if grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then new=bf16; else new=fp32; fi
    echo "[ssd_pipeline] precision $precision -> $new: fp16 is a GPU precision and this host runs the CPU engine ($new: $( [ "$new" = bf16 ] && echo 'the CPU has avx512_bf16' || echo 'no avx512_bf16 on this CPU'))" >&2
    precision=$new ;;
  bf16|fp32) ;;
  *) echo "error: unknown precision $precision (auto, fp16, bf16 or fp32)" >&2; exit 2 ;;
esac
