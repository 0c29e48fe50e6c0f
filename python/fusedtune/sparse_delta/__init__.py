"""fusedtune.sparse_delta: sparse fine-tuning deltas as artifacts, and prune/regrow during training.

    from fusedtune import sparse_delta as sd
    sd.save(model, "task.safetensors")           # the deltas of every SparseDeltaLinear (bit-exact)
    d = sd.load("task.safetensors")
    h = sd.apply(base_model, d)                   # W += delta in place (nn.Linear / Conv1D / SparseDeltaLinear)
    sd.revert(base_model, h)                      # exactly the weights before apply
    both = sd.compose([d, sd.load("lang.safetensors")])   # union of indices, summed values
    d2 = sd.from_composable_sft("path/to/sft_dir", base_model)   # composable-sft's format
    rg = sd.Regrower(model, optimizer, every=20, rate=0.2, total_steps=1000, variant="ag")  # SpIEL
"""
from .artifacts import (FORMAT, FORMAT_VERSION, AppliedDelta, LayerDelta, SparseDelta, SparseDeltaError,  # noqa: F401
                        applied, apply, check_indices, compose, extract, load, revert, save, sparse_layers)
from .composable_sft import from_composable_sft, to_composable_sft  # noqa: F401
from .regrow import Regrower  # noqa: F401
