"""search_rotation: choose per RoSTELinear whether the online Hadamard rotation lowers the quantization
error on calibration data (RoSTE's rule), and apply_rotation to set it.

    err_rot   = MSE(Q_w(W H) - W H) + MSE(Q_a(X H) - X H)
    err_plain = MSE(Q_w(W) - W)     + MSE(Q_a(X) - X)
    rotate    = err_rot < err_plain          (a tie keeps the layer unrotated)
H the orthonormal Hadamard matrix of in_features, Q = fusedtune.reference.roste.fake_quant (asymmetric
min-max with clip_ratio; per output channel = per row of W, per token = per row of X), all in
float32. X is every input the layer saw over the calibration batches (less the padding tokens of dict
batches with a 2-D attention_mask), seen by forward pre-hooks under
torch.no_grad with the model in eval mode (the layers quantize as configured meanwhile); the hooks add
up the squared errors as the batches pass, so no input is kept.
A layer whose in_features has no Hadamard construction can only be unrotated (err_rotated None).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..reference import hadamard as href
from ..reference import roste as rref
from .checks import check_bits, check_clip, hadamard_ok
from .config import RotationConfig


def _roste_layers(model: nn.Module, what: str) -> dict:
    from ..nn import RoSTELinear  # noqa: PLC0415
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: expected an nn.Module, got {type(model).__name__}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RoSTELinear)}
    if not layers:
        raise ValueError(f"{what}: the model has no RoSTELinear layers; run fusedtune.roste.prepare (or "
                         "fusedtune.patch(model, 'roste')) first")
    return layers


def _mse(y: torch.Tensor, bits: int, clip_ratio: float) -> float:
    out, _ = rref.fake_quant(y, bits, "token", False, clip_ratio)
    return float((out - y).pow(2).mean())


def layer_errors(weight: torch.Tensor, x: torch.Tensor, w_bits: int, a_bits: int, clip_ratio: float):
    """(err_rotated or None, err_plain) for one layer: weight [out, in], x [tokens, in] (float32)."""
    w, x = weight.detach().float(), x.detach().float()
    plain = _mse(w, w_bits, clip_ratio) + _mse(x, a_bits, clip_ratio)
    if not hadamard_ok(w.shape[-1]):
        return None, plain
    rot = _mse(href.hadamard(w), w_bits, clip_ratio) + _mse(href.hadamard(x), a_bits, clip_ratio)
    return rot, plain


def _run(model, batch, what):
    if torch.is_tensor(batch):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        raise TypeError(f"{what}: each calibration batch must be a tensor (input ids), a dict of model "
                        f"keyword arguments or a tuple of positional ones, got {type(batch).__name__}")


def _sse(y: torch.Tensor, bits: int, clip_ratio: float) -> float:
    out, _ = rref.fake_quant(y, bits, "token", False, clip_ratio)
    return float((out - y).double().pow(2).sum())


def _layer_setting(found: dict, chosen: list, attr: str, value, what: str):
    """An explicit value, or (None) the one setting the chosen layers share."""
    if value is not None:
        return value
    vals = {getattr(found[n], attr) for n in chosen}
    if len(vals) != 1:
        raise ValueError(f"{what}: the layers differ in {attr} ({sorted(vals)}); pass {attr}= explicitly")
    return vals.pop()


def search_rotation(model: nn.Module, calibration_batches: Iterable, w_bits: int | None = None,
                    a_bits: int | None = None, clip_ratio: float | None = None,
                    layers: Iterable[str] | None = None) -> RotationConfig:
    """The per-layer rotation choice (module docstring) for the RoSTELinear layers of a prepared model
    (all of them, or the names in `layers`). Changes nothing in the model (apply_rotation does).
    w_bits, a_bits, clip_ratio: what the errors are measured at; None (default) takes the layers' own
    settings (they must agree). The activation errors are summed batch by batch as the inputs pass
    (per-token quantization makes the mean over all tokens a sum of per-batch sums): nothing is kept."""
    what = "search_rotation"
    check_bits(what, "w_bits", w_bits, allow_none=True)
    check_bits(what, "a_bits", a_bits, allow_none=True)
    if clip_ratio is not None:
        check_clip(what, clip_ratio)
    found = _roste_layers(model, what)
    if layers is None:
        chosen = list(found)
    else:
        if isinstance(layers, str):
            raise TypeError(f"{what}: layers must be an iterable of layer names, got the string {layers!r}")
        chosen = list(layers)
        unknown = [n for n in chosen if n not in found]
        if unknown:
            raise ValueError(f"{what}: {unknown} are not RoSTELinear layers of the model (it has: "
                             f"{', '.join(found)})")
    w_bits = _layer_setting(found, chosen, "w_bits", w_bits, what)
    a_bits = _layer_setting(found, chosen, "a_bits", a_bits, what)
    clip_ratio = float(_layer_setting(found, chosen, "clip_ratio", clip_ratio, what))
    if isinstance(calibration_batches, torch.Tensor):
        raise TypeError(f"{what}: calibration_batches must be an iterable of batches (e.g. a list of input-id "
                        "tensors), got a single tensor; wrap it in a list")
    sums = {n: [0.0, 0.0, 0] for n in chosen}   # squared errors of X and of X H, elements seen
    current = {"keep": None}                       # the batch's non-padding tokens (a dict batch's attention_mask)

    def capture(name):
        rotatable = hadamard_ok(found[name].in_features)

        def hook(mod, args):
            x = args[0].detach().reshape(-1, mod.in_features).float()
            keep = current["keep"]
            if keep is not None and keep.numel() == x.shape[0]:   # padding tokens are not calibration data
                x = x[keep.to(x.device)]
            acc = sums[name]
            acc[0] += _sse(x, a_bits, clip_ratio)
            if rotatable:
                acc[1] += _sse(href.hadamard(x), a_bits, clip_ratio)
            acc[2] += x.numel()
        return hook

    handles = [found[n].register_forward_pre_hook(capture(n)) for n in chosen]
    modes = {m: m.training for m in model.modules()}
    n_batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in calibration_batches:
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                current["keep"] = mask.reshape(-1).bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
                _run(model, batch, what)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    if n_batches == 0:
        raise ValueError(f"{what}: calibration_batches is empty")
    rotate, err_rot, err_plain = {}, {}, {}
    for n in chosen:
        sse_plain, sse_rot, count = sums[n]
        if not count:
            raise ValueError(f"{what}: layer {n} saw no input over the calibration batches")
        w = found[n].weight.detach().float()
        p = _mse(w, w_bits, clip_ratio) + sse_plain / count
        r = _mse(href.hadamard(w), w_bits, clip_ratio) + sse_rot / count if hadamard_ok(w.shape[-1]) else None
        rotate[n], err_rot[n], err_plain[n] = (r is not None and r < p), r, p
    return RotationConfig(rotate, err_rot, err_plain, w_bits, a_bits, clip_ratio)


def apply_rotation(model: nn.Module, config: RotationConfig) -> dict[str, bool]:
    """Set each named RoSTELinear's `rotate` flag from the config (layers it does not name keep theirs);
    returns {name: rotate} of the layers whose flag changed. Refuses, before changing anything, names
    that are not RoSTELinear layers of the model and rotation of a size without a Hadamard construction."""
    what = "apply_rotation"
    if not isinstance(config, RotationConfig):
        raise TypeError(f"{what}: config must be a RotationConfig, got {type(config).__name__}")
    config.validate()
    found = _roste_layers(model, what)
    check_rotation(found, config, what)
    changed = {}
    for n, r in config.rotate.items():
        if found[n].rotate != r:
            changed[n] = r
        found[n].rotate = r
    return changed


def check_rotation(found: Mapping[str, nn.Module], config: RotationConfig, what: str) -> None:
    """ValueError for names not in `found` ({name: module with in_features}) and for rotations of sizes
    without a Hadamard construction."""
    unknown = [n for n in config.rotate if n not in found]
    if unknown:
        raise ValueError(f"{what}: the rotation config names layers the model does not have as RoSTE "
                         f"targets: {unknown}")
    bad = [f"{n} (in_features {found[n].in_features})" for n, r in config.rotate.items()
           if r and not hadamard_ok(found[n].in_features)]
    if bad:
        raise ValueError(f"{what}: cannot rotate {', '.join(bad)}: no Hadamard construction for that size")
