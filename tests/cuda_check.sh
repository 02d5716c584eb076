#!/usr/bin/env bash
# Everything the CUDA backend is checked with, in one call on a GPU machine (from the repository
# root, with torch, nvcc, ninja and pytest installed):
#
#   tests/cuda_check.sh            build, test suite on CUDA, sanitizers, benchmark
#   tests/cuda_check.sh build tests sanitize bench     the same stages, any subset, in order
#
# build:    compiles fastops in place for this GPU's architecture (FASTOPS_CUDA=1)
# tests:    the whole suite (the device fixture adds cuda), slow tests included
# sanitize: the CUDA tests under compute-sanitizer memcheck and racecheck, without the caching
#           allocator so that out-of-bounds accesses hit unallocated memory (not the tests
#           that trip a device-side assert on purpose)
# bench:    bench/run.py on the GPU in float32, float16 and bfloat16 -> bench/results/<gpu>.csv
#           and .md
set -euo pipefail
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitize bench)
log_dir=${FASTOPS_CHECK_LOGS:-build/cuda_check}
mkdir -p "$log_dir"

run_stage() {
  case "$1" in
    build)
      arch=$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
      echo "+ build for sm_${arch/./}"
      if ! FASTOPS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
          MAX_JOBS=${MAX_JOBS:-$(nproc)} python setup.py build_ext --inplace \
          > "$log_dir/build.log" 2>&1; then
        grep -E -A3 "error" "$log_dir/build.log" | head -60
        exit 1
      fi
      grep -E "warning" "$log_dir/build.log" | sort -u | head -20 || true
      python -c 'import fastops, sys; sys.exit(0 if fastops.cuda_available() else "no CUDA kernels")'
      ;;
    tests)
      echo "+ pytest (cpu and cuda, slow included)"
      python -m pytest -q -p no:cacheprovider tests/ 2>&1 | tee "$log_dir/tests.log" | tail -5
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        echo "+ compute-sanitizer --tool $tool (CUDA tests, fast suite)"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
          --error-exitcode 99 --target-processes all \
          python -m pytest -q -p no:cacheprovider -x -m "not slow" \
          -k "cuda and not gradcheck and not out_of_range" \
          tests/ > "$log_dir/$tool.log" 2>&1 || { tail -40 "$log_dir/$tool.log"; exit 1; }
        tail -3 "$log_dir/$tool.log"
      done
      ;;
    bench)
      echo "+ benchmark"
      python -m bench.run --device cuda --dtype float32,float16,bfloat16 2>&1 | tee "$log_dir/bench.log"
      ;;
    *) echo "unknown stage $1 (build, tests, sanitize, bench)" >&2; exit 2 ;;
  esac
}

for stage in "${stages[@]}"; do
  run_stage "$stage"
done
