"""Text-to-image with a distilled student and its teacher: ``Pipeline.from_pretrained`` + ``pipe(prompts)``.

One file per concern:
  pairs.py     KNOWN_PAIRS: released students, their teachers and the paper's settings;
  fetch.py     local folders vs Hub ids, offline errors, the one UNet loader (presets use it too);
  resolve.py   phase 1: every config read and checked, no weights -> a frozen LoadPlan (UNet or SD3 pipelines);
  load.py      phase 2: the weights (LoRA fused with its adapter metadata; encoders / VAE shared when equal);
  encode.py    one prompt encoder per model family, LRU cache per prompt: PromptEncoder (SD1.5 / SDXL CLIP),
               SD3PromptEncoder (CLIP-L + CLIP-G + T5), FluxPromptEncoder (CLIP-L + T5);
  pipeline.py  Pipeline: encode -> sample -> decode.
See README "Text-to-image pipeline".
"""

from .encode import FluxPromptEncoder, PromptEncoder, SD3PromptEncoder
from .load import LoadReport
from .pairs import KNOWN_PAIRS, KnownPair
from .pipeline import OUTPUT_TYPES, Pipeline, to_pil
from .resolve import LORA_FILE, STUDENT_KINDS, LoadPlan, check_pair_configs, resolve

__all__ = ["Pipeline", "PromptEncoder", "SD3PromptEncoder", "FluxPromptEncoder", "LoadReport", "LoadPlan",
           "KNOWN_PAIRS", "KnownPair", "OUTPUT_TYPES",
           "STUDENT_KINDS", "LORA_FILE", "check_pair_configs", "resolve", "to_pil"]
