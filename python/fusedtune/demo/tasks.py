"""The demo's two synthetic tasks. Every sequence is: a task marker token, then P random content
tokens, then tokens that the task's rule determines from the one P places back.

  task A ("repeat"):        x[t] = x[t-P]
  task B ("repeat, remap"): x[t] = sigma(x[t-P]), sigma(x) = (x + 1) mod K on the first K content
                            tokens, identity on the rest

A model that learned A is right on about (N-K)/N of B's positions but confidently wrong on the rest,
so B is a small, related change (a fine-tuning task), and learning it overwrites A where the rules
disagree (forgetting shows as task-A accuracy falling). Loss and accuracy count only the
positions the rule determines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MARKERS = {"A": 0, "B": 1}
N_SPECIAL = 2


class Tasks:
    def __init__(self, vocab_size: int = 64, seq_len: int = 24, period: int = 4, remapped: int = 16):
        self.vocab_size, self.seq_len, self.period = vocab_size, seq_len, period
        self.n_content = vocab_size - N_SPECIAL
        if not 0 < remapped <= self.n_content:
            raise ValueError(f"remapped={remapped} must be in [1, {self.n_content}]")
        if seq_len < period + 3:
            raise ValueError(f"seq_len={seq_len} must be at least period + 3 = {period + 3}")
        self.remapped = remapped

    def rule(self, task: str, prev: torch.Tensor) -> torch.Tensor:
        if task == "A":
            return prev
        k = self.remapped
        return torch.where(prev < k, (prev + 1) % k, prev)

    def batch(self, task: str, n: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
        """n sequences of task `task` as token ids, shape (n, seq_len)."""
        seq = list(torch.randint(0, self.n_content, (n, self.period), generator=generator).unbind(1))
        for t in range(self.period, self.seq_len - 1):
            seq.append(self.rule(task, seq[t - self.period]))
        ids = torch.stack(seq, 1) + N_SPECIAL
        marker = torch.full((n, 1), MARKERS[task], dtype=ids.dtype)
        return torch.cat([marker, ids], 1).to(device)

    def loss_acc(self, model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy of next-token prediction on the determined positions."""
        first = self.period + 1  # ids[:, first:] are determined by the rule
        logits = model(input_ids=ids).logits[:, first - 1:-1]
        target = ids[:, first:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc
