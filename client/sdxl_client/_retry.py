"""Retry decisions shared by the sync and asyncio clients (the loops that sleep live in each client).

Only errors that say ``retryable`` are retried: UNAVAILABLE (no server reachable, warming up,
draining) and RESOURCE_EXHAUSTED that carries the server's RetryInfo (queue full). A RESOURCE_EXHAUSTED
without RetryInfo is not the server's overload answer: "message larger than max" (MessageTooLarge) would
fail the same way each time, so it is raised at once. The wait before retry ``n`` is "full jitter" exponential
backoff, uniform in ``[0, min(max_backoff, initial_backoff * multiplier**(n-1))]``, so that clients
rejected together do not come back together. When the server sent a RetryInfo delay (queue full, warming
up, draining), that delay is the floor of the wait, itself capped at ``max_backoff``: behind a balanced
target the retry usually reaches another replica, which need not wait for this one's queue.

Attempts are bounded by ``max_attempts`` and by the caller's overall deadline: every attempt gets the
time that is left as its gRPC deadline, and a retry whose wait would end past the deadline is not made
(the last error is raised instead, at once).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from sdxl_client._errors import DeadlineExceeded, SdxlError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries retryable errors.

    Attributes:
        max_attempts: Attempts in all, the first included; 1 disables retries.
        initial_backoff: Cap of the first wait, in seconds.
        max_backoff: Largest wait, in seconds, also for a longer delay the server asks for.
        multiplier: Growth of the cap from one retry to the next.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff_cap(self, retry_number: int) -> float:
        """Largest wait before retry ``retry_number`` (1 for the first retry)."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))


NO_RETRIES = RetryPolicy(max_attempts=1)


class RetryState:
    """One call's attempts against a policy and the caller's overall deadline.

    Args:
        policy: The retry policy.
        timeout: The caller's overall time budget in seconds, covering every attempt and wait; None for
            no deadline.
        clock: Monotonic clock (replaceable in tests).
        uniform: Returns a number in [0, 1) (replaceable in tests).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.attempts = 0
        self._clock = clock
        self._uniform = uniform
        self._deadline = None if timeout is None else clock() + timeout

    def start_attempt(self) -> float | None:
        """Counts an attempt and returns its gRPC timeout (the time left), or None without a deadline.

        Raises:
            DeadlineExceeded: No time is left for another attempt.
        """
        self.attempts += 1
        if self._deadline is None:
            return None
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed before it could be sent")
        return remaining

    def delay_before_retry(self, error: SdxlError) -> float | None:
        """Seconds to wait before retrying after ``error``, or None when the error must be raised now."""
        if not error.retryable or self.attempts >= self.policy.max_attempts:
            return None
        delay = self._uniform() * self.policy.backoff_cap(self.attempts)
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, self.policy.max_backoff))
        if self._deadline is not None and self._clock() + delay >= self._deadline:
            return None
        return delay
