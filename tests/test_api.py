"""The Python API (``import transferlab as tl``): the README's example, run as written, and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

import transferlab as tl
from builders import jpeg_bytes, tiny_imagenet_files, write_zip
from transferlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's Python API section should hold one python example"
    return blocks[0]


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly the README's code, on a 3-class stand-in named like the mini copy (so ``"tiny-imagenet-mini"``
    resolves to it through TRANSFERLAB_DATA), with EfficientNet-Lite0's real weights."""
    datasets = tmp_path / "datasets"
    write_zip(datasets / "tiny-imagenet-200-mini.zip", tiny_imagenet_files(n_train=10, n_val_per_class=6, n_test=1))
    monkeypatch.setenv("TRANSFERLAB_DATA", str(datasets))
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.jpg").write_bytes(jpeg_bytes((220, 30, 30), size=80))
    ns: dict[str, object] = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), ns)

    lp, zs, ens, run = ns["lp"], ns["zs"], ns["ens"], ns["run"]
    assert isinstance(lp, tl.Run) and isinstance(zs, tl.Evaluation) and isinstance(ens, tl.Ensemble)
    assert isinstance(run, tl.Run) and run.path == lp.path
    assert lp.metrics["top1"] > 0.5  # three colour-coded classes: far above chance (1/3)
    assert lp.history[-1]["epoch"] == 5 and lp.config.strategy == "linear-probe"
    assert (tmp_path / "runs" / "api-zs" / "predictions" / "val.npz").is_file()
    assert len(ns["result"].predictions[0]["top_k"]) == 3  # type: ignore[attr-defined]
    assert isinstance(ns["model"], nn.Module) and not ns["model"].training  # type: ignore[attr-defined]
    assert lp.predictions().class_ids.tolist() == list(ns["data"].classes.ids)  # type: ignore[attr-defined]
    assert ns["card"]["num_classes"] == 3 and isinstance(tl.load(tmp_path / "runs" / "api-export"), tl.Export)
    html = ns["rep"].html.read_text(encoding="utf-8")  # type: ignore[attr-defined]
    assert "api-lp" in html and "api-ens" in html
    plan = ns["plan"]
    assert [m.model for m in plan.measurements] == [
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]  # type: ignore[attr-defined]
    assert any(c.status == "chosen" for c in plan.candidates) and not (tmp_path / "runs" / "auto").exists()  # type: ignore[attr-defined]


def test_unknown_options_and_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train: unknown option 'epoch'; did you mean 'epochs'\?"):
        tl.train(model="test_resnet", data=tmp_path, out=tmp_path / "r", epoch=3)
    with pytest.raises(ConfigError, match="either a run folder"):
        tl.evaluate(data=tmp_path, out=tmp_path / "e")
    with pytest.raises(ConfigError, match=r"is not a folder transferlab wrote"):
        tl.load(tmp_path)
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        tl.trian  # noqa: B018


def test_import_stays_light() -> None:
    """``import transferlab`` loads no stage (the API comes on first use), so commands and the report start fast."""
    import subprocess
    import sys

    code = "import sys, transferlab; print('torch' in sys.modules, 'transferlab.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_public_name_resolves() -> None:
    from transferlab import api

    assert {n for n in tl.__all__ if n != "__version__"} == set(api.__all__)
    for name in tl.__all__:
        assert getattr(tl, name) is not None, name
    assert callable(tl.train) and callable(tl.evaluate) and callable(tl.ensemble) and callable(tl.study)
    import transferlab.exports
    import transferlab.reports  # noqa: F401 - once imported, a submodule named like a function would shadow it

    assert callable(tl.export) and callable(tl.report) and callable(tl.predict)
