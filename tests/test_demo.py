"""python -m fusedtune demo, with tiny settings: the table has a row per method and every column,
the files are written, and full fine-tuning learns task B."""
import csv
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from fusedtune.demo import main, run  # noqa: E402
from fusedtune.demo.output import COLUMNS  # noqa: E402
from fusedtune.demo.tasks import Tasks  # noqa: E402
from fusedtune.demo.train import DemoConfig  # noqa: E402
from fusedtune.patch import methods  # noqa: E402

TINY = ["--hidden", "32", "--layers", "2", "--batch", "16", "--pretrain-steps", "150", "--steps", "30",
        "--no-progress"]


def test_demo_tiny(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"tiny demo took {seconds:.0f} s"
    out = capsys.readouterr().out.splitlines()
    registered = sorted(methods())
    head = out[0]
    assert all(c in head for c in COLUMNS)
    body = out[2:2 + len(registered)]
    assert sorted(line.split()[0] for line in body) == registered
    for name in ("results.md", "results.csv", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert sorted(rows) == registered
    full = rows["full"]
    assert float(full["b_loss"]) < 0.5 * float(full["b_loss_before"])
    assert float(full["b_acc"]) > float(full["b_acc_before"]) + 0.1
    assert int(full["steps"]) == 30 and int(rows["mezo"]["steps"]) == 300
    assert rows["mezo"]["agreement"].endswith("bit-identical")
    assert rows["full"]["agreement"].startswith("n/a")
    assert int(rows["mezo"]["memory"]) < int(full["memory"])   # no gradients, no optimizer state
    md = (tmp_path / "results.md").read_text()
    assert md.count("\n| ") == 1 + len(registered)


def test_demo_header_counts_the_pretrained_model():
    """The header's parameter count is the pretrained model's, not the first method's patched model's
    (lora adds its adapters; "full" trains exactly the pretrained parameters)."""
    cfg = DemoConfig(hidden=16, layers=1, batch=8, pretrain_steps=2, steps=1, eval_size=8, progress=False)
    res = run(cfg, ["lora", "full"], out=None)
    full = next(r for r in res["rows"] if r["method"] == "full")
    assert f"{full['total']:,} parameters" in res["notes"][0]
    assert next(r for r in res["rows"] if r["method"] == "lora")["total"] > full["total"]


def test_demo_is_deterministic():
    cfg = DemoConfig(hidden=16, layers=1, batch=8, pretrain_steps=10, steps=3, eval_size=16, progress=False)
    a = run(cfg, ["mezo"], out=None)["rows"][0]
    b = run(cfg, ["mezo"], out=None)["rows"][0]
    assert a["curve"] == b["curve"] and a["b_loss"] == b["b_loss"]


def test_demo_refuses_unknown_method():
    with pytest.raises(SystemExit, match="not registered"):
        main(["--method", "nope", "--no-progress"])


@pytest.mark.parametrize("sets,msg", [
    (["nosuch.lr=1"], "no method 'nosuch'"), (["mezo.lr=1"], "'mezo' is not among the methods run"),
    (["lora.lr=abc"], "lora.lr='abc': expected a number"), (["lora.bogus=1"], "has no option 'bogus'"),
    (["lora.r=0"], "'lora' refuses these options: .*r must be a positive int"),        # values patch refuses
    (["lora.r=8.0"], "r must be a positive int"), (["lora.lr=-1"], "refuses these options: .*learning rate"),
    (["lora.step_multiplier=0.5"], "expected a whole number >= 1"),
])
def test_demo_refuses_bad_overrides_before_it_trains(sets, msg, monkeypatch):
    """A misspelt method was silently ignored, a bad value failed with a raw traceback after the pre-training
    (found by audit): refused up front with what it takes."""
    import fusedtune.demo as demo
    monkeypatch.setattr(demo, "_run", lambda *a: pytest.fail("the demo ran"))
    argv = ["--method", "lora", "--no-progress"] + [x for s in sets for x in ("--set", s)]
    with pytest.raises(SystemExit, match=msg):
        main(argv)


@pytest.mark.parametrize("argv,msg", [(["--hidden", "30"], "--hidden must be a multiple of 8"),
                                      (["--out", __file__], "exists and is not a folder")])
def test_demo_refuses_bad_arguments_before_it_trains(argv, msg, monkeypatch, capsys):
    """A hidden size the model cannot split into heads failed in transformers' config with a traceback; an --out
    naming a file failed after every fine-tune (found by review)."""
    import fusedtune.demo as demo
    monkeypatch.setattr(demo, "_run", lambda *a: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit):
        main(["--method", "lora", "--no-progress"] + argv)
    assert msg in capsys.readouterr().err


def test_tasks_follow_their_rules():
    import torch
    t = Tasks(vocab_size=64, seq_len=24, period=4, remapped=16)
    g = torch.Generator().manual_seed(0)
    a, b, keep = t.batch("A", 512, g), t.batch("B", 512, g), t.retention_batch(512, g)
    assert a.shape == b.shape == keep.shape == (512, 24)
    assert (a[:, 0] == 0).all() and (b[:, 0] == 1).all() and (keep[:, 0] == 0).all()
    assert torch.equal(a[:, 5:], a[:, 1:-4]) and torch.equal(keep[:, 5:], keep[:, 1:-4])
    prev, nxt = b[:, 1:-4] - 2, b[:, 5:] - 2
    assert torch.equal(nxt, (prev + 1) % 16)
    # A covers every content token; B only its 16; retention only the 46 that B never shows
    assert set((a[:, 1:] - 2).unique().tolist()) == set(range(62))
    assert set((b[:, 1:] - 2).unique().tolist()) == set(range(16))
    assert set((keep[:, 1:] - 2).unique().tolist()) == set(range(16, 62))
    with pytest.raises(ValueError, match="remapped=62"):
        Tasks(vocab_size=64, remapped=62)


@pytest.mark.slow
def test_demo_retention_column_separates_hft_from_full_fine_tuning():
    """The demo's default settings (README's numbers): both methods learn task B, and half fine-tuning
    keeps clearly more of task A on the tokens B never shows than full fine-tuning at the same lr."""
    rows = {r["method"]: r for r in run(DemoConfig(progress=False), ["full", "hft"], out=None)["rows"]}
    full, hft = rows["full"], rows["hft"]
    assert full["lr"] == hft["lr"]
    assert full["b_acc"] > 0.99 and hft["b_acc"] > 0.99
    assert full["a_acc_before"] > 0.99
    assert hft["a_acc"] > full["a_acc"] + 0.2, (hft["a_acc"], full["a_acc"])
