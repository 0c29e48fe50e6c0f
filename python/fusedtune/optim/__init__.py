"""fusedtune.optim: optimizers of every family."""
from .masked_adamw import MaskedAdamW  # noqa: F401
from .mezo import MeZO, es_step_, zo_replay_  # noqa: F401
from .sparse_delta_adamw import SparseDeltaAdamW  # noqa: F401
