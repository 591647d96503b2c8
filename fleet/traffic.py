"""Open-loop Poisson traffic through the project's own client (``sdxl_client.AsyncClient``).

Arrivals follow the scenario's rate profile (a non-homogeneous Poisson process, drawn by thinning) and
never wait for answers. Each arrival goes to one of ``callers`` clients in turn: separate channels, as
separate services calling the fleet would have, each balancing ``round_robin`` over the headless name's
addresses, with the client's default retries and the scenario's per-request deadline. Every request is
recorded (when it arrived, when and how it ended); retries are counted by the status that caused them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from sdxl_client import RetryBudget, RetryPolicy, SdxlError
from sdxl_client.aio import AsyncClient

from fleet.scenario import LiveProfile

# Final statuses that say the fleet dropped work it had accepted (a clean rejection is not a loss).
LOSS_CODES = frozenset({"CANCELLED", "INTERNAL", "UNKNOWN", "ABORTED", "DATA_LOSS"})
# A call that ends CANCELLED when its deadline has (all but) passed expired: the server's copy of the
# deadline fired first and grpc cancelled the stream. Counted apart, not as a loss.
CANCELLED_AT_DEADLINE = "CANCELLED_AT_DEADLINE"
_DEADLINE_SLACK_SECONDS = 1.0


@dataclass
class RequestRecord:
    index: int
    arrived: float  # seconds since the traffic started
    ended: float | None = None
    code: str | None = None  # "OK" or the final gRPC status name
    message: str | None = None  # the final error's text (grpc's details say who ended a call and why)

    @property
    def latency(self) -> float | None:
        return None if self.ended is None else self.ended - self.arrived


@dataclass
class TrafficLog:
    requests: list[RequestRecord] = field(default_factory=list)
    retries_by_code: Counter[str] = field(default_factory=Counter)
    retries: list[tuple[float, str]] = field(default_factory=list)  # (when, status that caused it)
    retries_refused_by_budget: int = 0  # overload answers the clients' retry budgets did not retry


class Traffic:
    def __init__(
        self,
        target: str,
        callers: int,
        deadline: float,
        max_attempts: int,
        retry_budget: RetryBudget | None,
        request: dict[str, object],
        profile: LiveProfile,
        per_unit: float,
        seed: int = 0,
    ) -> None:
        self._log = TrafficLog()
        self._clients = [
            AsyncClient(
                target,
                timeout=deadline,
                retry=RetryPolicy(max_attempts=max_attempts, budget=retry_budget),
                on_retry=self._count_retry,
            )
            for _ in range(callers)
        ]
        self._request = request
        self._deadline = deadline
        self._profile = profile
        self._per_unit = per_unit
        self._random = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self._start = 0.0
        self._current: dict[int, RequestRecord] = {}

    @property
    def log(self) -> TrafficLog:
        return self._log

    def now(self) -> float:
        return time.monotonic() - self._start

    def _count_retry(self, error: SdxlError, attempt: int, delay: float) -> None:
        code = error.code.name if error.code else type(error).__name__
        self._log.retries_by_code[code] += 1
        self._log.retries.append((self.now(), code))

    async def run(self, start: float) -> None:
        """Sends the whole profile (returns when the last arrival is sent, not answered)."""
        self._start = start
        peak = self._profile.peak * self._per_unit
        t = 0.0
        index = 0
        while True:
            t += self._random.expovariate(peak)
            delay = t - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._profile.ended(t):
                break
            if self._random.random() * peak > self._profile.rate(t) * self._per_unit:
                continue  # thinning: keep an arrival with probability rate(t) / peak
            record = RequestRecord(index, self.now())
            self._log.requests.append(record)
            task = asyncio.ensure_future(self._send(record, self._clients[index % len(self._clients)]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            index += 1

    async def _send(self, record: RequestRecord, client: AsyncClient) -> None:
        try:
            await client.generate(seed=record.index, **self._request)  # type: ignore[arg-type]
            record.code = "OK"
        except SdxlError as e:
            record.code = e.code.name if e.code else type(e).__name__
            record.message = e.message
            if (
                record.code == "CANCELLED"
                and self.now() - record.arrived >= self._deadline - _DEADLINE_SLACK_SECONDS
            ):
                record.code = CANCELLED_AT_DEADLINE
        except Exception as e:  # a bug here must show in the report, not vanish with the task
            record.code = f"CLIENT_ERROR:{type(e).__name__}"
            record.message = str(e)
        record.ended = self.now()

    async def drain(self, timeout: float) -> None:
        """Waits for every request sent to end (each has its deadline, so this is bounded)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        self._log.retries_refused_by_budget = sum(c.retries_refused_by_budget for c in self._clients)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
