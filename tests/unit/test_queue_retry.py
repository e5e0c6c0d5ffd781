"""RetryPolicy: backoff growth, cap and validation."""

from __future__ import annotations

import pytest

from scp_node.app import retry_policy
from scp_node.queue.retry import RetryPolicy
from scp_node.settings import RetrySection


def test_backoff_grows_by_multiplier_and_caps() -> None:
    policy = RetryPolicy(initial_backoff_s=5, max_backoff_s=30, multiplier=2)
    assert [policy.backoff_s(a) for a in range(1, 6)] == [5, 10, 20, 30, 30]


def test_backoff_huge_attempt_is_capped_not_overflowing() -> None:
    policy = RetryPolicy(initial_backoff_s=1, max_backoff_s=600, multiplier=10)
    assert policy.backoff_s(100_000) == 600


def test_backoff_zero_initial_stays_zero() -> None:
    assert RetryPolicy(initial_backoff_s=0).backoff_s(50) == 0


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().backoff_s(0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("initial_backoff_s", -1.0),
        ("max_backoff_s", -1.0),
        ("multiplier", 0.5),
        ("give_up_after_s", 0.0),
    ],
)
def test_invalid_arguments_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: value})  # type: ignore[arg-type]


def test_app_builds_the_policy_from_every_retry_field() -> None:
    section = RetrySection(
        max_attempts=4,
        initial_backoff_s=1.5,
        max_backoff_s=60,
        multiplier=3,
        give_up_after_s=3600,
    )
    assert retry_policy(section) == RetryPolicy(4, 1.5, 60, 3, 3600)
