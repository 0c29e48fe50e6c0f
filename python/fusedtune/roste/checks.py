"""Argument checks shared by the model-level RoSTE API (clear errors, raised before anything changes)."""
from __future__ import annotations

import torch

from ..reference import hadamard as href

MARKER = "fusedtune_roste_rotation"   # model.config attribute rotate_model writes (saved with the config)


def check_bits(what: str, name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        need = "None or an int in [2, 8]" if allow_none else "an int in [2, 8]"
        raise ValueError(f"{what}: {name} must be {need}, got {value!r}")


def check_clip(what: str, clip_ratio) -> None:
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"{what}: clip_ratio must be a number in (0, 1], got {clip_ratio!r}")


def hadamard_ok(n: int) -> bool:
    """Whether a Hadamard matrix of order n is constructed (fusedtune.reference.hadamard.split_size)."""
    try:
        href.split_size(n)
    except ValueError:
        return False
    return True


def check_hadamard(what: str, role: str, n: int) -> None:
    """ValueError naming the role (e.g. "hidden size") and the supported sizes when n has no construction."""
    try:
        href.split_size(n)
    except ValueError as e:
        raise ValueError(f"{what}: the {role} {n} has no Hadamard construction here, so it cannot be rotated "
                         f"({e})") from None


def check_backend(what: str, backend, device) -> None:
    """Refuse, before anything changes, a backend RoSTE's ops (fake quantization, Hadamard) cannot run."""
    from .. import backend as _backend   # noqa: PLC0415
    from ..ops import roste as ops       # noqa: PLC0415
    _backend.refuse_unservable(what, backend, device, (("rotate_fake_quant", ops._HAS), ("hadamard", ops._HAD_HAS)),
                               "RoSTE's ops")


def check_in_place(model, what: str) -> None:
    """Refuse, before anything changes, a model whose weights cannot be changed in place: weights accelerate
    offloads (on the meta device between forwards) or inference tensors (made under torch.inference_mode)."""
    from ..patch import refuse_offloaded   # noqa: PLC0415 - patch imports the methods, which import this package
    refuse_offloaded(model, what)
    for name, p in model.named_parameters():
        if p.is_inference():
            raise ValueError(f"{what}: parameter {name} is an inference tensor (made under torch.inference_mode), "
                             "which cannot be changed in place; build or load the model outside inference mode. "
                             "Nothing was changed")


def own_config(model) -> None:
    """Give `model` a config object of its own before writing into it (the rotation record, untied embeddings, the
    K/V attention implementation): transformers models built from a config object (LlamaForCausalLM(cfg),
    from_config) share it with every other model built from it, which would then read as rotated, untied or
    quantizing K/V without being so. Every module of the model that holds the old object gets the copy."""
    import copy  # noqa: PLC0415
    cfg = getattr(model, "config", None)
    if cfg is None or model.__dict__.get("_fusedtune_own_config") is cfg:
        return
    new = copy.deepcopy(cfg)
    for m in model.modules():
        if m.__dict__.get("config") is cfg:
            m.config = new
    model.__dict__["_fusedtune_own_config"] = new


def rotated_already(model) -> dict | None:
    """What rotate_model recorded in model.config (a checkpoint saved after prepare carries it), or None."""
    return getattr(getattr(model, "config", None), MARKER, None)
