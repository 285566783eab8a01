"""Where weights live: local folders or Hub ids, read with clear errors offline.

The one place distpp tells a Hub id from a path and loads a UNet (``Pipeline.from_pretrained`` and
``distpp.presets.load_pair`` both come here). Nothing in this module loads weights except
:func:`load_unet`, :func:`from_pretrained` and :func:`load_state_dict`; the rest reads configs and file
headers.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import torch

from ..errors import WeightsNotFoundError

# "org/name" or "name" (letters, digits, '.', '_', '-'); anything else is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(ref: str) -> bool:
    """True when ``ref`` (already ``~``-expanded) is not an existing path and reads as a Hub id."""
    ref = str(ref)
    return not os.path.exists(ref) and _HUB_ID.fullmatch(ref) is not None


def offline(local_files_only: bool | None) -> bool:
    """Whether to stay off the network: ``local_files_only``, else the HF_HUB_OFFLINE setting."""
    if local_files_only is not None:
        return bool(local_files_only)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _offline_hint(ref: str, is_offline: bool) -> str:
    return " (offline: the Hub id is not in the local cache; pre-download it or pass a folder)" \
        if is_offline and is_hub_id(ref) else ""


def check_exists(ref: str) -> None:
    """Raise WeightsNotFoundError for a local path that does not exist (Hub ids pass)."""
    if not is_hub_id(ref) and not os.path.exists(ref):
        raise WeightsNotFoundError(f"no model folder at {ref!r}; pass an existing diffusers folder or a Hub id "
                                   "such as 'org/name'")


def fetch(ref: str, filename: str, subfolder: str | None, is_offline: bool) -> str | None:
    """Local path of ``subfolder/filename`` in ``ref`` (Hub files are downloaded or read from the
    cache); None when the repo has no such file. Raises WeightsNotFoundError when ``ref`` itself is
    missing (no folder; Hub id unknown or unreachable)."""
    check_exists(ref)
    if not is_hub_id(ref):
        path = os.path.join(ref, subfolder or "", filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(ref, filename, subfolder=subfolder, local_files_only=is_offline)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: must come first
        if is_offline:
            return None
        raise WeightsNotFoundError(f"could not reach the Hub for {ref!r}; pass a local folder or pre-download it")
    except EntryNotFoundError:
        return None
    except RepositoryNotFoundError as e:
        raise WeightsNotFoundError(f"no Hub repository {ref!r}; pass a local folder or an existing Hub id") from e
    except OSError as e:
        raise WeightsNotFoundError(f"could not fetch {filename!r} from {ref!r}: {e}") from e


def fetch_required(ref: str, filename: str, subfolder: str | None, is_offline: bool, what: str) -> str:
    path = fetch(ref, filename, subfolder, is_offline)
    if path is None:
        where = f"{subfolder}/{filename}" if subfolder else filename
        raise WeightsNotFoundError(f"{what}: {ref!r} has no {where}{_offline_hint(ref, is_offline)}")
    return path


def read_json(ref: str, filename: str, subfolder: str | None, is_offline: bool, what: str) -> dict:
    with open(fetch_required(ref, filename, subfolder, is_offline, what)) as f:
        return json.load(f)


def read_json_or_empty(ref: str, filename: str, subfolder: str | None, is_offline: bool) -> dict:
    path = fetch(ref, filename, subfolder, is_offline)
    if path is None:
        return {}
    with open(path) as f:
        return json.load(f)


def from_pretrained(loader: Callable, ref: str, what: str, **kw):
    """``loader(ref, **kw)`` (a diffusers/transformers ``from_pretrained``) with its errors as
    WeightsNotFoundError naming ``what``."""
    try:
        return loader(ref, **kw)
    except (OSError, ValueError) as e:
        sub = f" (subfolder {kw['subfolder']})" if kw.get("subfolder") else ""
        raise WeightsNotFoundError(f"could not load {what} weights from {ref!r}{sub}: {e}. Offline, pass a local "
                                   "folder or pre-download the model into the Hub cache") from e


def load_unet(ref: str, *, subfolder: str | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32, local_files_only: bool | None = None):
    """A diffusers UNet2DConditionModel from a local folder or a Hub id, in eval mode without grads."""
    from diffusers import UNet2DConditionModel

    ref = os.path.expanduser(str(ref))
    check_exists(ref)
    kw = {} if local_files_only is None else {"local_files_only": bool(local_files_only)}
    unet = from_pretrained(UNet2DConditionModel.from_pretrained, ref, "UNet", subfolder=subfolder,
                           torch_dtype=dtype, **kw)
    if device is not None:
        unet = unet.to(device)
    return unet.eval().requires_grad_(False)


def state_dict_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a state-dict file without reading its tensors (safetensors header, or a
    memory-mapped torch zip file: a multi-GB state dict must not be loaded to check it)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) torch.save format cannot be mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in sd.items()}


def safetensors_metadata(path: str) -> dict[str, str]:
    """The string metadata of a safetensors header ({} for other files)."""
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
