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

Retries after an overload answer are also bounded by a **retry budget** shared by a client's calls
(Envoy's retry budget: a share of the calls in progress, with a floor). Why: when the whole fleet is
full, every rejected call that keeps retrying stays in a backlog that competes with fresh arrivals for
the same queues, and each rejection costs the servers work; the backlog then outlives the overload by
(backlog / spare capacity) and keeps p99 high long after capacity is back. Measured in the fleet harness
(docs/AUTOSCALING.md): without a budget, 52,000-78,000 rejected retries in a 5-minute step and a p99
that did not recover before the step ended. With it, at most
``max(min_retrying, ratio * calls in progress)`` calls of one client retry after RESOURCE_EXHAUSTED at a
time; the others fail fast with the server's answer. A lone
caller, or a few, always retry (the floor). UNAVAILABLE is not budgeted: it means one server went away
(killed, draining, warming up) and a retry reaches another, which is what keeps a pod's death or a
scale-down free of failures.

Every attempt carries its number in the call's metadata (``ATTEMPT_METADATA_KEY``: "1" for the first):
the server counts only first attempts as arriving work for its autoscaling signal (``sdxl_demand``), so
that a call retried across a saturated fleet reads as one request's demand, not one per attempt.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from sdxl_client._errors import DeadlineExceeded, SdxlError

__all__ = ["RetryBudget", "RetryPolicy"]

# The server reads the same name (sdxl_server/service/demand.py ATTEMPT_HEADER); the HTTP door takes it
# as a header.
ATTEMPT_METADATA_KEY = "x-sdxl-attempt"


@dataclass(frozen=True)
class RetryBudget:
    """How many of a client's calls may be retrying after an overload answer at once.

    Attributes:
        ratio: Share of the client's calls in progress (first attempts, waits and retries).
        min_retrying: Calls that may always retry, however few are in progress.
    """

    ratio: float = 0.2
    min_retrying: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 1 or self.min_retrying < 0:
            raise ValueError("ratio must be in [0, 1] and min_retrying >= 0")

    def allows(self, retrying: int, in_progress: int) -> bool:
        """Whether one more call may start retrying while ``retrying`` of ``in_progress`` calls do."""
        return retrying + 1 <= max(self.min_retrying, self.ratio * in_progress)


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries retryable errors.

    Attributes:
        max_attempts: Attempts in all, the first included; 1 disables retries.
        initial_backoff: Cap of the first wait, in seconds.
        max_backoff: Largest wait, in seconds, also for a longer delay the server asks for.
        multiplier: Growth of the cap from one retry to the next.
        budget: Bound on the calls retrying after RESOURCE_EXHAUSTED at once (see the module's
            docstring); None retries every overloaded call up to ``max_attempts``.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    budget: RetryBudget | None = RetryBudget()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff_cap(self, retry_number: int) -> float:
        """Largest wait before retry ``retry_number`` (1 for the first retry)."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry_number - 1))


NO_RETRIES = RetryPolicy(max_attempts=1)


class CallsInProgress:
    """A client's calls in progress and how many of them are retrying after an overload answer.

    The one owner of the retry budget's counts; shared by a client's calls, from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_progress = 0
        self.retrying = 0
        self.refused = 0  # overload retries the budget refused, since the client was made

    def started(self) -> None:
        with self._lock:
            self.in_progress += 1

    def ended(self, was_retrying: bool) -> None:
        with self._lock:
            self.in_progress -= 1
            self.retrying -= int(was_retrying)

    def start_retrying(self, budget: RetryBudget) -> bool:
        """Takes a place among the retrying calls if the budget has one; counts a refusal if not."""
        with self._lock:
            if budget.allows(self.retrying, self.in_progress):
                self.retrying += 1
                return True
            self.refused += 1
            return False


class RetryState:
    """One call's attempts against a policy and the caller's overall deadline.

    Use it as a context manager around the call's attempts: the call counts among its client's calls in
    progress (for the retry budget) until the block ends.

    Args:
        policy: The retry policy.
        timeout: The caller's overall time budget in seconds, covering every attempt and wait; None for
            no deadline.
        calls: The client's calls in progress, for the policy's retry budget; None for a call of its own.
        clock: Monotonic clock (replaceable in tests).
        uniform: Returns a number in [0, 1) (replaceable in tests).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        *,
        calls: CallsInProgress | None = None,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.attempts = 0
        self._calls = calls if calls is not None else CallsInProgress()
        self._retrying_after_overload = False
        self.refused_by_budget = False  # the last retry was refused by the retry budget
        self._clock = clock
        self._uniform = uniform
        self._deadline = None if timeout is None else clock() + timeout

    def __enter__(self) -> RetryState:
        self._calls.started()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._calls.ended(self._retrying_after_overload)

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
        if not self._within_budget(error):
            return None
        return delay

    def _within_budget(self, error: SdxlError) -> bool:
        """Whether an overload answer may be retried; a call keeps its place once it has one."""
        budget = self.policy.budget
        if budget is None or error.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return True
        if not self._retrying_after_overload:
            self._retrying_after_overload = self._calls.start_retrying(budget)
            self.refused_by_budget = not self._retrying_after_overload
        return self._retrying_after_overload
