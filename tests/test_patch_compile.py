"""Every registered method on a torch.compile'd model (aot_eager: the graphs dynamo captures, run by
the eager kernels, so the result must be bit-identical): three training steps of the compiled model give
the losses and weights of three eager steps. Catches fake-tensor, schema and guard errors of the
fused ops inside a whole model, where users compile."""
import pytest
import torch

pytest.importorskip("transformers")

import fusedtune  # noqa: E402
from fusedtune.patch import methods, missing_requirements  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _train(name, compiled):
    m = tiny_llama()
    m.train()
    torch.manual_seed(3)
    rep = fusedtune.patch(m, name)
    fwd = torch.compile(m, backend="aot_eager") if compiled else m
    torch.manual_seed(4)
    losses = [float(rep.step(lambda: fwd(IDS, labels=IDS).loss)) for _ in range(3)]
    return losses, [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("name", sorted(methods()))
def test_compiled_model_gives_the_same_steps(name):
    cls = methods()[name]
    if missing_requirements(cls):
        pytest.skip(f"{name} needs {missing_requirements(cls)}")
    torch._dynamo.reset()
    losses, params = _train(name, False)
    assert losses[-1] != losses[0]
    l2, p2 = _train(name, True)
    assert l2 == losses
    assert all(torch.equal(a, b) for a, b in zip(p2, params))
