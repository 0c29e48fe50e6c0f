"""fusedtune.optim: optimizers of every family."""
from .mezo import MeZO, es_step_, zo_replay_  # noqa: F401
