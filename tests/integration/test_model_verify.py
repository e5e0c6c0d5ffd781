"""Start-up verification of the shipped model's variants on this machine.

A copy of models/ct-abdomen gets a deliberately broken int8 ONNX file (its int8 weights
shuffled): the node must not use it, fall back to the next variant of the card's order, and
say why in the log-free places an operator looks: ``/healthz``, the health page and
``scp-node model status``. With ``auto`` the fastest verified variant runs, its timings are
cached per machine and reused on the next start, and a rejected variant is never picked.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from scp_node.cli import app
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec
from scp_node.inference.verify import ReferenceCase, check_variant, select_variant
from scp_node.settings import load_settings
from tests.conftest import REPO_ROOT
from tests.support.config import write_config
from tests.support.net import free_port
from tests.support.node_thread import wait_for_model, work_stage_running

SHIPPED = REPO_ROOT / "models" / "ct-abdomen"
BROKEN = "pruned-int8-ort"
#: The same broken file run by OpenVINO: verified (and refused) on its own.
BROKEN_TWIN = "pruned-int8-ov"
REJECTED = re.compile(rf"variant {BROKEN} rejected on this machine: Dice (0\.\d\d) < 0\.99")
runner = CliRunner()


def _break_int8_weights(path: Path) -> None:
    """Shuffle every int8 weight tensor of an ONNX graph (same values, wrong places)."""
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(tensor).copy()
            flat = values.reshape(-1)
            rng.shuffle(flat)
            replacement = numpy_helper.from_array(flat.reshape(values.shape), tensor.name)
            model.graph.initializer[index].CopyFrom(replacement)
    onnx.save(model, str(path))


def _set_runtime(model_dir: Path, cpu: str) -> None:
    card = model_dir / "model.toml"
    text = re.sub(r'(?m)^cpu = "[^"]*"$', f'cpu = "{cpu}"', card.read_text())
    text = re.sub(
        r"(?m)^cpu_order = .*$",
        f'cpu_order = ["{BROKEN}", "pruned-onnx", "pruned-int8-fx", "pruned-ov", '
        f'"{BROKEN_TWIN}", "pruned", "fp32"]',
        text,
    )
    card.write_text(text)


@pytest.fixture
def broken_model(tmp_path: Path) -> Path:
    """models/<copy>/ct-abdomen whose card asks for the broken int8 ONNX variant."""
    model_dir = tmp_path / "models" / "ct-abdomen"
    shutil.copytree(SHIPPED, model_dir)
    _break_int8_weights(model_dir / ModelSpec.from_model_dir(model_dir).variant(BROKEN).file)
    _set_runtime(model_dir, BROKEN)
    return model_dir


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status), response.read().decode()


def test_broken_variant_rejected_with_fallback_and_reason_shown(
    broken_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(
        tmp_path,
        free_port(),
        free_port(),
        worker={
            "models_dir": str(broken_model.parent),
            "variant_cache_dir": str(tmp_path / "var" / "variants"),
        },
    )
    settings = load_settings(config)
    with work_stage_running(settings) as base:
        health = wait_for_model(base)
        # Falls back to the next variant of the card's order, which passes here.
        assert health["model"]["variant"].startswith("ct-abdomen variant pruned-onnx")
        (note,) = health["model"]["rejected"]
        # One line per rejected variant, named by its model (a node may serve several).
        match = REJECTED.fullmatch(note.removeprefix("ct-abdomen: ").removesuffix(" (liver)"))
        assert note.startswith("ct-abdomen: "), note
        assert match is not None, note
        assert float(match.group(1)) < 0.99
        assert health["status"] == "ok"  # the node runs correctly, on the fallback

        status, page = _get(f"{base}/health")
        assert status == 200
        assert note in html.unescape(page) and "pruned-onnx" in page

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["model", "status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "model ct-abdomen" in result.stdout and "running pruned-onnx" in result.stdout
    assert note.removeprefix("ct-abdomen: ") in result.stdout


def test_check_reports_every_label_and_the_logit_error(broken_model: Path) -> None:
    spec = ModelSpec.from_model_dir(broken_model)
    assert spec.verify.file is not None
    case = ReferenceCase.load(broken_model / spec.verify.file)
    predictor = Predictor("cpu", threads=1)
    predictor.load(spec, BROKEN)
    check = check_variant(predictor, spec, case)
    assert not check.ok
    assert set(check.dice) == {label.name for label in spec.labels}
    assert check.max_logit_error is not None and check.max_logit_error > 1.0
    predictor.load(spec, "pruned")
    good = check_variant(predictor, spec, case)
    assert good.ok and good.dice == {"liver": 1.0}
    assert good.max_logit_error is not None and good.max_logit_error < 1e-3


def test_auto_picks_a_verified_variant_and_caches_the_timings(
    broken_model: Path, tmp_path: Path
) -> None:
    spec = ModelSpec.from_model_dir(broken_model)
    cache = tmp_path / "var" / "variants"

    def make() -> Predictor:
        return Predictor("cpu", threads=1)

    predictor, first = select_variant(spec, make, requested="auto", cache_dir=cache)
    checks = {c.variant: c for c in first.checks}
    assert set(checks) == {"fp32", *spec.variants}
    assert not checks[BROKEN].ok and checks[BROKEN].ms_per_slice is None
    assert not checks[BROKEN_TWIN].ok and checks[BROKEN_TWIN].ms_per_slice is None
    assert first.chosen != BROKEN_TWIN
    assert first.chosen != BROKEN and checks[first.chosen].ok
    assert predictor.variant == first.chosen
    timed = first.timings_ms
    assert set(timed) == {n for n, c in checks.items() if c.ok}
    assert timed[first.chosen] == min(timed.values())
    assert not first.cached
    cached_file = cache / "ct-abdomen.json"
    written = json.loads(cached_file.read_text())
    assert {c["variant"] for c in written["checks"]} == set(checks)

    # Second start: the same machine and files reuse the timings (no new measurement).
    again, second = select_variant(spec, make, requested="auto", cache_dir=cache)
    assert second.cached
    assert second.chosen == first.chosen and second.timings_ms == timed
    assert again.variant == first.chosen
    assert json.loads(cached_file.read_text()) == written

    # Another thread count is another machine key: timed afresh, the broken one refused.
    result = runner.invoke(
        app,
        ["model", "status", "--model-dir", str(broken_model), "--variant", "auto", "--json"],
        env={
            "SCP_NODE_WORKER__VARIANT_CACHE_DIR": str(cache),
            "SCP_NODE_WORKER__THREADS": "2",
            "SCP_NODE_WORKER__DEVICE": "cpu",
        },
    )
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["cached"] is False and status["chosen"] != BROKEN
    assert any(BROKEN in line for line in status["rejected"])
