"""Per-series work on both backends: a series quiet for ``series_quiet_s`` becomes the job of
a per-series model while the study is still arriving; the study's own settle adds jobs only
for the series no job covers; study-level models still wait for the whole study."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from scp_node.dicom.selection import SeriesRules, route_study
from scp_node.queue import JobState, Outcome
from scp_node.queue.models import Job
from scp_node.queue.records import SeriesFacts
from scp_node.queue.settling import Router
from scp_node.settle import Settler
from tests.unit.conftest import FakeClock, InstanceFactory, Table

STUDY = "1.2.826.0.1.3680043.8.498.30"
FIRST, SECOND, SCOUT = STUDY + ".1", STUDY + ".2", STUDY + ".3"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
QUIET_S, SERIES_QUIET_S = 10.0, 2.0


def _router(rules: SeriesRules) -> Router:
    def route(series: Sequence[SeriesFacts]) -> str | None:
        return route_study(series, rules)

    return route


CT = _router(SeriesRules(modalities=("CT",), min_slices=3))
ROUTES: dict[str, Router | None] = {"per-series": CT, "whole-study": CT}


def _receive(table: Table, make: InstanceFactory, series: str, n: int = 3, **kw: object) -> None:
    for _ in range(n):
        table.intake.record_instance(
            make(study=STUDY, series=series, orientation=AXIAL, slice_thickness_mm=2.5, **kw)
        )


def _jobs(table: Table) -> list[tuple[str, str | None, JobState, Outcome | None]]:
    with table.engine.connect() as conn:
        rows = conn.execute(
            select(Job.model, Job.series_instance_uid, Job.state, Job.outcome).order_by(Job.id)
        ).all()
    return [(m, uid, JobState(state), outcome) for m, uid, state, outcome in rows]


def _settler(table: Table, clock: FakeClock) -> Settler:
    return Settler(
        table.settling,
        ROUTES,
        QUIET_S,
        clock=clock,
        per_series=["per-series"],
        series_quiet_s=SERIES_QUIET_S,
    )


def test_a_quiet_series_starts_its_job_before_the_studys_last_series_arrives(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    settler = _settler(table, clock)
    clock.advance(QUIET_S)  # past the settler's start-up wait
    _receive(table, instance_factory, FIRST)
    clock.advance(SERIES_QUIET_S - 0.5)
    assert not settler.run_once()  # the first series is still arriving
    clock.advance(0.5)
    assert settler.run_once()
    assert _jobs(table) == [("per-series", FIRST, JobState.QUEUED, None)]

    # A worker claims it, scoped to its series, while the study goes on arriving.
    claimed = table.work.claim("w", 60, models=["per-series"])
    assert claimed is not None and claimed.series_instance_uid == FIRST
    _receive(table, instance_factory, SECOND)
    assert not settler.run_once()  # the first series has its job; the second is arriving
    clock.advance(SERIES_QUIET_S)
    assert settler.run_once()
    assert _jobs(table)[1:] == [("per-series", SECOND, JobState.QUEUED, None)]
    assert table.work.claim("w", 60, models=["whole-study"]) is None  # study not quiet yet

    # The study settles: the study-level model gets its one job, the per-series model none
    # (both its series are covered).
    clock.advance(QUIET_S)
    assert settler.run_once()
    assert _jobs(table)[2:] == [("whole-study", None, JobState.QUEUED, None)]
    whole = table.work.claim("w", 60, models=["whole-study"])
    assert whole is not None and whole.series_instance_uid is None


def test_the_study_settle_covers_series_the_series_timer_did_not(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    # Without the series sweep (or when the whole study arrives within series_quiet_s),
    # the study's settle queues one job per routable series of a per-series model.
    _receive(table, instance_factory, FIRST)
    _receive(table, instance_factory, SECOND)
    _receive(table, instance_factory, SCOUT, n=1)  # too few slices for the rules
    clock.advance(QUIET_S)
    created = table.settling.settle(QUIET_S, ROUTES, per_series=["per-series"])
    assert len(created) == 3
    assert sorted(_jobs(table), key=str) == sorted(
        [
            ("per-series", FIRST, JobState.QUEUED, None),
            ("per-series", SECOND, JobState.QUEUED, None),
            ("whole-study", None, JobState.QUEUED, None),
        ],
        key=str,
    )


def test_new_instances_after_a_series_job_ran_give_it_a_new_job(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    _receive(table, instance_factory, FIRST)
    clock.advance(SERIES_QUIET_S)
    assert len(table.settling.settle_series(SERIES_QUIET_S, {"per-series": CT})) == 1
    claimed = table.work.claim("w", 60)
    assert claimed is not None
    clock.advance(1)
    _receive(table, instance_factory, FIRST, n=1)  # arrives after the job was created
    clock.advance(SERIES_QUIET_S)
    assert [uid for _m, uid, _s, _o in _jobs(table)] == [FIRST]  # its job is running
    assert len(table.settling.settle_series(SERIES_QUIET_S, {"per-series": CT})) == 1
    assert [uid for _m, uid, _s, _o in _jobs(table)] == [FIRST, FIRST]


def test_a_per_series_model_that_takes_no_series_records_why(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    _receive(table, instance_factory, SCOUT, n=1)
    clock.advance(QUIET_S)
    assert table.settling.settle_series(SERIES_QUIET_S, {"per-series": CT}) == []
    table.settling.settle(QUIET_S, {"per-series": CT}, per_series=["per-series"])
    ((model, uid, state, outcome),) = _jobs(table)
    assert (model, uid, state, outcome) == (
        "per-series",
        None,
        JobState.DONE,
        Outcome.NO_MATCHING_SERIES,
    )
