"""Routing on both backends: intake records the series facts, settle makes one job per model
whose rules take the study (and a finished job with the reason for the others), and a
worker claims only the jobs of the models it serves."""

from __future__ import annotations

from collections.abc import Sequence

from scp_node.dicom.selection import SeriesRules, route_study
from scp_node.queue import JobState, Outcome
from scp_node.queue.models import Stage
from scp_node.queue.records import SeriesFacts
from scp_node.queue.settling import Router
from tests.unit.conftest import FakeClock, InstanceFactory, Table

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CT_STUDY = "1.2.826.0.1.3680043.8.498.10"
MR_STUDY = "1.2.826.0.1.3680043.8.498.20"


def _router(rules: SeriesRules) -> Router:
    def route(series: Sequence[SeriesFacts]) -> str | None:
        return route_study(series, rules)

    return route


ROUTES: dict[str, Router | None] = {
    "ct-abdomen": _router(SeriesRules(modalities=("CT",), min_slices=3)),
    "mr-liver": _router(SeriesRules(modalities=("MR",), min_slices=3)),
}


def _receive(
    table: Table, instance_factory: InstanceFactory, study: str, modality: str, n: int = 3
) -> None:
    for _ in range(n):
        table.intake.record_instance(
            instance_factory(
                study=study,
                series=study + ".1",
                modality=modality,
                body_part_examined="ABDOMEN",
                slice_thickness_mm=2.5,
                orientation=AXIAL,
            )
        )


def test_intake_records_the_facts_routing_needs(
    table: Table, instance_factory: InstanceFactory
) -> None:
    _receive(table, instance_factory, CT_STUDY, "CT", n=2)
    table.intake.record_instance(
        instance_factory(study=CT_STUDY, series=CT_STUDY + ".1", frame_count=40)
    )
    (facts,) = table.settling.series_facts(CT_STUDY)
    assert facts == SeriesFacts(
        series_instance_uid=CT_STUDY + ".1",
        modality="CT",
        series_description="Abdomen",
        body_part_examined="ABDOMEN",
        slice_thickness_mm=2.5,
        orientation=AXIAL,
        frame_count=42,
    )
    assert table.settling.series_facts("1.2.3.404") == []


def test_settle_makes_one_job_per_matching_model_and_keeps_the_reason(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    _receive(table, instance_factory, CT_STUDY, "CT")
    _receive(table, instance_factory, MR_STUDY, "MR")
    clock.advance(11)
    created = table.settling.settle(10, ROUTES)
    assert len(created) == 4  # 2 studies x 2 models: 2 to run, 2 that say why not
    views = {(table.views.get(i).study_instance_uid, table.views.get(i).model): i for i in created}
    for study, model in ((CT_STUDY, "ct-abdomen"), (MR_STUDY, "mr-liver")):
        job = table.views.get(views[(study, model)])
        assert (job.state, job.outcome, job.error) == (JobState.QUEUED, None, None)
    skipped = table.views.get(views[(CT_STUDY, "mr-liver")])
    reason = f"no series matches: {CT_STUDY}.1: modality CT is not one of MR"
    assert (skipped.state, skipped.outcome, skipped.error, skipped.attempts) == (
        JobState.DONE,
        Outcome.NO_MATCHING_SERIES,
        reason,
        0,
    )
    (event,) = table.views.events_after(0, job_id=skipped.id)
    assert event.stage is Stage.SETTLED
    assert event.message == f"study settled: not routed to model mr-liver: {reason}"
    assert event.data["routed"] is False
    # Nothing of the skipped ones is ever claimed.
    claimed = {table.work.claim("w", 60) for _ in range(3)}
    assert {c.id for c in claimed if c is not None} == {
        views[(CT_STUDY, "ct-abdomen")],
        views[(MR_STUDY, "mr-liver")],
    }


def test_too_few_frames_is_not_routed(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    _receive(table, instance_factory, CT_STUDY, "CT", n=2)
    clock.advance(11)
    (job_id,) = table.settling.settle(10, {"ct-abdomen": ROUTES["ct-abdomen"]})
    job = table.views.get(job_id)
    assert job.state is JobState.DONE
    assert job.error == f"no series matches: {CT_STUDY}.1: 2 frame(s) received, at least 3 needed"


def test_claim_filters_by_the_models_the_worker_serves(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    _receive(table, instance_factory, CT_STUDY, "CT")
    clock.advance(11)
    first, second = table.settling.settle(10, ["model-a", "model-b"])
    assert table.work.claim("w", 60, models=["model-c"]) is None
    assert table.work.claim("w", 60, models=[]) is None
    got = table.work.claim("w", 60, models=["model-b"])
    assert got is not None and (got.id, got.model) == (second, "model-b")
    assert table.work.claim("w", 60, models=["model-b"]) is None
    got = table.work.claim("w", 60, models=["model-a", "model-b"])
    assert got is not None and (got.id, got.model) == (first, "model-a")
