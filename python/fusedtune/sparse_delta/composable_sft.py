"""Import and export of composable-sft's sparse fine-tunings (SFTs).

composable-sft (cambridgeltl) saves an SFT as `pytorch_diff.bin`, a torch.save'd dict
    {"body": {<parameter name>: {"size": torch.Size, "index_steps": [int, ...], "values": Tensor}},
     "head": {<parameter name>: Tensor}}           # "head" optional: dense task-head weights
(later versions name the two parts "diffs" and "abs"; both spellings are read, and an export writes the
sparse part under both names -- one dict, stored once -- so that either version applies it).
Per parameter, the entries are ordered by their flat index in column-major order (the first
dimension varies fastest: for a 2-D parameter of size (d0, d1), element (i, j) has flat index
i + j * d0), and the indices are delta-encoded: index_steps[0] is the first flat index, each
following step the difference to the previous index (so the flat indices are the cumulative sum).
`values` are in the same order.

fusedtune's SparseDelta is per linear layer, flat row-major over the nn.Linear weight (out, in):
r * in + c, sorted. For an nn.Linear weight (size (out, in)), element (r, c) is column-major
index r + c * out; for transformers' Conv1D (GPT-2; weight size (in, out)), element (c, r) of the
weight is column-major index c + r * in, which happens to equal the row-major (out, in) index.
Conversion sorts the indices and permutes the values with them; values convert to float32 exactly
(float16/bfloat16/float32 sources).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .artifacts import SparseDelta, SparseDeltaError, _is_sdl, check_values

SFT_FILE_NAME = "pytorch_diff.bin"


def _load_bin(path, trust_pickle: bool) -> dict:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SFT_FILE_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"from_composable_sft: no file {path!r} (a composable-sft SFT directory holds "
                                f"{SFT_FILE_NAME})")
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    import numpy as np  # noqa: PLC0415
    # composable-sft writes index_steps[0] as a numpy int64 scalar: allow exactly what that needs.
    allowed = [np.dtype, type(np.dtype(np.int64)), type(np.dtype(np.int32))]
    core = getattr(np, "_core", None) or getattr(np, "core")
    # under its own name and under numpy 1.x's (numpy.core, as the published SFTs of 2022-23 were pickled)
    allowed += [core.multiarray.scalar, (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                (core.multiarray.scalar, "numpy._core.multiarray.scalar")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise SparseDeltaError(f"from_composable_sft: {path!r} could not be read with weights_only=True ({e}); "
                               "if you trust the file, pass trust_pickle=True") from e


def _as_index_steps(steps, what) -> torch.Tensor:
    import numpy as np  # noqa: PLC0415
    if torch.is_tensor(steps):
        t = steps.detach().cpu()
    else:
        try:
            arr = np.asarray(steps)
            if arr.size and arr.dtype.kind not in "iu":
                raise TypeError(f"got {arr.dtype} entries")
            t = torch.from_numpy(arr.astype(np.int64, copy=False).reshape(arr.shape))
        except (TypeError, ValueError) as e:
            raise SparseDeltaError(f"{what}: index_steps must be a list of integers ({e})") from None
    if t.is_floating_point() or t.dim() != 1:
        raise SparseDeltaError(f"{what}: index_steps must be a 1-D list of integers, got {t.dtype} "
                               f"{tuple(t.shape)}")
    return t.to(torch.int64)


def _conv1d_layout(model, name: str, mod) -> bool:
    """Whether layer `name` keeps Conv1D's (in, out) layout: a GPT-2 Conv1D, or what fusedtune.patch swapped
    in for one."""
    from ..patch import is_conv1d, swapped_kind  # noqa: PLC0415
    return is_conv1d(mod) or swapped_kind(model, name) == "conv1d"


def _layer_for(model, pname):
    """(module name, kind, (out, in)) for parameter `pname` if it is the weight of a linear layer, else None.
    kind "conv1d": the SFT holds it in Conv1D's (in, out) layout (GPT-2's Conv1D, or the layer that
    fusedtune.patch swapped in for one)."""
    from ..patch import is_conv1d  # noqa: PLC0415
    try:
        model.get_parameter(pname)
    except AttributeError:
        raise SparseDeltaError(f"from_composable_sft: the SFT has parameter {pname!r}, which the model does "
                               "not have (composable-sft refuses it too)") from None
    mname, _, leaf = pname.rpartition(".")
    if leaf != "weight":
        return None
    mod = model.get_submodule(mname)
    if _is_sdl(mod):
        return mname, "conv1d" if _conv1d_layout(model, mname, mod) else "linear", (mod.out_features,
                                                                                  mod.in_features)
    if isinstance(mod, nn.Linear) and not is_conv1d(mod):
        return mname, "linear", (mod.out_features, mod.in_features)
    if is_conv1d(mod):
        return mname, "conv1d", (mod.weight.shape[1], mod.weight.shape[0])
    return None


def from_composable_sft(state_dict_or_path, model: nn.Module, *, strict: bool = True,
                        trust_pickle: bool = False) -> SparseDelta:
    """Convert a composable-sft SFT (a directory holding pytorch_diff.bin, the file itself, the loaded
    dict with "body" or "diffs", or that part alone) into a SparseDelta for `model`'s linear layers.

    Only weights of nn.Linear / Conv1D / SparseDeltaLinear layers convert. Other entries (embeddings,
    biases, norms; composable-sft trains them too) are refused with strict=True; with strict=False
    they are skipped with a warning and listed in delta.metadata["composable_sft_skipped"]. A dense
    part ("head" / "abs") is refused with strict=True and, with strict=False, not imported (a warning,
    noted in the metadata). A parameter the model does not have is refused either way. The file is read with torch.load(weights_only=
    True) unless trust_pickle=True."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_composable_sft: model must be a torch.nn.Module, got {type(model).__name__}")
    src = state_dict_or_path
    if isinstance(src, (str, os.PathLike)):
        src = _load_bin(src, trust_pickle)
    if not isinstance(src, dict):
        raise TypeError(f"from_composable_sft: expected a path or a dict, got {type(src).__name__}")
    sparse_key = next((k for k in ("body", "diffs") if k in src), None)
    dense_key = next((k for k in ("head", "abs") if k in src), None)
    if sparse_key is not None:
        body = src[sparse_key]
    elif dense_key is not None:
        raise SparseDeltaError(f"from_composable_sft: the SFT has a {dense_key!r} part but no sparse part "
                               "('body' or 'diffs'): nothing to import")
    else:
        body = src
        dense_key = None
    dense = src.get(dense_key) if dense_key is not None else None
    if dense and strict:
        raise SparseDeltaError(f"from_composable_sft: the SFT has dense parameters ({dense_key!r}: "
                               f"{sorted(dense)[:8]}) that composable-sft copies into the model and a SparseDelta "
                               "cannot hold; pass strict=False to import the sparse part alone")
    if not isinstance(body, dict):
        raise SparseDeltaError("from_composable_sft: 'body' must map parameter names to encoded diffs")
    out = SparseDelta(metadata={"source": "composable-sft"})
    skipped = []
    for pname, enc in body.items():
        what = f"from_composable_sft: parameter {pname!r}"
        if not isinstance(enc, dict) or not {"size", "index_steps", "values"} <= set(enc):
            got = f"dict with keys {sorted(enc)}" if isinstance(enc, dict) else type(enc).__name__
            raise SparseDeltaError(f"{what}: expected an encoded diff with 'size', 'index_steps' and 'values', "
                                   f"got a {got}")
        target = _layer_for(model, pname)
        if target is None:
            skipped.append(pname)
            continue
        mname, kind, (n_out, n_in) = target
        size = tuple(int(s) for s in enc["size"])
        want = (n_out, n_in) if kind == "linear" else (n_in, n_out)
        if size != want:
            raise SparseDeltaError(f"{what}: size {size} does not match the model's weight {want}")
        steps = _as_index_steps(enc["index_steps"], what)
        values = enc["values"]
        if not torch.is_tensor(values):
            values = torch.as_tensor(values)
        values = check_values(values.detach().cpu(), steps.numel(), f"{what}: values")
        if steps.numel() > 1 and bool((steps[1:] <= 0).any()):
            p = int((steps[1:] <= 0).nonzero()[0]) + 1
            raise SparseDeltaError(f"{what}: index_steps[{p}] = {int(steps[p])}; steps after the first must be "
                                   "positive (column-major indices, sorted, unique)")
        flat = torch.cumsum(steps, 0)
        numel = n_out * n_in
        if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= numel):
            raise SparseDeltaError(f"{what}: flat indices span [{int(flat[0])}, {int(flat[-1])}], outside "
                                   f"[0, {numel})")
        d0 = size[0]
        i0, i1 = flat % d0, flat // d0            # coordinates (dim 0, dim 1) of the parameter
        rowmajor = i0 * n_in + i1 if kind == "linear" else i1 * n_in + i0
        order = torch.argsort(rowmajor, stable=True)
        dtype = str(getattr(model.get_submodule(mname), "weight").dtype).replace("torch.", "")
        out.add(mname, rowmajor[order], values[order], (n_out, n_in), dtype)
    if skipped:
        if strict:
            raise SparseDeltaError(f"from_composable_sft: {len(skipped)} entries are not weights of linear layers "
                                   f"and cannot become a SparseDelta: {skipped[:8]}"
                                   + (" ..." if len(skipped) > 8 else "") + "; pass strict=False to skip them")
        warnings.warn(f"from_composable_sft: skipped {len(skipped)} entries that are not linear-layer weights: "
                      f"{skipped[:8]}" + (" ..." if len(skipped) > 8 else ""), stacklevel=2)
        out.metadata["composable_sft_skipped"] = ",".join(skipped)
    if dense:
        warnings.warn(f"from_composable_sft: the dense part {dense_key!r} ({len(dense)} parameters) is not imported",
                      stacklevel=2)
        out.metadata["composable_sft_head"] = "not imported: " + ",".join(dense)
    return out


def to_composable_sft(delta: SparseDelta, path=None, model: nn.Module | None = None) -> dict:
    """A SparseDelta as composable-sft's {"body": {<module>.weight: {"size", "index_steps", "values"}}}
    (the same dict also under "diffs", the name later composable-sft versions read)
    (column-major, delta-encoded, float32 values); written to `path` with torch.save when given (a
    directory gets pytorch_diff.bin). With `model`, Conv1D layers are written in their (in, out)
    layout; without it every layer is taken to be an nn.Linear (size (out, in))."""
    if not isinstance(delta, SparseDelta):
        raise TypeError(f"to_composable_sft: expected a SparseDelta, got {type(delta).__name__}")
    body = {}
    for name, ld in delta.items():
        n_out, n_in = ld.shape
        try:
            conv = model is not None and _conv1d_layout(model, name, model.get_submodule(name))
        except AttributeError:
            raise SparseDeltaError(f"to_composable_sft: the delta has layer {name!r}, which the model does not "
                                   "have") from None
        idx = ld.indices.cpu().to(torch.int64)
        r, c = idx // n_in, idx % n_in
        if conv:
            size, colmajor = (n_in, n_out), c + r * n_in
        else:
            size, colmajor = (n_out, n_in), r + c * n_out
        order = torch.argsort(colmajor, stable=True)
        colmajor = colmajor[order]
        steps = torch.diff(colmajor, prepend=torch.zeros(1, dtype=torch.int64)) if colmajor.numel() else colmajor
        body[f"{name}.weight"] = {"size": torch.Size(size), "index_steps": steps.tolist(),
                                  "values": ld.values.cpu()[order].clone()}
    out = {"body": body, "diffs": body}   # the older and the newer composable-sft's names (module docstring)
    if path is not None:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, SFT_FILE_NAME)
        torch.save(out, path)
    return out
