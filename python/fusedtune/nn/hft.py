"""RowMaskedLinear: a linear layer whose trainable part is a set of output rows (HFT row mode)."""
from __future__ import annotations

import torch
from torch import nn

from .._inference import Stamp
from ..backend import warn_once
from .masters import OwnsMasters, keep_dtype
from .plain import plain_linear, refuse_meta

from ..ops.hft import hft_row_linear


class RowMaskedLinear(OwnsMasters):
    """y = x W^T + b with W frozen except the rows `rows`.

    weight       the full weight, frozen (requires_grad False); the selected rows are kept equal to
                 the master copy rounded to W's dtype (MaskedAdamW writes them in its fused pass)
    weight_rows  trainable float32 master copy of the selected rows [len(rows), in_features]; its
                 gradient is computed for those rows only (one GEMM, no dense dW)
    rows         sorted int64 buffer of the selected output rows; frozen rows stay bit-identical
    bias         the full bias, frozen (requires_grad False) except its selected rows, kept equal to
                 bias_rows rounded (as for the weight)
    bias_rows    trainable float32 master of the bias at the selected rows [len(rows)] (None without a
                 bias): a selected output row trains its weight row and its bias entry, as a selected
                 matrix trains its weight and bias in matrix granularity (e.g. Qwen2's q/k/v biases)

    masters=False (HFT block granularity): `rows` must be one contiguous block [a, a + k). weight_rows
    and bias_rows are then views of the weight's (bias's) rows a..a+k-1, in the weight's dtype: the
    trained rows live in the weight itself, no copy of them exists, and any optimizer (torch.optim.AdamW,
    a bitsandbytes 8-bit Adam) updates them in place; its moments cover those rows only. The views are
    derived from the weight, so the state dict leaves them out; device moves, dtype conversions,
    copies and loads keep them views of the weight.
    """

    def __init__(self, in_features: int, out_features: int, rows: torch.Tensor, bias: bool = True,
                 device=None, dtype=None, masters: bool = True):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        with torch.no_grad():
            nn.Linear.reset_parameters(self)     # nn.Linear's initialization (the masters gather it below)
        self.register_buffer("rows", torch.empty(0, dtype=torch.int64, device=device))
        self.weight_rows = nn.Parameter(torch.empty(0, in_features, device=device, dtype=torch.float32))
        self.register_parameter("bias_rows", None)
        self.backend = None
        self.masters = bool(masters)
        self.set_rows(rows)

    @staticmethod
    def check_backend(what: str, backend, device) -> None:
        """Refuse, before anything is built or swapped, a backend name that is unknown or that the row-masked
        op cannot run on `device` (the first forward failed)."""
        from .. import backend as _backend  # noqa: PLC0415
        from ..ops.hft import _ROW_GRAD_HAS  # noqa: PLC0415
        _backend.refuse_unservable(what, backend, device, (("hft_row_grad", _ROW_GRAD_HAS),), "the row-masked op")

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: torch.Tensor, backend: str | None = None,
                    masters: bool = True) -> "RowMaskedLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"RowMaskedLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        cls.check_backend("RowMaskedLinear.from_linear", backend, linear.weight.device)
        refuse_meta("RowMaskedLinear.from_linear", linear.weight, "the trained rows' masters are copied from it now")
        if not linear.weight.is_contiguous() or (linear.bias is not None and not linear.bias.is_contiguous()):
            raise ValueError("RowMaskedLinear.from_linear: the linear's weight (or bias) is not contiguous (a "
                             f"transposed view of another tensor, strides {linear.weight.stride()}): the fused "
                             "optimizer writes the trained rows into it in place; give the linear a contiguous weight")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        m.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        m.register_buffer("rows", torch.empty(0, dtype=torch.int64, device=linear.weight.device))
        m.weight_rows = nn.Parameter(torch.empty(0, linear.in_features, device=linear.weight.device))
        m.register_parameter("bias_rows", None)
        m.backend = backend
        m.masters = bool(masters)
        m.set_rows(rows)
        return m

    def set_rows(self, rows) -> None:
        """Select new rows (in place). The masters of the new rows are gathered from the current weight and
        bias, except for rows selected before and still selected whose weight (and bias) still hold their
        master rounded: those keep their float32 master (a stage change loses no sub-ulp updates)."""
        given = torch.as_tensor(rows)
        if given.dtype == torch.bool or given.is_floating_point() or given.is_complex():
            raise TypeError(f"RowMaskedLinear: rows must be integer row indices, got a {given.dtype} tensor (a "
                            "boolean mask: pass mask.nonzero().squeeze(1))")
        rows = given.to(dtype=torch.int64, device=self.weight.device).reshape(-1)
        rows = torch.unique(rows)  # sorted
        if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= self.out_features):
            raise ValueError(f"RowMaskedLinear: rows must lie in [0, {self.out_features}), "
                             f"got [{int(rows[0])}, {int(rows[-1])}]")
        if not self.masters:
            self._block_start = self._check_block(rows)
        kept = self._kept_masters() if self.masters else None
        if kept is not None:   # masters another optimizer changed: into the weight first (they are the truth)
            self._refresh_if_masters_changed()
        self.rows = rows
        if self.masters:
            with torch.no_grad():
                master = self.weight.index_select(0, rows).float()
                bias_master = None if self.bias is None else self.bias.index_select(0, rows).float()
                if kept is not None:
                    self._carry_masters(kept, rows, master, bias_master)
        else:   # views of the block (new Parameters, sharing the weight's storage and version counter)
            master = self._block(self.weight)
            bias_master = None if self.bias is None else self._block(self.bias)
        self.weight_rows = nn.Parameter(master)
        self.bias_rows = None if bias_master is None else nn.Parameter(bias_master)
        self.bind_masters()
        self.mark_rows_written()

    def _kept_masters(self):
        """(rows, weight master, bias master) of the current selection, or None (no rows yet)."""
        w = getattr(self, "weight_rows", None)
        rows = getattr(self, "rows", None)
        if w is None or rows is None or rows.numel() == 0 or w.shape[0] != rows.numel():
            return None
        return rows, w.detach(), None if self.bias_rows is None else self.bias_rows.detach()

    @torch.no_grad()
    def _carry_masters(self, kept, rows, master, bias_master) -> None:
        """master[i] = the old master of rows[i] where rows[i] was selected and its weight (bias) entries
        equal that master rounded to their dtype (a row edited in the weight since takes the weight)."""
        old_rows, old_w, old_b = kept
        pos = torch.searchsorted(old_rows, rows).clamp_(max=old_rows.numel() - 1)
        new_i = (old_rows[pos] == rows).nonzero().squeeze(1)
        if new_i.numel() == 0:
            return
        old_i = pos[new_i]
        cand = old_w.index_select(0, old_i).to(master.device)
        same = (cand.to(self.weight.dtype) == self.weight.index_select(0, rows[new_i])).all(dim=1)
        if old_b is not None:
            cand_b = old_b.index_select(0, old_i).to(master.device)
            same &= cand_b.to(self.bias.dtype) == self.bias.index_select(0, rows[new_i])
            bias_master[new_i[same]] = cand_b[same]
        master[new_i[same]] = cand[same]

    # ------------------------------------------------------------------ masters=False: views of a block

    def _check_block(self, rows: torch.Tensor) -> int:
        """The first row of a contiguous block of sorted unique rows (masters=False needs one)."""
        n = rows.numel()
        if n and int(rows[-1]) - int(rows[0]) + 1 != n:
            raise ValueError(f"RowMaskedLinear(masters=False): rows must be one contiguous block [a, a + k) (the "
                             f"trained rows are a view of the weight), got {n} rows spread over "
                             f"[{int(rows[0])}, {int(rows[-1])}]")
        return int(rows[0]) if n else 0

    def _block(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()[self._block_start: self._block_start + self.rows.numel()]

    def _aliased(self) -> bool:
        """Whether weight_rows (bias_rows) are still the views of the weight's (bias's) block."""
        def same(view, full):
            return (view.device == full.device and view.dtype == full.dtype and view.is_contiguous()
                    and view.data_ptr() == full.data_ptr() + self._block_start * full.stride(0) * full.element_size())
        return same(self.weight_rows, self.weight) and (self.bias_rows is None or same(self.bias_rows, self.bias))

    @torch.no_grad()
    def _realias(self) -> None:
        """Point weight_rows (bias_rows) at the block of the current weight (bias), keeping the Parameter
        objects (an optimizer holds them): after a device move or dtype conversion (which make separate
        tensors), a copy and an assign-load."""
        if self.masters:
            return
        self.weight_rows.data = self._block(self.weight)
        if self.bias_rows is not None:
            self.bias_rows.data = self._block(self.bias)

    def bind_masters(self) -> None:
        if self.masters:    # views are ordinary parameters for the optimizers: nothing to write back
            super().bind_masters()

    def _bind_unowned(self) -> None:
        if self.masters:
            super()._bind_unowned()

    def __setstate__(self, state) -> None:
        state.setdefault("masters", True)    # pickled before masters=False existed
        super().__setstate__(state)
        self._realias()    # a deep copy copies the views as separate tensors

    def _masters(self) -> tuple:
        """The masters (weight_rows, and bias_rows where the layer has one); their stamp is checked every forward."""
        wr, br = self.weight_rows, self.bias_rows
        return (wr,) if br is None else (wr, br)

    def mark_rows_written(self) -> None:
        """Record that the weight's (bias's) selected rows hold the current masters, rounded (MaskedAdamW
        calls it after its fused step; anything that writes both calls it)."""
        self.__dict__["_rows_written"] = Stamp(*self._masters())

    @torch.no_grad()
    def write_rows_(self) -> None:
        """weight[rows] = round(weight_rows), bias[rows] = round(bias_rows): the masters are the truth.
        (masters=False: the rows are the weight's own; nothing to write.)"""
        if not self.masters:
            self.mark_rows_written()
            return
        self.weight.index_copy_(0, self.rows, self.weight_rows.detach().to(self.weight.dtype))
        if self.bias_rows is not None:
            self.bias.index_copy_(0, self.rows, self.bias_rows.detach().to(self.bias.dtype))
        self.mark_rows_written()

    @torch.no_grad()
    def _rows_match(self) -> bool:
        """Whether the weight's (bias's) selected rows hold the current masters, rounded."""
        if not self.masters:
            return True
        same = torch.equal(self.weight.index_select(0, self.rows), self.weight_rows.to(self.weight.dtype))
        if same and self.bias_rows is not None:
            same = torch.equal(self.bias.index_select(0, self.rows), self.bias_rows.to(self.bias.dtype))
        return same

    def masters_written_elsewhere(self) -> None:
        if self.masters:     # (views of the weight: written in place already)
            self.__dict__["_rows_written"] = Stamp()
            self._refresh_if_masters_changed()

    def _refresh_if_masters_changed(self) -> None:
        """Masters written by anything but MaskedAdamW (torch.optim.AdamW, an in-place edit) would leave
        the forward on stale rows, and training would silently do nothing: write them, and say so once."""
        stamp = self.__dict__.get("_rows_written")       # (a plain attribute: no getattr)
        if stamp is None or not stamp.matches(*self._masters()):   # (other tensors, or written since)
            if self._rows_match():   # rewritten with the same values (DDP's first broadcast, a load of them)
                self.mark_rows_written()
                return
            warn_once("hft row masters changed outside MaskedAdamW",
                      "fusedtune: RowMaskedLinear's masters (weight_rows/bias_rows) changed outside MaskedAdamW "
                      "(another optimizer or an in-place edit); the selected rows of the weight are rewritten "
                      "from them (after that optimizer's step, else before the forward). MaskedAdamW writes them "
                      "inside its fused step.")
            self.write_rows_()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.masters and not torch.compiler.is_compiling():
            self._refresh_if_masters_changed()   # the saved weight holds the masters as they are
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.masters:    # views of the weight (bias): saved with it
            destination.pop(prefix + "weight_rows", None)
            destination.pop(prefix + "bias_rows", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not self.masters:
            self._load_block(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            return
        # a plain checkpoint (an nn.Linear's: no masters), loaded with strict=False: the weight's rows are the
        # masters (else the old masters' write-back below undid the loaded weight at the selected rows)
        key = prefix + "weight_rows"
        if key not in state_dict and prefix + "weight" in state_dict:
            weight = state_dict[prefix + "weight"]
            rows = state_dict.get(prefix + "rows", self.rows).to(device=weight.device, dtype=torch.int64)
            state_dict[key] = weight.index_select(0, rows).float()
        # a state dict saved before bias_rows existed: the bias at the rows is its master
        key = prefix + "bias_rows"
        if self.bias_rows is not None and key not in state_dict and prefix + "bias" in state_dict:
            bias = state_dict[prefix + "bias"]
            rows = state_dict.get(prefix + "rows", self.rows).to(device=bias.device, dtype=torch.int64)
            state_dict[key] = bias.index_select(0, rows).float()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.rows.numel() == self.weight_rows.shape[0]:
            self.write_rows_()   # the loaded masters are the truth (the saved rows may predate a write-back)

    def _load_block(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """masters=False: the views are not in the state dict. The saved rows set the block first; an
        assign-load gets views of the new weight; a state dict that has weight_rows / bias_rows (e.g. of
        a masters=True layer) writes them into the block after the weight."""
        rows = state_dict.get(prefix + "rows")
        if torch.is_tensor(rows) and rows.shape == self.rows.shape and rows.numel():
            try:
                start = self._check_block(torch.unique(rows.to(torch.int64)))
            except ValueError as e:
                error_msgs.append(f"{prefix}rows: {e}")
                return
            if start != self._block_start:
                self._block_start = start
                self._realias()
        given = {leaf: state_dict.pop(prefix + leaf) for leaf in ("weight_rows", "bias_rows")
                 if prefix + leaf in state_dict}    # (load_state_dict hands each module a copy of the dict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in (prefix + "weight_rows", prefix + "bias_rows"):
            if key in missing_keys:
                missing_keys.remove(key)
        self._realias()
        with torch.no_grad():
            for leaf, val in given.items():
                view = getattr(self, leaf)
                if view is None or tuple(val.shape) != tuple(view.shape):
                    error_msgs.append(f"size mismatch for {prefix}{leaf}: copying a param with shape "
                                      f"{tuple(val.shape)}, the block is "
                                      f"{None if view is None else tuple(view.shape)}")
                else:
                    view.copy_(val)

    def _apply(self, fn, recurse=True):
        """Device moves move everything; a dtype conversion (model.to(torch.bfloat16), .half()) converts
        the weight and bias but keeps the float32 masters, and rewrites the selected rows from them."""
        if not self.masters:    # the views follow the weight (device and dtype), and stay its views
            out = super()._apply(fn, recurse)
            self._realias()
            return out
        dtype = self.weight.dtype
        out = super()._apply(keep_dtype(fn, self.master_parameters()), recurse)
        if self.weight.dtype != dtype and self.rows.numel():
            self.write_rows_()    # rows = round(master) in the new dtype, not the old rounded rows cast
        return out

    def master_parameters(self) -> list[nn.Parameter]:
        """The trainable masters: weight_rows, and bias_rows when the layer has a bias."""
        return [self.weight_rows] + ([self.bias_rows] if self.bias_rows is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            if self.masters:
                self.check_masters_bound()
                self._refresh_if_masters_changed()
            elif not self._aliased():
                raise RuntimeError(
                    "RowMaskedLinear(masters=False): weight_rows/bias_rows are no longer views of the weight's "
                    "(bias's) trained block (was the weight replaced, or the model sharded with FSDP?); an "
                    "optimizer step would not reach the weight. Re-select the rows (set_rows) after replacing "
                    "the weight; FSDP is not supported by block granularity")
        return hft_row_linear(x, self.weight, self.weight_rows, self.rows, self.bias, self.bias_rows,
                              backend=self.backend, check_rows=False)  # checked in set_rows: no host sync per call

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear of the weight with the masters written into it (merged again first if they
        changed outside MaskedAdamW and torch.optim, as the forward does)."""
        if self.masters:
            self._refresh_if_masters_changed()
        return plain_linear(self.weight, self.bias)

    def extra_repr(self) -> str:
        block = "" if self.masters else f", block=[{self._block_start}, {self._block_start + self.rows.numel()})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"trainable_rows={self.rows.numel()}{block}, bias={self.bias is not None}, masters={self.masters}")

    def _fusedtune_report(self) -> dict:
        from ..ops.hft import hft_backend
        b = hft_backend(self.weight.device, self.backend)
        dw = f"forward F.linear; dW only for {self.rows.numel()}/{self.out_features} rows ({b['row_grad']['backend']})"
        if not self.masters:
            return {"method": "hft-block", "backend": b["row_grad"]["backend"],
                    "path": f"{dw}; rows [{self._block_start}, {self._block_start + self.rows.numel()}) are views "
                            "of the weight, updated in place by any optimizer (no master copy)",
                    "why_not": dict(b["row_grad"]["why_not"])}
        return {"method": "hft-row", "backend": b["row_grad"]["backend"],
                "path": f"{dw}; MaskedAdamW {b['masked_adamw_']['backend']}",
                "why_not": {**b["row_grad"]["why_not"], **b["masked_adamw_"]["why_not"]}}
