"""Retry policy: exponential backoff shared by jobs and deliveries."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with a cap, an attempt limit (jobs) and a give-up age (deliveries).

    Parameters
    ----------
    max_attempts : int
        Inference attempts before a job fails for good (>= 1).
    initial_backoff_s : float
        Wait after the first failed attempt (>= 0).
    max_backoff_s : float
        Upper bound of any wait (>= 0).
    multiplier : float
        Growth factor between consecutive waits (>= 1).
    give_up_after_s : float
        A delivery still failing this long after its first attempt fails for good (> 0).

    Raises
    ------
    ValueError
        If an argument is out of range; the message names it.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 5.0
    max_backoff_s: float = 600.0
    multiplier: float = 2.0
    give_up_after_s: float = 86_400.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0:
            raise ValueError(f"initial_backoff_s must be >= 0, got {self.initial_backoff_s}")
        if self.max_backoff_s < 0:
            raise ValueError(f"max_backoff_s must be >= 0, got {self.max_backoff_s}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if self.give_up_after_s <= 0:
            raise ValueError(f"give_up_after_s must be > 0, got {self.give_up_after_s}")

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt``.

        Parameters
        ----------
        attempt : int
            1 for the first failed attempt: gives ``initial_backoff_s``; each further attempt
            multiplies by ``multiplier``, capped at ``max_backoff_s``.

        Returns
        -------
        float

        Raises
        ------
        ValueError
            If ``attempt`` is below 1.
        """
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        if self.initial_backoff_s == 0:
            return 0.0
        try:
            wait = self.initial_backoff_s * self.multiplier ** (attempt - 1)
        except OverflowError:
            return self.max_backoff_s
        return min(wait, self.max_backoff_s)
