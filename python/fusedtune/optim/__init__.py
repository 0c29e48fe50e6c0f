"""fusedtune.optim: optimizers of every family (MeZOTrainer, a transformers.Trainer, imports transformers when
first used)."""
from .masked_adamw import MaskedAdamW  # noqa: F401
from .mezo import MeZO, es_step_, zo_replay_  # noqa: F401
from .sparse_delta_adamw import SparseDeltaAdamW  # noqa: F401


def __getattr__(name):
    if name == "MeZOTrainer":
        from .mezo_trainer import MeZOTrainer  # noqa: PLC0415 - imports transformers
        return MeZOTrainer
    raise AttributeError(f"module 'fusedtune.optim' has no attribute {name!r}")
