"""Fail-over: one client balances over two real servers (``ipv4:`` list, round_robin); one is killed while
it holds accepted requests; every request still succeeds exactly once, on the survivor.

No timing is assumed: server B is made unable to finish anything (a long request holds its only slot), so
the requests balanced onto it are provably still waiting when it is killed (its queue depth on /metrics
says so), and they must be retried on A.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from sdxl_client import AsyncClient, Client, GenerateResult, Progress, RetryPolicy, Unavailable
from sdxl_test_support.metrics_page import metric_samples, sample
from sdxl_test_support.xla_flags import xla_flags

ONE_DEVICE = {"XLA_FLAGS": xla_flags(devices=1)}
LONG_STEPS = 5000
WAVE = 8


def _metric(server, name: str, **labels: str) -> float:
    return sample(metric_samples(server.scrape_metrics()), name, **labels)


def _served_generate(server) -> float:
    return _metric(server, "sdxl_requests_total", method="Generate", code="OK")


async def _until(condition, what: str, timeout: float = 60.0) -> None:
    """Polls a (blocking) condition off the event loop until it holds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.slow
def test_requests_survive_a_server_killed_mid_run(server_factory):
    a = server_factory(env=ONE_DEVICE)
    b = server_factory("--max-steps", str(LONG_STEPS), env=ONE_DEVICE)
    retries: list[tuple[object, ...]] = []
    policy = RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.5)

    # B's only slot is taken by a request that would run for minutes, so whatever B accepts waits.
    blocker_client = Client(b.target, timeout=None, retry=RetryPolicy(max_attempts=1))  # cancelled below
    blocker = blocker_client.generate_stream("blocker", steps=LONG_STEPS)
    while not isinstance(next(blocker), Progress):
        pass

    async def run() -> list[GenerateResult]:
        target = f"ipv4:{a.target},{b.target}"
        # No deadline: B's admission would reject (DEADLINE_EXCEEDED) any request that cannot finish in
        # time behind the blocker, and these requests must wait there until B is killed.
        async with AsyncClient(
            target, timeout=None, retry=policy, on_retry=lambda *r: retries.append(r)
        ) as client:
            # Both connections up: each server has answered a call of this client.
            async def both_answered() -> bool:
                await client.server_info()
                counts = [
                    await asyncio.to_thread(
                        _metric, s, "sdxl_requests_total", method="GetServerInfo", code="OK"
                    )
                    for s in (a, b)
                ]
                return all(counts)

            deadline = time.monotonic() + 60
            while not await both_answered():
                assert time.monotonic() < deadline

            def generate(i: int):
                return asyncio.create_task(
                    client.generate("fail-over", seed=1000 + i, steps=2, request_id=f"failover-{i}")
                )

            first_wave = [generate(i) for i in range(WAVE)]
            await _until(lambda: _metric(b, "sdxl_queue_depth") >= 1, "requests waiting on B")
            b.kill()
            second_wave = [generate(i) for i in range(WAVE, 2 * WAVE)]
            return await asyncio.gather(*first_wave, *second_wave)

    try:
        results = asyncio.run(run())
    finally:
        blocker.close()
        blocker_client.close()

    # Every request answered once, with its own identity: none lost, none duplicated, none mixed up.
    assert [r.request_id for r in results] == [f"failover-{i}" for i in range(2 * WAVE)]
    assert [r.images[0].seed for r in results] == [1000 + i for i in range(2 * WAVE)]
    assert all(len(r.images) == 1 for r in results)
    # The requests that were waiting on B failed there and were retried (on A, the only one left).
    assert retries and all(isinstance(error, Unavailable) for error, _, _ in retries)
    # A served them all (counted just after each answer was sent, hence the wait for the count to settle).
    asyncio.run(_until(lambda: _served_generate(a) >= 2 * WAVE, "A's count of successes"))
    assert _served_generate(a) == 2 * WAVE

    # A stopped server is UNAVAILABLE (after the retries, which find nobody either).
    with Client(b.target, timeout=30, retry=RetryPolicy(max_attempts=2, initial_backoff=0.01)) as client:
        with pytest.raises(Unavailable) as raised:
            client.server_info()
        assert raised.value.retryable
    assert a.terminate() == 0
    after = Client(a.target, timeout=30, retry=RetryPolicy(max_attempts=1))
    with after, pytest.raises(Unavailable):
        after.generate("after shutdown", steps=1)
