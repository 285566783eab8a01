"""``python -m distpp.bench``: guided-sampling latency of distpp against baselines run in the same process.

One speed convention everywhere (table, JSON, README): **speed-up = baseline ms / distpp ms**, so > 1
means distpp is faster. Cost ratios (what guidance costs over the plain student) are named as time
ratios ("guided/unguided time ratio" = guided ms / unguided ms).

Latent loop (default): the sampling loop on latents, per stage (student forward, teacher forward,
guidance math, scheduler math, other), median and p90 over repeats, images/s, and the share of time
outside model forwards. Variants, all on the same models, seeds and settings:
  unguided   distpp, guided_steps = 0 (the plain student)        } sampled through a distpp Runtime
  distpp     distpp guided (fused ops, no host math in the loop) } (graphs off; ``--backend``)
  eager      the idiomatic diffusers way (distpp.baselines): the fair baseline } outside the Runtime
  research   the research code's way (batch-2B student, autograd on, host math) } on purpose
A preset brings its sampler defaults (the flow presets tiny_sd3, tiny_flux, sd35, flux: family flow with
its schedule options, the teacher's guidance form, w and lam); command-line options override them. The
baselines implement the VP families with CFG teachers only: for a flow preset or an embedded-guidance
teacher they are left out with a printed note (``settings["skipped"]`` in the JSON), never a crash.
With ``--graphs on``, through a Runtime with graphs on, warmed before timing (whole-loop CUDA graphs on a
GPU, timed per replay as stage "graph"; eager over static buffers on a CPU):
  distpp_graph    distpp guided
  unguided_graph  distpp unguided
  forwards_graph  the model forwards of the guided loop alone (no-op fused ops, a GraphRunner over the
                  Runtime's sampler): the yardstick for the time outside model forwards under graphs
and the issue's targets are evaluated (a: time outside forwards <= 3% of the loop; b: distpp_graph >= 2x
faster than eager; c: guided/unguided <= 1 + teacher forward / student loop + 0.02).

End to end (``--pipeline``): prompt -> image per stage (text encode, loop, VAE decode), with a tiny
random-weight SD1.5-style LCM pipeline built in memory by default (``--preset sd15``: the SD1.5
architecture with CLIP-L and the SD1.5 VAE, random weights), or any pair by path (``--student
--teacher --family``, or ``--pair``). Variants, from the very same modules:
  diffusers_unguided  diffusers' own pipeline for the student alone (LatentConsistencyModelPipeline for
                      an SD1.5 LCM; else the SD/SDXL pipeline with the student's scheduler), its own loop
  eager_guided        the eager guided baseline loop inside the Pipeline's encode / decode
  distpp              distpp.Pipeline, graphs off
  distpp_graph        distpp.Pipeline, graphs on, warmed before timing
Every timed call of every variant encodes prompts no call has encoded before ("a photo of object {i}"),
so no variant skips encoding through the Pipeline's prompt cache.

Timing: CUDA events on a GPU, perf_counter on a CPU; warm-up first, variants interleaved; a variant whose
p90 exceeds 1.5x its median is reported with a warning (a shared or busy machine). NVML telemetry
(distpp.telemetry) is sampled while timing on a GPU.

Layout: common.py (a timed Variant, interleaved timing, environment), latent.py (the latent loop),
e2e.py (end to end), report.py (table, speed-ups, warnings, plot), cli.py (arguments, one run, errors).
"""

from .cli import main, parse_args, run
from .common import E2E_STAGES, MAX_BATCH, NOISY_P90, Variant, time_variants
from .e2e import PIPELINE_SPEEDUPS, PIPELINE_VARIANTS, build_pipeline_variants, pipeline_targets
from .latent import GRAPH_VARIANTS, LATENT_SPEEDUPS, LATENT_VARIANTS, build_variants, graph_metrics, time_ratios
from .report import format_table, noisy_warnings, report, speedups

__all__ = ["main", "parse_args", "run", "Variant", "time_variants", "build_variants", "build_pipeline_variants",
           "speedups", "time_ratios", "noisy_warnings", "graph_metrics", "pipeline_targets", "format_table", "report",
           "E2E_STAGES", "MAX_BATCH", "NOISY_P90", "GRAPH_VARIANTS", "LATENT_VARIANTS", "PIPELINE_VARIANTS",
           "LATENT_SPEEDUPS", "PIPELINE_SPEEDUPS"]
