"""Copies of a patched model train as the original would: copy.deepcopy (EMA and reference models, model
soups, TRL's create_reference_model) and torch.save / torch.load of the whole model. The copy's next steps
must equal the original's next steps bit for bit, the original must stay untouched while the copy trains,
and nothing may warn (a warning here means a layer fell back to refreshing its weight from its masters).

Before: a copy of an hft row-mode model lost the link between its row masters and their layer (MaskedAdamW
no longer wrote the weight rows) and torch.save failed on it; a sparse_delta copy's optimizer refused the
copy's deltas; MaskedAdamW, SparseDeltaAdamW and MeZO copies lost their settings and failed at the first
step; a Regrower copy silently stopped regrowing (hooks do not travel with copies); a torch.load'ed QLoRA
layer refused the plain Parameter bitsandbytes' Params4bit comes back as. An hft block-granularity copy
must keep its trained rows views of its own weights (a deep copy copies the views as separate tensors)."""
import copy
import io
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import fusedtune  # noqa: E402
from fusedtune.hft import HalfFineTuner  # noqa: E402
from fusedtune.patch import methods, missing_requirements  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
CASES = [(n, {}) for n in sorted(methods())] + [("hft", {"granularity": "row"}),
                                                  ("hft", {"granularity": "row", "snapshot": "lazy"}),
                                                  ("hft", {"granularity": "block"}),
                                                  ("lora", {"use_dora": True, "init_lora_weights": "pissa"})]
REGROW = {"every": 5, "rate": 0.3, "total_steps": 50, "accumulate_steps": 2}


def _copy(obj, how):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _steps(model, n):
    rep = fusedtune.report(model)
    return [float(rep.step(lambda: model(IDS, labels=IDS).loss)) for _ in range(n)]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _patched(name, opts, steps):
    cls = methods()[name]
    if missing_requirements(cls):
        pytest.skip(f"{name} needs {missing_requirements(cls)}")
    opts = dict(opts)
    if "backend" in cls.options and name.startswith("fp8"):
        opts["backend"] = "reference"           # runs on any machine (FP8 GEMMs need sm_89+)
    m = tiny_llama()
    fusedtune.patch(m, name, **opts)
    _steps(m, steps)
    return m


@pytest.mark.parametrize("how", ["deepcopy", "save"])
@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o in CASES])
def test_copy_trains_like_the_original(name, opts, how):
    a = _patched(name, opts, 1)
    b = _copy(a, how)
    before = _params(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no fallback refresh of merged weights or rows
        lb = _steps(b, 2)
    assert _equal(_params(a), before), "training the copy changed the original"
    la = _steps(a, 2)
    assert la == lb
    assert _equal(_params(a), _params(b))
    assert not _equal(_params(a), before)         # the steps trained something


@pytest.mark.parametrize("how", ["deepcopy", "save"])
@pytest.mark.parametrize("k", [1, 4])             # copied outside / inside a dense-gradient window (steps 4, 5)
def test_regrower_copy_keeps_regrowing(k, how):
    a = _patched("sparse_delta", {"density": 0.1, "regrow": REGROW}, k)
    b = _copy(a, how)
    ref = _patched("sparse_delta", {"density": 0.1, "regrow": REGROW}, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lb = _steps(b, 12)
    assert lb == _steps(ref, 12)
    assert _equal(_params(b), _params(ref))
    hist = fusedtune.report(b).regrower.history
    assert hist and hist[-1]["moved"] > 0         # the copy's regrowth ran (steps 5 and 10)
    assert fusedtune.report(b).regrower.optimizer is fusedtune.report(b).optimizer


@pytest.mark.parametrize("how", ["deepcopy", "save"])
@pytest.mark.parametrize("gran,snapshot", [("row", "lazy"), ("row", True), ("matrix", "lazy"), ("block", "lazy")])
def test_hft_tuner_copy_continues_with_stages_and_reset(gran, snapshot, how):
    def run(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            model(IDS, labels=IDS).loss.backward()
            opt.step()

    def finish(model, opt):
        tuner = model.__dict__["_fusedtune_hft"]
        run(model, opt, 2)
        tuner.next_stage()
        run(model, tuner.make_optimizer(lr=1e-2), 2)
        tuner.reset("frozen")
        return _params(model)

    a = tiny_llama()
    oa = HalfFineTuner(a, granularity=gran, snapshot=snapshot).make_optimizer(lr=1e-2)
    run(a, oa, 2)
    b, ob = _copy((a, oa), how)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = finish(b, ob)
    assert _equal(got, finish(a, oa))


@pytest.mark.parametrize("name", ["hft", "sparse_delta"])
def test_assigned_load_binds_the_new_masters(name):
    """load_state_dict(assign=True) puts new Parameter objects into the layers: the fused optimizer must
    write the merged weight (rows) of those, as for the layer's own."""
    a = _patched(name, {"granularity": "row"} if name == "hft" else {}, 2)
    b = _patched(name, {"granularity": "row"} if name == "hft" else {}, 0)
    b.load_state_dict(a.state_dict(), assign=True)
    trainable = [p for p in b.parameters() if p.requires_grad]
    opt = type(fusedtune.report(a).optimizer)(trainable, lr=1e-2)
    opt.zero_grad()
    b(IDS, labels=IDS).loss.backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the optimizer wrote the weight: no refresh needed
        b(IDS)


def test_mezo_with_a_process_group_refuses_copies():
    import torch.distributed as dist
    from fusedtune.optim import MeZO
    if not dist.is_available():
        pytest.skip("torch without distributed")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        opt = MeZO([torch.nn.Parameter(torch.zeros(4))], lr=1e-3, process_group=dist.new_group([0]))
        with pytest.raises(TypeError, match="ProcessGroup cannot be copied"):
            copy.deepcopy(opt)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,opts", [("sparse_delta", {}), ("hft", {"granularity": "row"})])
def test_a_dropped_shallow_copy_leaves_the_original_training(name, opts):
    """copy.copy of a layer shares its masters: the original stays their owner, so once the copy is gone
    the original's optimizer still finds its layer (it used to refuse the masters)."""
    import gc
    m = _patched(name, opts, 1)
    layer = next(mod for mod in m.modules() if hasattr(mod, "master_parameters"))
    shallow = copy.copy(layer)
    del shallow
    gc.collect()
    _steps(m, 2)
