"""The worker's model pool: cards read at start (broken folders refused with file and key),
weights loaded lazily, the most recently used kept; and the routing rules of a card."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from scp_node.dicom.selection import SeriesRules, route_series, route_study
from scp_node.errors import ModelError
from scp_node.inference.pool import ModelPool
from scp_node.inference.registry import ModelSpec
from scp_node.queue.records import SeriesFacts
from tests.support.models import SHIPPED_SERIES, model_folder, mr_model, thin_ct_model


class FakeModel:
    """Stands for a loaded predictor; counts how often each model was loaded."""

    device = "cpu"

    def __init__(self, spec: ModelSpec) -> None:
        self.name = spec.name

    def predict(
        self, volume: Any, spacing_zyx: tuple[float, float, float], direction: Any = None
    ) -> Any:
        return volume


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for name in ("model-a", "model-b", "model-c"):
        model_folder(root, name)
    return root


def test_loads_lazily_and_keeps_the_most_recently_used(models_dir: Path) -> None:
    loads: list[str] = []

    def loader(spec: ModelSpec) -> FakeModel:
        loads.append(spec.name)
        return FakeModel(spec)

    pool = ModelPool(models_dir, ["model-a", "model-b", "model-c"], loader, max_loaded=2)
    assert loads == []  # nothing loaded before a job needs it
    assert pool.served == ("model-a", "model-b", "model-c")
    assert pool.status() == dict.fromkeys(pool.served, "ready")
    spec, model = pool.get("model-a")
    assert (spec.name, loads) == ("model-a", ["model-a"])
    assert pool.get("model-a")[1] is model  # held, not loaded again
    pool.get("model-b")
    pool.get("model-a")  # a is now the most recently used
    pool.get("model-c")  # evicts b, the least recently used
    assert pool.loaded == ("model-a", "model-c")
    assert loads == ["model-a", "model-b", "model-c"]
    pool.get("model-b")  # loaded again, evicting a
    assert loads[-1] == "model-b"
    assert pool.loaded == ("model-c", "model-b")
    assert pool.status() == {"model-a": "ready", "model-b": "loaded", "model-c": "loaded"}


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        ({"card": "", "link_weights": True}, "labels: Field required"),
        ({"replace": {'format = "state_dict"': 'format = "caffe"'}}, "weights.format: Input"),
        (
            {"replace": {'type = { code = "10200004", scheme = "SCT", meaning = "Liver" }\n': ""}},
            "labels.0.type: Field required",
        ),
        ({"link_weights": False}, "weights file"),
        ({"replace": {SHIPPED_SERIES: SHIPPED_SERIES + 'series_description = "("\n'}}, "series"),
    ],
    ids=["empty-card", "unknown-format", "label-without-code", "no-weights", "bad-pattern"],
)
def test_a_broken_folder_is_refused_and_the_others_keep_running(
    models_dir: Path, break_it: dict[str, Any], message: str
) -> None:
    folder = model_folder(models_dir, "broken", **break_it)
    pool = ModelPool(models_dir, ["model-a", "broken"], FakeModel)
    assert pool.served == ("model-a",)
    reason = pool.down["broken"]
    assert str(folder / "model.toml") in reason or str(folder) in reason
    assert message in reason
    assert pool.status()["broken"] == f"down: {reason}"
    with pytest.raises(ModelError, match="model broken: "):
        pool.get("broken")
    assert pool.get("model-a")[0].name == "model-a"


def test_a_missing_folder_is_refused(models_dir: Path) -> None:
    pool = ModelPool(models_dir, ["model-a", "nowhere"], FakeModel)
    assert pool.down == {"nowhere": f"no model.toml in {models_dir / 'nowhere'}"}


def test_weights_that_fail_to_load_put_the_model_down(models_dir: Path) -> None:
    def loader(spec: ModelSpec) -> FakeModel:
        if spec.name == "model-b":
            raise ModelError("cannot load weights: truncated file")
        return FakeModel(spec)

    pool = ModelPool(models_dir, ["model-a", "model-b"], loader)
    with pytest.raises(ModelError, match="truncated file"):
        pool.get("model-b")
    assert pool.served == ("model-a",)
    assert "weights cannot be loaded: cannot load weights: truncated file" in pool.down["model-b"]


def test_pool_arguments_are_checked(models_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_loaded"):
        ModelPool(models_dir, ["model-a"], FakeModel, max_loaded=0)
    with pytest.raises(ValueError, match="at least one"):
        ModelPool(models_dir, [], FakeModel)


def _facts(**kw: Any) -> SeriesFacts:
    values: dict[str, Any] = {
        "series_instance_uid": "1.2.3",
        "modality": "CT",
        "series_description": "CT Abdomen 2.0",
        "body_part_examined": "ABDOMEN",
        "slice_thickness_mm": 2.0,
        "orientation": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        "frame_count": 50,
    }
    values.update(kw)
    return SeriesFacts(**values)


def test_route_series_judges_what_intake_recorded() -> None:
    rules = SeriesRules(
        modalities=("CT",),
        min_slices=10,
        body_parts=("abdomen", "CHEST"),
        series_description=r"abdo",
        slice_thickness_mm=(1.0, 3.0),
    )
    assert route_series(_facts(), rules) is None
    # Unknown values pass: the worker decides from the files.
    unknown = _facts(body_part_examined=None, slice_thickness_mm=None, orientation=None)
    assert route_series(unknown, rules) is None
    angle = math.radians(30)
    sagittalish = (0.0, 1.0, 0.0, 0.0, math.sin(angle), -math.cos(angle))
    cases = {
        "modality MR is not one of CT": _facts(modality="MR"),
        "9 frame(s) received, at least 10 needed": _facts(frame_count=9),
        "no image received": _facts(frame_count=0),
        "body part HEAD is not one of abdomen, CHEST": _facts(body_part_examined="HEAD"),
        "series description does not match /abdo/": _facts(series_description="Thorax"),
        "slice thickness 5 mm outside [1, 3] mm": _facts(slice_thickness_mm=5.0),
        "not axial: slice normal 90.0 degrees from the patient z axis (at most 10 allowed)": (
            _facts(orientation=sagittalish)
        ),
    }
    for reason, facts in cases.items():
        assert route_series(facts, rules) == reason
    assert route_series(_facts(series_description=None), rules) == (
        "series description does not match /abdo/"
    )
    mixed = [_facts(series_instance_uid="1.2.4", modality="MR"), _facts()]
    assert route_study(mixed, rules) is None
    assert (
        route_study([mixed[0]], rules) == "no series matches: 1.2.4: modality MR is not one of CT"
    )
    assert route_study([], rules) == "no series received"


def test_card_rules_reach_the_selection_record(tmp_path: Path) -> None:
    spec = ModelSpec.from_model_dir(thin_ct_model(tmp_path))
    rules = spec.series.rules()
    assert (rules.slice_thickness_mm, rules.series_description) == ((1.0, 3.0), "body")
    assert ModelSpec.from_model_dir(mr_model(tmp_path)).series.modalities == ("MR",)
    with pytest.raises(ValueError, match="slice_thickness_mm"):
        SeriesRules(slice_thickness_mm=(3.0, 1.0))
