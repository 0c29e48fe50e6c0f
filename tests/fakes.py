"""Stand-ins the tests share: DeepSpeed's optimizer wrapping (no DeepSpeed here) and a benchmark timer that
calls its function once (the bench families' checks, without timing)."""
import torch


class ZeroLike:
    """DeepSpeed's ZeRO optimizer: a plain object stepping flattened float32 copies (its .optimizer)."""

    def __init__(self, base):
        self.optimizer = base

    param_groups = property(lambda self: self.optimizer.param_groups)


class DeepSpeedWrapped(torch.optim.Optimizer):
    """accelerate's DeepSpeedOptimizerWrapper: a torch.optim.Optimizer subclass around the ZeRO optimizer."""

    def __init__(self, zero):       # (no Optimizer.__init__: the wrapper forwards to ZeRO)
        self.optimizer = zero

    param_groups = property(lambda self: self.optimizer.param_groups)


class CallOnceTimer:
    """A bench timer that calls fn once (what the checks need) and reports 1 ms."""
    name, device = "cpu", torch.device("cpu")

    def __call__(self, fn):
        fn()
        return (1.0, 1.0, 1.0)
