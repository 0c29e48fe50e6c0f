"""The demo's synthetic tasks. Every sequence is: a task marker token, then P random content tokens,
then tokens that the task's rule determines from the one P places back.

  task A ("repeat"), the pre-trained skill:   x[t] = x[t-P], over all N content tokens
  task B ("remap"), the fine-tuning domain:   x[t] = sigma(x[t-P]), sigma(x) = (x + 1) mod K, over the
                                              first K content tokens only

B is narrow-domain fine-tuning: its sequences use K of the N content tokens and redefine what follows
each of them. Retention is measured where B has nothing to say: task-A sequences made only of the
N - K tokens that B never shows (`Tasks.retention_batch`). A model keeps A there unless fine-tuning
damages the general copy skill — the forgetting that half fine-tuning and sparse updates are meant
to limit. (On B's own tokens A and B disagree by design, so every method that learns B "forgets" A
there equally; measuring it would say nothing about the method.) Loss and accuracy count only the
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
        if not 1 < remapped < self.n_content:
            raise ValueError(f"remapped={remapped} must be in [2, {self.n_content - 1}] (B's domain and the "
                             "tokens retention is measured on must both be non-empty)")
        if seq_len < period + 3:
            raise ValueError(f"seq_len={seq_len} must be at least period + 3 = {period + 3}")
        self.remapped = remapped

    def rule(self, task: str, prev: torch.Tensor) -> torch.Tensor:
        if task == "A":
            return prev
        k = self.remapped
        return torch.where(prev < k, (prev + 1) % k, prev)

    def domain(self, task: str) -> tuple[int, int]:
        """[lo, hi) of the content tokens that the task's sequences draw from."""
        return (0, self.remapped) if task == "B" else (0, self.n_content)

    def batch(self, task: str, n: int, generator: torch.Generator, device="cpu", tokens=None) -> torch.Tensor:
        """n sequences of task `task` as token ids, shape (n, seq_len); content from `tokens` = [lo, hi)
        (default: the task's domain)."""
        lo, hi = tokens or self.domain(task)
        seq = list(torch.randint(lo, hi, (n, self.period), generator=generator).unbind(1))
        for t in range(self.period, self.seq_len - 1):
            seq.append(self.rule(task, seq[t - self.period]))
        ids = torch.stack(seq, 1) + N_SPECIAL
        marker = torch.full((n, 1), MARKERS[task], dtype=ids.dtype)
        return torch.cat([marker, ids], 1).to(device)

    def retention_batch(self, n: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
        """Task-A sequences over the content tokens outside B's domain."""
        return self.batch("A", n, generator, device, tokens=(self.remapped, self.n_content))

    def loss_acc(self, model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy of next-token prediction on the determined positions."""
        first = self.period + 1  # ids[:, first:] are determined by the rule
        logits = model(input_ids=ids).logits[:, first - 1:-1]
        target = ids[:, first:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc
