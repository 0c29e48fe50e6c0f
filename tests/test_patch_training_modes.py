"""Every registered method under the ways people run training, each against three plain eager steps, bit
for bit:
- Hugging Face activation (gradient) checkpointing, reentrant and not: the recomputed forward must see
  the same weights, seeds and dropout masks;
- a torch.compile'd model (aot_eager: the graphs dynamo captures, run by the eager kernels), which
  catches fake-tensor, schema and guard errors of the fused ops inside a whole model. Within rounding
  there, not bit for bit: AOT autograd's backward decomposes plain torch ops (fp8_lora's adapter branch
  with dropout, for one) and may reassociate them (1e-10 differences);
- a forward under torch.inference_mode first (an evaluation before training): a layer's cache built there
  held inference tensors, which the training forwards then could not save for backward."""
import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")

import fusedtune  # noqa: E402
from fusedtune.patch import methods, missing_requirements  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
NAMES = sorted(methods()) + ["hft-row", "hft-block", "lora-dora"]     # method[-HFT granularity, or DoRA]


def _train(name, mode=None):
    """Three steps of `name` (LoRA methods with dropout 0.1; lora-dora: DoRA) on the tiny Llama; mode: None (eager),
    ("checkpoint", reentrant), "compile" or "inference_first"."""
    name, _, granularity = name.partition("-")
    cls = methods()[name]
    if missing_requirements(cls):
        pytest.skip(f"{name} needs {missing_requirements(cls)}")
    m = tiny_llama()
    m.train()
    torch.manual_seed(3)
    if "lora" in name:
        kw = {"dropout": 0.1, "use_dora": granularity == "dora"}
    else:
        kw = {"granularity": granularity} if granularity else {}
    rep = fusedtune.patch(m, name, **kw)
    fwd = m
    if mode == "compile":
        torch._dynamo.reset()
        counters.clear()
        fwd = torch.compile(m, backend="aot_eager")
    elif mode == "inference_first":    # an evaluation under inference_mode before training (caches built there)
        m.eval()
        with torch.inference_mode():
            m(IDS)
        m.train()
    elif mode is not None:
        kw = {"use_reentrant": mode[1]}
        if hasattr(m, "activation_checkpointing_enable"):     # transformers >= 5.2x; the old name is deprecated
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        assert m.model.gradient_checkpointing
    torch.manual_seed(4)
    losses = [float(rep.step(lambda: fwd(IDS, labels=IDS).loss)) for _ in range(3)]
    if mode == "compile":    # one graph a frame: no fused op breaks it (fp8_lora's dropout seed did, read as an int)
        assert not counters["graph_break"], dict(counters["graph_break"])
    return losses, [p.detach().clone() for p in m.parameters()]


def _same(a, b, exact=True):
    if exact:
        assert a[0] == b[0]
        assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    else:
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
        for x, y in zip(a[1], b[1]):   # Adam turns a 1e-10 gradient change at a near-zero gradient into a
            torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-7)   # visible one: < 1/1000 of a 2e-4 step


@pytest.mark.parametrize("name", NAMES)
def test_checkpointing_gives_the_same_steps(name):
    eager = _train(name)
    assert eager[0][-1] != eager[0][0]                 # the steps trained something
    for reentrant in (False, True):
        _same(_train(name, ("checkpoint", reentrant)), eager)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_model_gives_the_same_steps(name):
    _same(_train(name, "compile"), _train(name), exact=False)


@pytest.mark.parametrize("name", NAMES)
def test_an_inference_mode_forward_first_gives_the_same_steps(name):
    _same(_train(name, "inference_first"), _train(name))
