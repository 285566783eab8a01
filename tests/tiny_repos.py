"""Tiny diffusers/transformers repos written from configs (random weights, tokenizers from vocab files the
test writes), saved in the folder layouts of real Hub repos and loaded through ``from_pretrained``
offline. Shared by the pipeline, generate, serve and bench tests."""

from __future__ import annotations

import json
import os
import shutil

import torch

from distpp.presets import _TINY, _TINY_XL

VOCAB_MAX_LEN = 8
_REPOS: dict[str, str] = {}  # name -> folder, built once per test session


# ------------------------------------------------------------------------------------------------------
# Tiny repos (built once per session).
# ------------------------------------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """CLIP's byte-to-unicode table: the 256 symbols a byte-level BPE vocabulary must hold."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _save_tokenizer(folder: str, merges: str = "c a\nca t</w>\n") -> int:
    """A CLIPTokenizer with a tiny vocabulary (bytes, bytes + </w>, 'cat', specials); returns its size.
    ``merges`` (BPE merge rules, one a line) changes how prompts split into ids, not the vocabulary."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    src = folder + "_src"
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + merges)
    tok = CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"),
                        model_max_length=VOCAB_MAX_LEN)
    tok.save_pretrained(folder)
    shutil.rmtree(src)
    return len(vocab)


def _text_encoder(hidden: int, projection: int | None, vocab: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=VOCAB_MAX_LEN,
                         projection_dim=projection or hidden,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _unet(config: dict, seed: int, **over):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(config, **over)).eval()


def _vae(seed: int, **over):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    cfg = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
               norm_num_groups=8, layers_per_block=1, sample_size=32)
    return AutoencoderKL(**dict(cfg, **over)).eval()


def _save_scheduler(folder: str, cls_name: str, **over) -> None:
    """A scheduler config of ``cls_name`` on the SD training schedule (what released students ship)."""
    import diffusers

    from distpp.schedules import SD_SCHEDULE

    getattr(diffusers, cls_name)(**dict(SD_SCHEDULE, **over)).save_pretrained(folder)


def _student_pipeline(teacher: str, folder: str, index_class: str, unet, scheduler: tuple[str, dict]) -> None:
    """A full student pipeline (Turbo / LCM-Dreamshaper style): the teacher's encoders and VAE, its own UNet
    and scheduler."""
    shutil.copytree(teacher, folder)
    for sub in ("unet", "scheduler"):
        shutil.rmtree(os.path.join(folder, sub))
    unet.save_pretrained(os.path.join(folder, "unet"))
    _save_scheduler(os.path.join(folder, "scheduler"), scheduler[0], **scheduler[1])
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    index.update(_class_name=index_class, scheduler=["diffusers", scheduler[0]])
    if index_class == "LatentConsistencyModelPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)


def _save_teacher(root: str, xl: bool) -> None:
    from diffusers import DDPMScheduler

    os.makedirs(root)
    vocab = _save_tokenizer(os.path.join(root, "tokenizer"))
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    if xl:
        _save_tokenizer(os.path.join(root, "tokenizer_2"))
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
        # SDXL: states = [enc1 16 | enc2 16] = 32 = cross_attention_dim; pooled = enc2 projection 32.
        _text_encoder(16, None, vocab, 11).save_pretrained(os.path.join(root, "text_encoder"))
        _text_encoder(16, 32, vocab, 12).save_pretrained(os.path.join(root, "text_encoder_2"))
    else:
        _text_encoder(32, None, vocab, 11).save_pretrained(os.path.join(root, "text_encoder"))
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)
    _unet(_TINY_XL if xl else _TINY, 2).save_pretrained(os.path.join(root, "unet"))
    _vae(3).save_pretrained(os.path.join(root, "vae"))
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        os.path.join(root, "scheduler"))


def _save_config_only(folder: str, config: dict) -> None:
    """A UNet folder with config.json and no weights: errors must come before any weights load."""
    os.makedirs(folder)
    cfg = dict(_unet(config, 0).config)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(cfg, _class_name="UNet2DConditionModel"), f)


LORA_RANK, LORA_ALPHA = 4, 8  # scale alpha / rank = 2: what the adapter metadata carries


def _save_lora(teacher_unet_dir: str, folder: str, metadata: bool) -> None:
    """A UNet LoRA (rank 4, alpha 8) with random non-zero A and B, saved by diffusers' own
    ``save_lora_weights`` (keys prefixed ``unet.``); with ``metadata`` its LoraConfig goes into the
    safetensors header as ``lora_adapter_metadata``, as diffusers >= 0.35 training scripts save it.
    Without it, a reader can only infer alpha = rank (scale 1)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(teacher_unet_dir)
    torch.manual_seed(7)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    layers = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=config.to_dict() if metadata else None)


def build_tiny_repos(root: str) -> dict[str, str]:
    """Write every tiny repo the pipeline tests load; returns name -> folder.

    sd_teacher, xl_teacher:  SD1.5- / SDXL-style teacher pipelines (DDPMScheduler config);
    xl_teacher_lm:           xl_teacher with a VAE whose config has latents_mean / latents_std;
    sd_lcm, xl_lcm:          LCM UNet folders (time_cond_proj_dim);
    sd_lcm_pipe:             an SD1.5 LCM student pipeline (LatentConsistencyModelPipeline, LCMScheduler);
    sd_lcm_tok:              sd_lcm_pipe with the teacher's encoder weights but another tokenizer (other merges);
    xl_turbo:                an SDXL Turbo-style student pipeline (EulerAncestralDiscreteScheduler, trailing);
    sd_file, xl_file:        UNet state-dict files (safetensors) in the teachers' architectures (sd_file also
                             one of cross_attention_dim 16, which fits no teacher);
                             xl_file also holds a torch .bin copy (DMD2 ships one);
    lora, lora_meta:         one SD1.5 LoRA saved without / with diffusers' adapter metadata;
    bad_channels, bad_width: UNet configs with no weights that do not fit sd_teacher.
    """
    from safetensors.torch import save_file

    r = {n: os.path.join(root, n) for n in (
        "sd_teacher", "sd_lcm", "sd_file", "xl_teacher", "xl_teacher_lm", "xl_lcm", "xl_turbo", "xl_file",
        "sd_lcm_pipe", "sd_lcm_tok", "bad_channels", "bad_width", "lora", "lora_meta")}
    _save_teacher(r["sd_teacher"], xl=False)
    _save_teacher(r["xl_teacher"], xl=True)
    shutil.copytree(r["xl_teacher"], r["xl_teacher_lm"])
    shutil.rmtree(os.path.join(r["xl_teacher_lm"], "vae"))
    _vae(3, latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[0.9, 1.2, 0.7, 1.1]).save_pretrained(
        os.path.join(r["xl_teacher_lm"], "vae"))
    _unet(_TINY, 21, time_cond_proj_dim=32).save_pretrained(r["sd_lcm"])
    _unet(_TINY_XL, 22, time_cond_proj_dim=32).save_pretrained(r["xl_lcm"])
    os.makedirs(r["sd_file"])
    save_file(_unet(_TINY, 23).state_dict(), os.path.join(r["sd_file"], "student_4step_unet.safetensors"))
    save_file(_unet(_TINY, 27, cross_attention_dim=16).state_dict(),
              os.path.join(r["sd_file"], "other_width.safetensors"))
    os.makedirs(r["xl_file"])
    xl_sd = _unet(_TINY_XL, 25).state_dict()
    save_file(xl_sd, os.path.join(r["xl_file"], "student_unet.safetensors"))
    torch.save(xl_sd, os.path.join(r["xl_file"], "student_unet.bin"))
    _student_pipeline(r["xl_teacher"], r["xl_turbo"], "StableDiffusionXLPipeline", _unet(_TINY_XL, 24),
                      ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing")))
    _student_pipeline(r["sd_teacher"], r["sd_lcm_pipe"], "LatentConsistencyModelPipeline",
                      _unet(_TINY, 26, time_cond_proj_dim=32),
                      ("LCMScheduler", dict(original_inference_steps=50, timestep_scaling=10.0)))
    shutil.copytree(r["sd_lcm_pipe"], r["sd_lcm_tok"])
    shutil.rmtree(os.path.join(r["sd_lcm_tok"], "tokenizer"))
    _save_tokenizer(os.path.join(r["sd_lcm_tok"], "tokenizer"), merges="c a\n")  # "cat" -> "ca", "t</w>"
    _save_config_only(r["bad_channels"], dict(_TINY, in_channels=8, out_channels=8))
    _save_config_only(r["bad_width"], dict(_TINY, cross_attention_dim=16))
    if _has_peft():
        for name, metadata in (("lora", False), ("lora_meta", True)):
            _save_lora(os.path.join(r["sd_teacher"], "unet"), r[name], metadata)
    return r


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def tiny_repos_for(tmp_path_factory) -> dict[str, str]:
    """The session's tiny repos, built on first use (shared with test_generate)."""
    if not _REPOS:
        _REPOS.update(build_tiny_repos(str(tmp_path_factory.mktemp("tiny_repos"))))
    return _REPOS


# ------------------------------------------------------------------------------------------------------
# Tiny flow-matching (SD3-style) pipelines: CLIP-L + CLIP-G with projection, a T5 encoder, an
# SD3Transformer2DModel, a 16-channel VAE with shift_factor, FlowMatchEulerDiscreteScheduler.
# ------------------------------------------------------------------------------------------------------
T5_MAX_LEN = 6


def _save_t5_tokenizer(folder: str) -> int:
    """A T5 tokenizer (tokenizers Unigram model) over a tiny vocabulary written here; returns its size."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "▁", "▁a", "▁cat", "▁red", "▁dog", *"actredog"]
    tok = T5Tokenizer(vocab=[(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)], extra_ids=0,
                      model_max_length=T5_MAX_LEN)
    tok.save_pretrained(folder)
    return len(pieces)


def _t5_encoder(d_model: int, vocab: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _sd3_transformer(seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    # joint_attention_dim = the T5 width 48 (the CLIP states, 16 + 16, are zero-padded to it); pooled = 16 + 16.
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
                                 pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16).eval()


def _save_sd3_teacher(root: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    os.makedirs(root)
    vocab = _save_tokenizer(os.path.join(root, "tokenizer"))
    _save_tokenizer(os.path.join(root, "tokenizer_2"))
    t5_vocab = _save_t5_tokenizer(os.path.join(root, "tokenizer_3"))
    _text_encoder(16, 16, vocab, 31).save_pretrained(os.path.join(root, "text_encoder"))
    _text_encoder(16, 16, vocab, 32).save_pretrained(os.path.join(root, "text_encoder_2"))
    _t5_encoder(48, t5_vocab, 33).save_pretrained(os.path.join(root, "text_encoder_3"))
    _sd3_transformer(34).save_pretrained(os.path.join(root, "transformer"))
    _vae(35, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609).save_pretrained(os.path.join(root, "vae"))
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(root, "scheduler"))
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5Tokenizer"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)


def build_tiny_sd3_repos(root: str) -> dict[str, str]:
    """sd3_teacher: an SD3.5-style teacher pipeline; sd3_turbo: a Turbo-style student pipeline (the teacher's
    encoders and VAE, its own transformer). Returns name -> folder."""
    r = {n: os.path.join(root, n) for n in ("sd3_teacher", "sd3_turbo")}
    _save_sd3_teacher(r["sd3_teacher"])
    shutil.copytree(r["sd3_teacher"], r["sd3_turbo"])
    shutil.rmtree(os.path.join(r["sd3_turbo"], "transformer"))
    _sd3_transformer(36).save_pretrained(os.path.join(r["sd3_turbo"], "transformer"))
    return r


# ------------------------------------------------------------------------------------------------------
# Tiny FLUX-style pipelines: CLIP-L (CLIPTextModel, pooled), T5, FluxTransformer2DModel (packed 2x2 patches),
# a 16-channel VAE with shift_factor, FlowMatchEulerDiscreteScheduler.
# ------------------------------------------------------------------------------------------------------
def _flux_transformer(seed: int, guidance_embeds: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    # in_channels 64 = 16 latent channels x a 2x2 patch; joint_attention_dim = the T5 width 48; pooled = CLIP 16.
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                  pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(4, 4, 8)).eval()


def _save_flux_pipeline(root: str, transformer, scheduler: dict) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    os.makedirs(root)
    vocab = _save_tokenizer(os.path.join(root, "tokenizer"))
    t5_vocab = _save_t5_tokenizer(os.path.join(root, "tokenizer_2"))
    _text_encoder(16, None, vocab, 41).save_pretrained(os.path.join(root, "text_encoder"))
    _t5_encoder(48, t5_vocab, 42).save_pretrained(os.path.join(root, "text_encoder_2"))
    transformer.save_pretrained(os.path.join(root, "transformer"))
    _vae(43, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159).save_pretrained(os.path.join(root, "vae"))
    FlowMatchEulerDiscreteScheduler(**scheduler).save_pretrained(os.path.join(root, "scheduler"))
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5Tokenizer"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)


def build_tiny_flux_repos(root: str) -> dict[str, str]:
    """flux_dev: a FLUX.1-dev-style teacher (guidance_embeds, dynamic shifting); flux_schnell: a schnell-style
    student (no guidance embedding, shift 1, no dynamic shifting), the same encoders and VAE;
    flux_dynamic: flux_schnell with a dynamically shifted schedule (the mu path); flux_own_text: flux_schnell
    with CLIP weights of its own (not shared with the teacher). Returns name -> folder."""
    r = {n: os.path.join(root, n) for n in ("flux_dev", "flux_schnell", "flux_dynamic", "flux_own_text")}
    _save_flux_pipeline(r["flux_dev"], _flux_transformer(44, True),
                        dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15))
    _save_flux_pipeline(r["flux_schnell"], _flux_transformer(45, False), dict(shift=1.0, use_dynamic_shifting=False))
    shutil.copytree(r["flux_schnell"], r["flux_dynamic"])
    shutil.rmtree(os.path.join(r["flux_dynamic"], "scheduler"))
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=16, max_image_seq_len=256).save_pretrained(
        os.path.join(r["flux_dynamic"], "scheduler"))
    shutil.copytree(r["flux_schnell"], r["flux_own_text"])
    shutil.rmtree(os.path.join(r["flux_own_text"], "text_encoder"))
    _text_encoder(16, None, _save_tokenizer(r["flux_own_text"] + "_tok"), 46).save_pretrained(
        os.path.join(r["flux_own_text"], "text_encoder"))
    shutil.rmtree(r["flux_own_text"] + "_tok")
    return r
