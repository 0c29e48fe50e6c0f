"""Every registered method under Hugging Face gradient checkpointing (both torch.utils.checkpoint modes):
the recomputed forward must see the same weights, seeds and dropout masks, so three training steps give
the bits of the same steps without checkpointing."""
import pytest
import torch

pytest.importorskip("transformers")

import fusedtune  # noqa: E402
from fusedtune.patch import methods, missing_requirements  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _train(name, reentrant):
    m = tiny_llama()
    m.train()
    torch.manual_seed(3)
    rep = fusedtune.patch(m, name, **({"dropout": 0.1} if "lora" in name else {}))
    if reentrant is not None:
        kw = {"use_reentrant": reentrant}
        if hasattr(m, "activation_checkpointing_enable"):     # transformers >= 5.2x; the old name is deprecated
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        assert m.model.gradient_checkpointing
    torch.manual_seed(4)
    losses = [float(rep.step(lambda: m(IDS, labels=IDS).loss)) for _ in range(3)]
    return losses, [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("name", sorted(methods()))
def test_checkpointing_gives_the_same_steps(name):
    cls = methods()[name]
    if missing_requirements(cls):
        pytest.skip(f"{name} needs {missing_requirements(cls)}")
    losses, params = _train(name, None)
    assert losses[-1] != losses[0]                     # the steps trained something
    for reentrant in (False, True):
        l2, p2 = _train(name, reentrant)
        assert l2 == losses, (reentrant, l2, losses)
        assert all(torch.equal(a, b) for a, b in zip(p2, params)), reentrant
