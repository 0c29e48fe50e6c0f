"""prepare: RoSTE quantization-aware fine-tuning set-up of a Llama / Qwen2 / Mistral causal LM, in place.

    a. fold each RMSNorm weight into the linears reading it, untie a tied lm_head
    b. merge the hidden-size rotation Q = H_n / sqrt(n) into the weights, and (head_rotation) the per-head
       rotation of V into v_proj / o_proj (rotate_model; RoSTE's R1 and R2)
    c. every q/k/v/o/gate/up/down_proj -> fusedtune.nn.RoSTELinear(w_bits, a_bits, clip_ratio), online
       rotation only for down_proj by default (RoSTE's R4), or as a RotationConfig says; lm_head and
       the embedding stay unquantized
    d. kv_bits: K/V fake quantization inside attention, K after RoPE and (kv_rotate) rotated over
       head_dim with q (fusedtune.roste.kv)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .architecture import check_float_params, inspect_model, linear_names
from .checks import check_backend, check_bits, check_clip, check_hadamard, check_in_place, rotated_already
from .config import RotationConfig
from .kv import add_kv_quant, kv_specs
from .rotate_model import rotate_model
from .search import check_rotation

_QUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PrepareReport:
    architecture: str
    hidden_size: int
    w_bits: int
    a_bits: int
    kv_bits: int | None
    clip_ratio: float
    quantized: list[str]                      # RoSTELinear layers
    rotated_online: list[str]                 # the ones with rotate=True
    kv_quantized: list[str]                   # attention modules quantizing K (after RoPE) and V
    untied_lm_head: bool
    folded_norms: int
    unquantized: list[str] = field(default_factory=lambda: ["model.embed_tokens", "lm_head"])
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fusedtune.roste.prepare: {self.architecture}, hidden {self.hidden_size} rotated offline by "
                 f"H/sqrt(n) (norms folded: {self.folded_norms}); W{self.w_bits}A{self.a_bits} "
                 f"clip {self.clip_ratio} on {len(self.quantized)} linears, {len(self.rotated_online)} with "
                 f"online rotation; KV: {'off' if self.kv_bits is None else f'{self.kv_bits} bits'}; "
                 f"unquantized: {', '.join(self.unquantized)}"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def prepare(model: nn.Module, w_bits: int = 4, a_bits: int = 4, kv_bits: int | None = None,
            clip_ratio: float = 0.95, rotation: RotationConfig | None = None, backend: str | None = None,
            ste: str = "identity", kv_rotate: bool = True, head_rotation: bool = True) -> PrepareReport:
    """Set up a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM for RoSTE training,
    in place (module docstring); every check runs before anything changes. Returns a PrepareReport.
    A model loaded from a checkpoint of a prepared one (save_pretrained writes rotate_model's record into
    config.json) is not rotated again: its layers are swapped and its K/V quantized only."""
    from ..nn import RoSTELinear  # noqa: PLC0415
    what = "prepare"
    check_bits(what, "w_bits", w_bits)
    check_bits(what, "a_bits", a_bits)
    check_bits(what, "kv_bits", kv_bits, allow_none=True)
    check_clip(what, clip_ratio)
    if ste not in ("identity", "clipped"):
        raise ValueError(f"{what}: ste must be 'identity' or 'clipped', got {ste!r}")
    if rotation is not None and not isinstance(rotation, RotationConfig):
        raise TypeError(f"{what}: rotation must be a RotationConfig (from search_rotation / RotationConfig.load) "
                        f"or None, got {type(rotation).__name__}")
    if isinstance(model, nn.Module):
        from ..patch import refuse_sharded   # (patch imports the methods, which import this module)
        refuse_sharded(model, what)
    if isinstance(model, nn.Module) and any(isinstance(m, RoSTELinear) for m in model.modules()):
        raise ValueError(f"{what}: the model already has RoSTELinear layers (prepared or patched already)")
    arch = inspect_model(model, what)
    check_float_params(model, what, _QUANT_DTYPES)
    check_in_place(model, what)
    check_backend(what, backend, next(model.parameters()).device)
    check_hadamard(what, "hidden size", arch.hidden_size)
    if kv_bits is not None and kv_specs(model):   # (add_kv_quant's own check would come after the swap)
        raise ValueError(f"{what}: the model already quantizes K/V; call fusedtune.roste.unprepare_kv(model) first, "
                         "or prepare with kv_bits=None")
    if kv_bits is not None and kv_rotate:
        check_hadamard(what, "head_dim (kv_rotate=True rotates q and k over it)", arch.head_dim)
    if head_rotation:
        check_hadamard(what, "head_dim (head_rotation=True rotates V per head)", arch.head_dim)
    names = linear_names(model)
    linears = {n: model.get_submodule(n) for n in names}
    from ..patch import bypassed_hooks  # noqa: PLC0415
    hooked = [(n, h) for n in names if (h := bypassed_hooks(linears[n]))]
    if hooked:
        raise ValueError(f"{what}: {hooked[0][0]} has a {hooked[0][1]}, which would silently stop running once "
                         f"the layer is a RoSTELinear ({len(hooked)} such layer(s)); remove the hooks, prepare, and "
                         "register them on the new layers. Nothing was changed")
    rotate = {n: n.endswith(".down_proj") for n in names}
    if rotation is not None:
        rotation.validate()
        check_rotation(linears, rotation, what)
        rotate.update(rotation.rotate)
    for n, r in rotate.items():
        if r:
            role = "intermediate size (down_proj's input, rotated online)" if n.endswith(".down_proj") else \
                f"input size of {n}"
            check_hadamard(what, role, linears[n].in_features)

    done = rotated_already(model)          # a checkpoint of a prepared model: its weights are rotated already
    rep = rotate_model(model, head_rotation) if not done else {"untied_lm_head": False, "folded_norms": 0}  # a + b
    for n in names:                                                        # c
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, RoSTELinear.from_linear(linears[n], w_bits, a_bits, rotate[n], clip_ratio, ste,
                                                       backend))
    kv = [] if kv_bits is None else add_kv_quant(model, kv_bits, clip_ratio, kv_rotate, backend)   # d
    notes = ["lm_head and embed_tokens stay unquantized (full precision)"]
    if done:
        notes.append(f"the weights were rotated already (config.fusedtune_roste_rotation = {done}: a checkpoint "
                     "of a prepared model); the offline rotation was not applied again (it would undo itself)")
    elif head_rotation:
        notes.append(f"V rotated per head by H_{arch.head_dim} (merged into v_proj / o_proj)")
    if rep["untied_lm_head"]:
        notes.append("lm_head was tied to embed_tokens: untied (own Parameter copy; "
                     "config.tie_word_embeddings = False), as the norm folding differs")
    if kv_bits is not None:
        how = " behind a head_dim Hadamard rotation of q and k" if kv_rotate else ""
        notes.append(f"K is fake-quantized after RoPE{how}, V per head, inside attention (attention "
                     f"implementation {model.config._attn_implementation!r} wrapping the previous one)")
    if rotation is not None and (rotation.w_bits, rotation.a_bits) != (w_bits, a_bits):
        notes.append(f"the rotation config was searched at W{rotation.w_bits}A{rotation.a_bits}, applied at "
                     f"W{w_bits}A{a_bits}")
    return PrepareReport(arch.name, arch.hidden_size, w_bits, a_bits, kv_bits, float(clip_ratio), names,
                         [n for n in names if rotate[n]], kv, rep["untied_lm_head"], rep["folded_norms"],
                         notes=notes)
