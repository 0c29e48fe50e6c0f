"""SparseDeltaLinear: a frozen base weight plus k trainable float32 deltas (sparse fine-tuning)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .._inference import Stamp
from ..backend import warn_once
from ..ops._linear import refuse_double_backward
from ..ops.sparse_delta import check_delta_grad, check_indices, dense_fp32_dw, sparse_delta_linear
from .masters import OwnsMasters, keep_dtype
from .plain import plain_linear, refuse_meta


class _WindowLinear(torch.autograd.Function):
    """y = x W^T + b over the merged weight; backward: dX, the dense dW (to the sink), dW at the deltas'
    positions as their gradient, the weight's and bias's gradients where they train."""

    @staticmethod
    def forward(ctx, x, weight, values, indices, bias, sink):
        ctx.save_for_backward(x, weight, indices)
        ctx.sink, ctx.bias_dtype = sink, None if bias is None else bias.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("SparseDeltaLinear", ctx, 2, "deltas")   # dx below is from the merged weight
        x, weight, indices = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = (dy @ weight.to(dy.dtype)).to(x.dtype) if need[0] else None
        dW = dense_fp32_dw(dy2, x2.to(dy2.dtype))
        dv = dW.view(-1).index_select(0, indices.long()) if need[2] else None    # before the sink reduces dW
        dw = dW.to(weight.dtype, copy=True) if need[1] else None     # a base the user unfroze trains on, too
        db = dy2.float().sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[4] else None
        ctx.sink(dW)
        return dx, dw, dv, None, db, None


@torch._dynamo.disable
def _window_linear(x, weight, values, indices, bias, sink):
    """_WindowLinear eagerly, a graph break under torch.compile (window steps only): its backward calls the
    sink (a collective, the Regrower's accumulators), which a compiled backward must not trace."""
    return _WindowLinear.apply(x, weight, values, indices, bias, sink)


class SparseDeltaLinear(OwnsMasters):
    """y = x W^T + b with W = W0 + scatter(delta) kept merged in place.

    weight       the merged weight (frozen Parameter): W0 everywhere except at `indices`, where it
                 holds round(base_values + values); forward is one dense GEMM over it
    indices      int32 buffer [k]: flat row-major positions r * in_features + c, sorted, unique
    base_values  buffer [k]: W0 at those positions (W's dtype), so revert_() restores W0 exactly
    values       trainable float32 Parameter [k]: the deltas, the truth (bf16 rounding of the merged
                 weight never loses an update); their gradient comes from an SDDMM at the k
                 positions or, on a GPU at densities where cuBLAS is faster, from dW formed in float32
                 blocks of rows (delta_grad: "auto", "sddmm" or "dense"; docs/sparse_delta.md).
                 SparseDeltaAdamW updates them and the merged weight in one pass; if anything else
                 changes them, the next eager forward merges them again (any optimizer's step merges
                 them at once; a compiled forward does not check: after an in-place edit of the
                 values under torch.compile, call masters_written_elsewhere()).

    from_linear shares the linear's weight storage (no copy of the model): the merged deltas show in
    the original nn.Linear's weight too, and revert_() (or fusedtune.unpatch) gives it back W0 bit
    for bit. Pass a copy of the linear to keep the original untouched.
    """

    _dense_sink = None           # dense_grad's sink while in window mode (an instance attribute then)


    @classmethod
    def from_linear(cls, linear: nn.Linear, density: float = 0.01, seed: int = 0, indices=None,
                    backend: str | None = None, delta_grad: str = "auto") -> "SparseDeltaLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseDeltaLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        check_delta_grad(delta_grad, "SparseDeltaLinear.from_linear")
        refuse_meta("SparseDeltaLinear.from_linear", linear.weight, "the chosen delta positions are stored now (on "
                    "the weight's device: to_empty would leave them garbage)")
        numel = linear.weight.numel()
        if not linear.weight.is_contiguous():
            raise ValueError("SparseDeltaLinear.from_linear: the linear's weight is not contiguous (a transposed view "
                             f"of another weight, strides {linear.weight.stride()}): the deltas live at flat row-major "
                             "positions of the weight's own storage; give the linear a contiguous weight")
        if numel >= 2 ** 31:
            raise ValueError(f"SparseDeltaLinear.from_linear: the weight has {numel} elements; int32 flat indices "
                             "address at most 2**31 - 1")
        if indices is None:
            if not 0 < density <= 1:
                raise ValueError(f"SparseDeltaLinear.from_linear: density must be in (0, 1], got {density}")
            k = max(1, round(density * numel))
            g = torch.Generator().manual_seed(int(seed))
            indices = torch.randperm(numel, generator=g)[:k].sort().values.to(torch.int32)
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        m.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        m.backend, m.delta_grad = backend, delta_grad
        dev = linear.weight.device
        m.register_buffer("indices", torch.empty(0, dtype=torch.int32, device=dev))
        m.register_buffer("base_values", torch.empty(0, dtype=linear.weight.dtype, device=dev))
        m.values = nn.Parameter(torch.empty(0, device=dev))
        m.set_indices(indices)
        return m

    def set_indices(self, indices: torch.Tensor, values: torch.Tensor | None = None,
                    keep_parameter: bool = False) -> None:
        """Revert the current deltas, select new positions (base re-read from W0), set the deltas
        (default 0) and merge. The float32 deltas become a new Parameter (optimizer state resets), or,
        with keep_parameter=True and an unchanged k, are written into the same Parameter (what DDP,
        FSDP and EMA copies hold on to; the caller realigns the optimizer state, as Regrower does)."""
        if not torch.is_tensor(indices):   # a list of positions
            indices = torch.tensor(indices, dtype=torch.int32)
        indices = indices.to(device=self.weight.device)
        check_indices(indices, self.weight.numel(), "SparseDeltaLinear")
        if values is not None and (values.shape != indices.shape):
            raise ValueError(f"SparseDeltaLinear: values {tuple(values.shape)} do not match indices "
                             f"{tuple(indices.shape)}")
        if self.indices.numel():
            self.revert_()
        with torch.no_grad():
            self.indices = indices.contiguous().clone()    # (not the caller's tensor: an edit of it moved the deltas)
            self.base_values = self.weight.view(-1).index_select(0, self.indices.long()).clone()
            v = torch.zeros(indices.shape, dtype=torch.float32, device=self.weight.device) if values is None \
                else values.detach().to(device=self.weight.device, dtype=torch.float32).clone()
        if keep_parameter and isinstance(self.values, nn.Parameter) and self.values.shape == v.shape:
            with torch.no_grad():
                self.values.copy_(v)
            self.values.grad = None      # it belonged to the old positions
        else:
            self.values = nn.Parameter(v)
            self.bind_masters()
        self.merge_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Checked before anything is written (torch copies every entry whose shape matches before it reports a
        mismatch: the merged weight of a checkpoint of another density overwrote W0): the checkpoint's deltas
        must be as many as this layer's and its indices valid (unsorted ones gave wrong delta gradients). A
        plain nn.Linear checkpoint (weight and bias, strict=False) is a new base W0: the deltas stay and are
        merged over it. Deltas without a weight (strict=False) are merged over this layer's W0."""
        got = {leaf: state_dict[prefix + leaf] for leaf in ("indices", "values", "base_values")
               if torch.is_tensor(state_dict.get(prefix + leaf))}
        k = self.indices.numel()
        bad = [f"size mismatch for {prefix}{leaf}: the checkpoint has {k_} deltas, this layer {k}"
               for leaf, t in got.items() if (k_ := t.numel()) != k or t.dim() != 1]
        if not bad and "indices" in got:
            try:
                check_indices(got["indices"], self.weight.numel(), f"{prefix}indices")
            except (TypeError, ValueError) as e:
                bad.append(str(e))
        weight = state_dict.get(prefix + "weight")
        if not bad and "indices" in got and "base_values" not in got and weight is not None:
            bad.append(f"{prefix}base_values missing: the checkpoint's weight has its deltas merged, so W0 at its "
                       "indices is unknown")
        if bad:
            hint = " (a checkpoint of another density loads into a layer made with that density)" \
                if "deltas, this layer" in bad[0] else ""
            error_msgs.extend(bad + [f"nothing of the SparseDeltaLinear {prefix[:-1] or '(the root module)'} was "
                                     f"loaded{hint}"])
            return
        plain = weight is not None and not got and tuple(weight.shape) == tuple(self.weight.shape)
        remerge = plain or (weight is None and bool(got))
        if weight is None and got:
            self.revert_()       # the weight is W0: new positions read their base from it
            if "indices" in got and "base_values" not in got:
                state_dict[prefix + "base_values"] = self.weight.detach().view(-1).index_select(
                    0, got["indices"].to(self.weight.device).long())
        if plain:
            state_dict[prefix + "base_values"] = weight.detach().reshape(-1).index_select(
                0, self.indices.to(weight.device).long())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if remerge:
            self.merge_()

    def master_parameters(self) -> list[nn.Parameter]:
        """The trainable masters: the float32 deltas."""
        return [self.values]

    def _apply(self, fn, recurse=True):
        """Device moves move everything; a dtype conversion (model.to(torch.bfloat16), .half()) converts
        the weight, bias and base but keeps the float32 deltas, and merges them again in the new dtype."""
        dtype = self.weight.dtype
        out = super()._apply(keep_dtype(fn, self.master_parameters()), recurse)
        if self.weight.dtype != dtype and self.indices.numel():
            self.merge_()        # W[idx] = round(base + delta) in the new dtype, not the old merged value cast
        return out

    @torch.no_grad()
    def merge_(self) -> None:
        """W[idx] = round(base + delta)."""
        self.weight.view(-1).index_copy_(0, self.indices.long(), self._merged())
        self.__dict__["_merged_stamp"] = Stamp(self.values)

    def masters_written_elsewhere(self) -> None:
        self.__dict__["_merged_stamp"] = Stamp()      # (nn.Module's __setattr__ is slow)
        self._refresh_if_values_changed()

    def _refresh_if_values_changed(self) -> None:
        """`values` written by anything but SparseDeltaAdamW (another optimizer, load_state_dict, an
        in-place edit) would leave the merged weight stale: merge them again, and say so once."""
        stamp = self.__dict__.get("_merged_stamp")
        if stamp is None or not stamp.matches(self.values):   # (another tensor, or the same one written since)
            if self._merged_matches():   # rewritten with the same values (DDP's first broadcast, a load of them)
                self.__dict__["_merged_stamp"] = Stamp(self.values)
                return
            warn_once("sparse_delta values changed outside SparseDeltaAdamW",
                      "fusedtune: SparseDeltaLinear.values changed outside SparseDeltaAdamW (another optimizer, "
                      "a load or an in-place edit); the merged weight is refreshed from them (after that optimizer's "
                      "step, else before the forward). SparseDeltaAdamW updates deltas and weight in one pass "
                      "(with transformers.Trainer: optimizers=(report.optimizer, None); its default optimizer also "
                      "skips a Regrower).")
            self.merge_()

    @torch.no_grad()
    def _merged_matches(self) -> bool:
        """Whether the weight at the indices holds round(base + delta) for the current deltas (O(k))."""
        return torch.equal(self.weight.view(-1).index_select(0, self.indices.long()), self._merged())

    def _merged(self) -> torch.Tensor:
        """round(base + delta) in the weight's dtype, at the indices (float64 weights: summed in float64, so
        zero deltas leave them exact)."""
        if self.weight.dtype == torch.float64:
            return self.base_values + self.values.detach().double()
        return (self.base_values.float() + self.values.detach()).to(self.weight.dtype)

    @torch.no_grad()
    def revert_(self) -> None:
        """W[idx] = base: the weight becomes exactly W0 (the deltas are kept in `values`)."""
        self.weight.view(-1).index_copy_(0, self.indices.long(), self.base_values)

    @contextlib.contextmanager
    def dense_grad(self, sink):
        """Inside (regrowth's window steps), a backward through the layer also forms the dense weight
        gradient dW = dy^T x in float32 and hands it to sink(dW) (selection scores; the sink may reduce
        it over ranks in place); the deltas get dW at their positions through autograd, as the SDDMM
        gives them on other steps (so DDP reduces them as usual). The weight itself gets no .grad."""
        prev = self._dense_sink
        self._dense_sink = sink
        try:
            yield self
        finally:
            self._dense_sink = prev

    def dense_grad_off(self) -> None:
        """Leave window mode whatever set it (a sink whose Regrower is gone calls this)."""
        self._dense_sink = None

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_dense_sink", None)   # a copy is not in its original's window (its Regrower re-enters one)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.check_masters_bound()
            self._refresh_if_values_changed()
        sink = self._dense_sink   # (an attribute torch.compile guards on: a window recompiles; found by review,
        # a lookup in a module-keyed WeakKeyDictionary inside the traced forward took another layer's entry)
        if sink is not None and torch.is_grad_enabled():
            return _window_linear(x, self.weight, self.values, self.indices, self.bias, sink)
        # indices checked in set_indices (no host sync a call); a base the user unfroze gets its dW from the op
        return sparse_delta_linear(x, self.weight, self.values, self.indices, self.bias, backend=self.backend,
                                   check=False, delta_grad=getattr(self, "delta_grad", "auto"))

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear of the merged weight W0 + delta (merged again first if the values changed
        outside SparseDeltaAdamW, as the forward does)."""
        self._refresh_if_values_changed()
        return plain_linear(self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.indices.numel()} "
                f"({self.indices.numel() / max(1, self.weight.numel()):.2%}), bias={self.bias is not None}")

    def _fusedtune_report(self) -> dict:
        from ..ops.sparse_delta import describe_delta_grad, sparse_delta_backend
        from ..ops.sparse_delta_select import regrow_backend
        b = sparse_delta_backend(self.weight.device, self.backend)
        rg = regrow_backend(self.weight.device)["regrow_candidates"]
        grad = describe_delta_grad(self.weight.device, self.out_features, self.in_features, self.indices.numel(),
                                   self.weight.dtype, getattr(self, "delta_grad", "auto"), self.backend)
        return {"method": "sparse_delta", "backend": b["sddmm"]["backend"],
                "path": f"forward F.linear on the merged weight; delta grad: {grad}; SparseDeltaAdamW "
                        f"{b['sparse_adamw_']['backend']}; regrowth selection (if a Regrower runs) {rg['backend']}",
                "why_not": {**b["sddmm"]["why_not"], **b["sparse_adamw_"]["why_not"]}}
