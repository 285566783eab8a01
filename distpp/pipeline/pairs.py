"""Released students with their teachers and the paper's settings (README "Known pairs")."""

from __future__ import annotations

from dataclasses import dataclass

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD35_LARGE = "stabilityai/stable-diffusion-3.5-large"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"


@dataclass(frozen=True)
class KnownPair:
    """A released student with its teacher and the paper's settings (ALGORITHM.md "Defaults and ranges").

    None of these was run in distpp's CPU tests (no weights can be downloaded there); ids as published.
    The flow pairs' lam and cfg are not published for Distillation++ with these students: chosen (lam 0.05 as
    for Turbo; cfg 3.5, SD3.5's usual CFG and FLUX.1-dev's default embedded guidance), not measured; sweep
    them with seed-paired runs.
    student_weights: the UNet state-dict file inside ``student`` (SDXL-Lightning, DMD2), else None.
    """

    student: str
    teacher: str
    family: str
    lam: float
    steps: int = 4
    guided_steps: int = 1
    cfg: float = 7.5
    student_weights: str | None = None


KNOWN_PAIRS: dict[str, KnownPair] = {
    "lcm-sdxl": KnownPair("latent-consistency/lcm-sdxl", SDXL_BASE, "lcm", 0.01),
    "lcm-lora-sdxl": KnownPair("latent-consistency/lcm-lora-sdxl", SDXL_BASE, "lcm", 0.01),
    "dmd2": KnownPair("tianweiy/DMD2", SDXL_BASE, "dmd2", 0.01, student_weights="dmd2_sdxl_4step_unet_fp16.bin"),
    "sdxl-lightning": KnownPair("ByteDance/SDXL-Lightning", SDXL_BASE, "euler", 0.1,
                                student_weights="sdxl_lightning_4step_unet.safetensors"),
    "sdxl-turbo": KnownPair("stabilityai/sdxl-turbo", SDXL_BASE, "euler_a", 0.05),
    "sd15-lcm-lora": KnownPair("latent-consistency/lcm-lora-sdv1-5", SD15_BASE, "lcm", 0.01),
    "sd15-lcm-dreamshaper": KnownPair("SimianLuo/LCM_Dreamshaper_v7", "Lykon/dreamshaper-7", "lcm", 0.01),
    "sd35-turbo": KnownPair("stabilityai/stable-diffusion-3.5-large-turbo", SD35_LARGE, "flow", 0.05, cfg=3.5),
    # FLUX.1-dev embeds its guidance scale (one teacher forward, no uncond); cfg is that input.
    "flux-schnell": KnownPair("black-forest-labs/FLUX.1-schnell", FLUX_DEV, "flow", 0.05, cfg=3.5),
}
