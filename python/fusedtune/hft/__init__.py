"""fusedtune.hft: half fine-tuning (HFT) -- train half of each category of a Llama-style model's
parameters (whole matrices, as in the HFT paper, or output rows with compact row gradients: a random
set with float32 masters, or a contiguous block trained in place as a view of the weight), freeze
the rest, change the half per stage, and reset parts to their pretrained values.

    from fusedtune.hft import HalfFineTuner, HFTCallback
    hft = HalfFineTuner(model, ratio=0.5, granularity="matrix", seed=0)
    print(hft.summary())
    opt = hft.make_optimizer(lr=2e-5)

HFTCallback (a transformers.TrainerCallback) imports transformers when first used; fusedtune.hft
itself needs only torch.
"""
from .selection import HFTError, choose_block, choose_members, choose_rows, map_model, row_count  # noqa: F401
from .tuner import HalfFineTuner  # noqa: F401

__all__ = ["HalfFineTuner", "HFTCallback", "HFTError", "choose_block", "choose_members", "choose_rows", "map_model",
           "row_count"]


def __getattr__(name):
    if name == "HFTCallback":
        from .callback import HFTCallback  # noqa: PLC0415 - imports transformers
        return HFTCallback
    raise AttributeError(f"module 'fusedtune.hft' has no attribute {name!r}")
