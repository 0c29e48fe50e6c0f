"""The AdamW element rule shared by every family's fused optimizer (csrc/include/fusedtune/adamw_math.h),
written operation for operation so that the C++ CPU and CUDA kernels are bit-identical to it."""
from __future__ import annotations

import numbers

import torch

CONST_KEYS = ("decay", "beta1", "omb1", "beta2", "omb2", "sbc2", "eps", "step_size")


def check_hparams(what: str, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """Refuse what torch.optim.AdamW refuses (lr, eps, weight_decay < 0; betas outside [0, 1)) and a step count
    outside [1, 2^31) (step 0 divides by zero in the bias correction), before anything changes."""
    if not (isinstance(step, int) and not isinstance(step, bool) and 1 <= step < 2 ** 31):
        raise ValueError(f"{what}: step must be an int in [1, 2^31), got {step!r}")
    def real(v):   # a number, or a one-element tensor (a scheduler's tensor lr); else None
        if torch.is_tensor(v):
            return float(v) if v.numel() == 1 and not v.is_complex() else None
        return float(v) if isinstance(v, numbers.Real) else None

    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        f = real(v)
        if f is None or not 0 <= f < float("inf"):
            raise ValueError(f"{what}: {name} must be a finite number >= 0, got {v!r}")
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        f = real(v)
        if f is None or not 0 <= f < 1:
            raise ValueError(f"{what}: {name} must be in [0, 1), got {v!r}")


def check_writable(what: str, entries) -> None:
    """In-place ops refuse what torch refuses: an inference tensor (made under torch.inference_mode) written
    outside inference mode. entries: per list entry, the tensors the op writes (None skipped). Checked before
    anything is written; not while compiling (dynamo cannot trace the mode query, and compiled code makes no
    inference tensors). The mode is read once per list."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    for i, tensors in enumerate(entries):
        if any(t is not None and t.is_inference() for t in tensors):
            raise RuntimeError(f"{what}: entry {i} is an inference tensor (made under torch.inference_mode), which "
                               "torch allows no in-place update of outside inference mode")


def check_distinct(what: str, i: int, *tensors) -> None:
    """The tensors of one list entry (parameter, gradient, moments, ...) must not share memory: the pass reads
    and writes them element by element, an alias would be read after it was written."""
    spans = sorted(_byte_span(t) for t in tensors if t is not None and t.numel())
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):   # overlapping views too, not only equal pointers
        raise ValueError(f"{what}: the tensors of entry {i} (parameter, gradient, moments) share memory")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes a non-empty tensor's elements can occupy (negative strides not possible in torch)."""
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def adamw_constants(lr, beta1, beta2, eps, weight_decay, step) -> dict:
    """Host-side constants, rounded to float32 once, shared by every backend."""
    lr, beta1, beta2, eps, weight_decay = (float(v) for v in (lr, beta1, beta2, eps, weight_decay))  # tensors too
    f = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return dict(decay=f(1.0 - lr * weight_decay), beta1=f(beta1), omb1=f(1.0 - beta1), beta2=f(beta2),
                omb2=f(1.0 - beta2), sbc2=f(bc2 ** 0.5), eps=f(eps), step_size=f(lr / bc1))


def pow_f32(b: float, n: torch.Tensor) -> torch.Tensor:
    """b^n (float32) for each int count in n, by binary exponentiation: low bit first, every product
    rounded to float32 (adamw_math.h pow_f32 does the same products in the same order)."""
    r = torch.ones(n.shape, dtype=torch.float32, device=n.device)
    x = torch.tensor(b, dtype=torch.float32, device=n.device)
    n = n.long()
    while bool((n > 0).any()):
        r = torch.where((n & 1) == 1, r * x, r)
        n = n >> 1
        x = x * x
    return r


def own_bias(c: dict, lr: float, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sbc2, step_size) per element for elements that took s Adam steps of their own, in float32 from
    the rounded betas (adamw_math.h adam_own_bias)."""
    one = torch.ones(s.shape, dtype=torch.float32, device=s.device)
    bc2 = one - pow_f32(c["beta2"], s)
    sbc2 = torch.sqrt(bc2.double()).float()   # correctly rounded (see adamw_)
    step_size = torch.full_like(one, float(torch.tensor(lr, dtype=torch.float32))) / (one - pow_f32(c["beta1"], s))
    return sbc2, step_size


def adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, c: dict,
           sbc2: torch.Tensor | None = None, step_size: torch.Tensor | None = None) -> torch.Tensor:
    """Update the float32 moments m, v in place and return the new float32 parameter values.
    sbc2, step_size: per-element bias corrections in place of c's (float32 tensors shaped like p)."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32, device=p.device)  # noqa: E731
    pf, gf = p.float() * f32(c["decay"]), g.float()
    m.copy_(f32(c["beta1"]) * m + f32(c["omb1"]) * gf)
    v.copy_(f32(c["beta2"]) * v + f32(c["omb2"]) * (gf * gf))
    # torch.sqrt on float32 CPU tensors is not correctly rounded; via float64 it is (53 >= 2*24+2).
    # A full-tensor divisor: ATen turns division by a scalar into a reciprocal multiply.
    sbc2 = torch.full_like(v, c["sbc2"]) if sbc2 is None else sbc2
    denom = torch.sqrt(v.double()).float() / sbc2 + f32(c["eps"])
    return pf - (f32(c["step_size"]) if step_size is None else step_size) * (m / denom)
