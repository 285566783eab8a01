#!/usr/bin/env bash
# GPU check of distpp on a lent machine (see ../shared/DEVICE.md): offline install, csrc build for the
# card, the `cuda` test tier, the kernel benchmark. About 5 minutes on an H100. Writes logs and JSON under
# $OUT (default ./out) and prints a table of the stages last.
#
#   benchmarks/gpu_check.sh              # on the GPU machine (carry: [".whl"])
#   benchmarks/gpu_check.sh --dry-run    # print each stage's command, run nothing
#   benchmarks/gpu_check.sh --cpu        # run the stages on a CPU machine (host-only build, cuda tests skip,
#                                        # CPU bench mode): tests this script without a GPU
# Options: --sdxl (also SDXL latents in the kernel bench: default SD1.5 only, batches 1 4 8; and an SDXL
# sampler run), --compile (sampler bench with torch.compile UNets), --sweep (sampler batches 2, 8 and G = 2),
# --flux (FLUX.1 schnell + dev architecture at 1024, random weights, bf16: the guided/unguided loop ratio
# under graphs against issue 15's bound 1.30; needs ~48 GB of GPU memory; --cpu: the tiny_flux preset).
# Every stage logs to $OUT/<stage>.log; a failing stage is recorded and the next one still runs. The default
# run also times prompt -> image end to end (SD1.5 architecture with CLIP-L and the SD1.5 VAE, random
# weights; needs transformers, tokenizers and regex wheels in .whl/ beside diffusers') and one serve
# worker (benchmarks/gpu_check_extra.sh).
# Hook for the GPU-runtime work: define more stages in run_extra_stages below (e.g. the sampler bench).
set -u

MODE=gpu
SDXL=0
COMPILE=0
SWEEP=0
FLUX=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --cpu) MODE=cpu ;;
    --sdxl) SDXL=1 ;;
    --compile) COMPILE=1 ;;
    --sweep) SWEEP=1 ;;
    --flux) FLUX=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option $arg (use --dry-run, --cpu, --sdxl, --compile, --sweep, --flux)"; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUILD_DIR="${BUILD_DIR:-$PWD/build-gpu}"
SUMMARY="$OUT/stages.tsv"
: > "$SUMMARY"
START=$(date +%s)

# run_stage NAME COMMAND...: run (or print) one stage, log it, record status and seconds; never exits.
run_stage() {
  local name="$1"; shift
  local log="$OUT/$name.log"
  if [ "$MODE" = dry ]; then
    echo "[dry-run] $name: $*"
    printf '%s\t%s\t%s\n' "$name" "dry-run" "0" >> "$SUMMARY"
    return 0
  fi
  echo "== $name"
  local t0=$(date +%s)
  # each stage is capped (STAGE_TIMEOUT seconds, default 300) so one hung stage cannot eat the device budget
  timeout "${STAGE_TIMEOUT:-300}" bash -c "$*" > "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then status=ok; else status="FAILED(rc=$rc)"; tail -n 20 "$log"; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$SUMMARY"
  return 0
}

# ---- stages ----------------------------------------------------------------------------------------
run_stage env "nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>/dev/null || echo 'no nvidia-smi'; $PY -c 'import torch, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())'; nvcc --version | tail -n 2; cmake --version | head -n 1"

if [ "$MODE" = cpu ]; then
  echo "(cpu mode: using the installed packages; no offline install)"
else
  # diffusers + importlib_metadata (+ transformers, tokenizers, regex for the end-to-end stages) wheels
  # travel in .whl/ (the GPU image reaches no registry).
  run_stage install "test -d .whl && $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site; $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . && $PY -c 'import distpp, diffusers; print(\"distpp ok, diffusers\", diffusers.__version__)'"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$MODE" = cpu ]; then
  CMAKE_ARGS="-DDISTPP_WITH_CUDA=OFF"
else
  # Build for this card only (native) to keep the build short; falls back to 80;90 where cmake cannot detect.
  CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-native}"
fi
run_stage build_csrc "cmake -S . -B '$BUILD_DIR' $CMAKE_ARGS -DCMAKE_BUILD_TYPE=Release && cmake --build '$BUILD_DIR' -j \$(nproc) && ctest --test-dir '$BUILD_DIR' --output-on-failure"
if [ "$MODE" != cpu ]; then
  run_stage csrc_example "'$BUILD_DIR/distpp_example'"
fi
export DISTPP_KERNELS_LIB="$BUILD_DIR/libdistpp_kernels.so"

run_stage cuda_tests "$PY -m pytest -m cuda -q -p no:cacheprovider tests --junitxml='$OUT/cuda_tests.xml'"

BENCH_ARGS="--presets sd15 --batches 1 4 8"
[ "$SDXL" = 1 ] && BENCH_ARGS="--presets sd15 sdxl --batches 1 2 4 8"
run_stage bench_guidance "$PY benchmarks/bench_guidance.py $BENCH_ARGS --json '$OUT/bench_guidance.json'"

# Hook: the GPU-runtime issue adds its stages here (sampler bench eager vs graphs, SD1.5 fp16, 4 steps, G=1,
# batch 1 and 4), each as `run_stage NAME COMMAND`, writing JSON under $OUT.
run_extra_stages() {
  if [ -f benchmarks/gpu_check_extra.sh ]; then
    # shellcheck source=/dev/null
    . benchmarks/gpu_check_extra.sh
  fi
}
run_extra_stages

# ---- summary (last) --------------------------------------------------------------------------------
echo
echo "== distpp gpu_check ($MODE) in $(( $(date +%s) - START )) s; logs and JSON in $OUT"
if [ "$MODE" != dry ] && [ -f "$OUT/bench_guidance.log" ]; then
  grep -E "^(device|launches)" "$OUT/bench_guidance.log" || true
  awk '/^preset/{p=1} p && $0 !~ /^rows written/' "$OUT/bench_guidance.log" | head -n 40
fi
if [ "$MODE" != dry ] && type print_sampler_summary >/dev/null 2>&1; then print_sampler_summary; fi
if [ "$MODE" != dry ] && type print_e2e_summary >/dev/null 2>&1; then print_e2e_summary; fi
if [ "$MODE" != dry ] && type print_flux_summary >/dev/null 2>&1; then print_flux_summary; fi
printf '%-16s %-14s %s\n' stage status seconds
while IFS=$'\t' read -r name status secs; do printf '%-16s %-14s %s\n' "$name" "$status" "$secs"; done < "$SUMMARY"
grep -q FAILED "$SUMMARY" && exit 1
exit 0
