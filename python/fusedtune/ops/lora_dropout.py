"""fusedtune::lora_dropout: the LoRA branch's seeded dropout (reference.lora.dropout) as one op, for the paths that
run the branch as separate GEMMs (an FP8 base, an NF4 base under a wider input: LoRALinear._unfused_forward).

The seed is a tensor argument, read inside the op: as plain torch code the mask's Philox rounds took the seed as a
Python int, so torch.compile specialised the graph on it (a recompile a step, then the recompile limit: every
later step ran eagerly) and the host read broke the graph at every layer. Dropout is linear and its own adjoint,
so the backward applies the same mask (from the same seed) to the gradient: nothing is stored.
"""
from __future__ import annotations

import torch

from ..reference import lora as ref
from ._eager import EagerOp


def _impl(x2: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return ref.dropout(x2, p, int(seed))


_op = torch.library.custom_op("fusedtune::lora_dropout", mutates_args=())(_impl)


@_op.register_fake
def _(x2, seed, p):
    return x2.new_empty(x2.shape, dtype=ref.compute_dtype(x2))


def _setup_context(ctx, inputs, output):
    x2, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p, ctx.dtype = p, x2.dtype


def _backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return torch.ops.fusedtune.lora_dropout(grad, seed, ctx.p).to(ctx.dtype), None, None


_op.register_autograd(_backward, setup_context=_setup_context)
_dropout = EagerOp(_op, _impl, _setup_context, _backward)


def lora_dropout(x2: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """float32 (float64 for float64 input) dropout of the 2-D input x2 [M, K] with the LoRA branch's mask for
    `seed` (a one-element int64 tensor, lora._seed_tensor); p = 0: the float copy."""
    if x2.dim() != 2:
        raise ValueError(f"lora_dropout: x must be 2-D [M, K], got {tuple(x2.shape)}")
    ref.dropout_threshold(p)      # p in [0, 1), or a clear error
    if not torch.is_tensor(seed) or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device.type != "cpu":
        raise TypeError("lora_dropout: seed must be a one-element int64 CPU tensor")
    return _dropout(x2, seed.reshape(()), float(p))
