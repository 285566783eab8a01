# Sampler stages of benchmarks/gpu_check.sh (sourced by its run_extra_stages; uses its run_stage, MODE, PY,
# OUT, SDXL, COMPILE, SWEEP). Default: SD1.5 architecture (random weights), fp16, 4 steps, G = 1, batch 1
# and 4: eager loop vs whole-loop CUDA graphs, the eager and research baselines, unguided runs, NVML
# telemetry; JSON + PNG per run under $OUT. --sdxl adds SDXL batch 1, --compile adds torch.compile
# (cold compiles take minutes), --sweep adds batches 2 and 8 and G = 2.
# In --cpu mode the same stages run on the tiny preset in float32 with 2 repeats (tests the plumbing).

SAMPLER_COMMON="--steps 4 --guided-steps 1 --graphs on --no-progress"
if [ "$MODE" = cpu ]; then
  SAMPLER_MODEL="--preset tiny --dtype float32 --device cpu"
  SAMPLER_REPS() { echo "--repeats 2 --warmup 1"; }
else
  SAMPLER_MODEL="--preset sd15 --dtype float16 --device cuda"
  SAMPLER_REPS() { if [ "$1" -ge 4 ]; then echo "--repeats 10 --warmup 3"; else echo "--repeats 20 --warmup 3"; fi; }
fi

# sampler_stage NAME BATCH [EXTRA ARGS...]
sampler_stage() {
  local name="$1" batch="$2"; shift 2
  run_stage "$name" "$PY -m distpp.bench $SAMPLER_MODEL $SAMPLER_COMMON --batch $batch $(SAMPLER_REPS "$batch") $* --json '$OUT/$name.json' --plot '$OUT/$name.png'"
}

sampler_stage sampler_b1 1
sampler_stage sampler_b4 4
if [ "${SDXL:-0}" = 1 ]; then
  if [ "$MODE" = cpu ]; then sampler_stage sampler_sdxl_b1 1 --preset tiny_xl
  else sampler_stage sampler_sdxl_b1 1 --preset sdxl --repeats 10; fi
fi
if [ "${COMPILE:-0}" = 1 ]; then
  # CPU mode traces with dynamo's eager backend: Inductor's cold CPU compile takes minutes on 2 cores
  if [ "$MODE" = cpu ]; then COMPILE_ARGS="--compile-backend eager"; else COMPILE_ARGS=""; fi
  sampler_stage sampler_compile_b1 1 --backend compile $COMPILE_ARGS --variants unguided,distpp,eager
fi
if [ "${SWEEP:-0}" = 1 ]; then
  sampler_stage sampler_b2 2
  sampler_stage sampler_b8 8
  sampler_stage sampler_g2_b1 1 --guided-steps 2
fi

# Printed by gpu_check.sh's summary: one line per sampler run (medians, ratios, targets a/b/c).
print_sampler_summary() {
  ls "$OUT"/sampler_*.json >/dev/null 2>&1 || return 0
  "$PY" - "$OUT"/sampler_*.json <<'PYEOF'
import json, os, sys
print("sampler runs (median ms; targets: a outside-forwards loop % <= 3, b eager/graph >= 2, c guided/unguided <= bound)")
print(f"{'run':<20} {'device':<22} {'unguided':>9} {'distpp':>8} {'graph':>8} {'eager':>8} {'research':>8} "
      f"{'a %':>6} {'b x':>6} {'c':>6} {'c bound':>7} {'J/img':>6} {'capture s':>9} {'compile s':>9}")
for path in sys.argv[1:]:
    d = json.load(open(path))
    m = {r["variant"]: r for r in d["rows"]}
    t = d.get("targets", {})
    def ms(v):
        return f"{m[v]['median_ms']:.2f}" if v in m else "-"
    def f(k, fmt=".2f"):
        v = t.get(k)
        return format(v, fmt) if isinstance(v, float) else "-"
    e = m.get("distpp_graph", {}).get("energy_per_image_j")
    name = os.path.basename(path)[:-5]
    print(f"{name:<20} {d['env'].get('device_name', '?')[:22]:<22} {ms('unguided'):>9} {ms('distpp'):>8} "
          f"{ms('distpp_graph'):>8} {ms('eager'):>8} {ms('research'):>8} {f('a_outside_forwards_loop_pct'):>6} "
          f"{f('b_speedup_vs_eager'):>6} {f('c_guided_over_unguided', '.3f'):>6} {f('c_bound', '.3f'):>7} "
          f"{(format(e, '.2f') if e else '-'):>6} {d['settings'].get('graph_capture_s', 0):>9.2f} "
          f"{d['settings'].get('compile_s', 0):>9.1f}")
PYEOF
}
