"""Prometheus metrics with exactly the names of docs/ARCHITECTURE.md ("Ports and metrics").

Two sources: the service observes what it sees per RPC (``sdxl_requests_total``,
``sdxl_request_duration_seconds``, ``sdxl_queue_wait_seconds``); everything about the engine's state is
read lazily from ``engine.stats()`` at scrape time by a custom collector, so the step loop never touches a
metrics object and the gauges can never go stale. ``sdxl_demand`` (pods' worth of work arriving, refused
arrivals included; service/demand.py) is the autoscaling signal, ``sdxl_load`` the queue's view of it.
Everything lives in one registry per server (not the process-global default), so tests can run several.
The page that serves them over HTTP is metrics_endpoint.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sdxl_server.engine.api import EngineStats

# Seconds. A 64x64 tiny-model request takes tens of ms; a queued 1024x1024 SDXL request can take minutes.
# A request's phases range from tens of microseconds (tokenizing a prompt) to minutes (a queue wait).
_PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0, 10.0, 30.0, 60.0, 300.0)  # fmt: skip
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    """What the gRPC service records per request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sdxl_requests_total",
            "Finished RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "sdxl_request_duration_seconds",
            "Server-side latency of a request, from arrival to its status.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sdxl_queue_wait_seconds",
            "Time from admission until the request's first image entered a slot.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

        self.request_phase = Histogram(
            "sdxl_request_phase_seconds",
            "A finished request's time budget: seconds in each phase (service/time_budget.py PHASES).",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=registry,
        )

    def observe_phases(self, seconds_by_phase: dict[str, float]) -> None:
        for phase, seconds in seconds_by_phase.items():
            self.request_phase.labels(phase=phase).observe(seconds)

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.request_duration.labels(method=method).observe(seconds)


StepHistogram = Callable[[], tuple[list[tuple[float, int]], float] | None]


class EngineCollector(Collector):
    """Reads ``engine.stats()`` at scrape time and reports it under the contract's names.

    ``step_histogram``, when given, returns the engine's step-duration histogram as cumulative
    ``[(upper_bound, count), ...]`` (ending with +Inf) and the sum of observed seconds.
    """

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        step_histogram: StepHistogram | None = None,
        serving: Callable[[], bool] | None = None,
        demand: Callable[[EngineStats], float] | None = None,
        per_engine: Callable[[], list[EngineStats]] | None = None,
    ) -> None:
        """``serving``, when given, says whether the service takes new requests (False while draining);
        ``demand``, when given, computes ``sdxl_demand`` from the same snapshot (service/demand.py);
        ``per_engine``, given with an engine per device, each engine's own snapshot, in device order."""
        self._stats = stats
        self._step_histogram = step_histogram
        self._serving = serving
        self._demand = demand
        self._per_engine = per_engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        s = self._stats()
        ready = s.ready and (self._serving is None or self._serving())
        gauges = (
            ("sdxl_queue_depth", "Images admitted and waiting for a slot.", s.queue_depth),
            ("sdxl_slots_busy", "Slots holding an image being denoised.", s.slots_busy),
            ("sdxl_slots_total", "Slots (images denoised concurrently).", s.slots_total),
            ("sdxl_load", "(images waiting + images in slots) / slots: the autoscaling signal.", s.load),
            (
                "sdxl_device_busy_ratio",
                "Share of recent wall time the device was computing.",
                s.device_busy_ratio,
            ),
            (
                "sdxl_compile_seconds",
                "Time spent compiling (or loading compiled) programs.",
                s.compile_seconds,
            ),
            ("sdxl_startup_seconds", "Process start until ready to serve.", s.startup_seconds),
            (
                "sdxl_ready",
                "1 once warm-up finished and the server takes requests; 0 again while it drains.",
                1.0 if ready else 0.0,
            ),
        )
        for name, documentation, value in gauges:
            # A pod that does not serve (warming up, draining) reports no load at all rather than 0: for
            # a Pods metric the HPA counts a running pod's sample whatever its readiness, so a warming
            # pod's 0 pulled the average toward a scale-down; a missing sample counts as 0 on a scale-up
            # and as the target on a scale-down (docs/AUTOSCALING.md, "Findings").
            if name == "sdxl_load" and not ready:
                continue
            yield GaugeMetricFamily(name, documentation, value=float(value))
        if self._demand is not None and ready:  # absent while not serving, as sdxl_load (above)
            yield GaugeMetricFamily(
                "sdxl_demand",
                "Pods' worth of work arriving (refused arrivals included): image-steps arriving per second "
                "x measured step seconds / slots; 1.0 is exactly this pod's capacity.",
                value=float(self._demand(s)),
            )
        yield CounterMetricFamily("sdxl_images_total", "Images generated.", value=float(s.images_total))
        yield CounterMetricFamily(
            "sdxl_steps_total", "Denoising steps run, per image.", value=float(s.steps_total)
        )
        # How full the batches ran: padding is the gap between what ran and what busy slots needed.
        yield CounterMetricFamily(
            "sdxl_unet_row_steps_total",
            "UNet row-steps the step programs ran, padding included (rows per device x, per device, "
            "the steps its block had an image in: an empty block skips the UNet).",
            value=float(s.unet_row_steps_run),
        )
        yield CounterMetricFamily(
            "sdxl_unet_busy_row_steps_total",
            "UNet row-steps of busy slots (2 a guided image-step, 1 an unguided one); over "
            "sdxl_unet_row_steps_total, how full the step batches ran.",
            value=float(s.unet_row_steps_busy),
        )
        yield CounterMetricFamily(
            "sdxl_decodes_total", "Decode calls (VAE programs run).", value=float(s.decodes_total)
        )
        yield CounterMetricFamily(
            "sdxl_decode_rows_total",
            "VAE rows the decodes ran, padding included (each device's decode batch); over "
            "sdxl_images_total, the decode's rows an image.",
            value=float(s.decode_rows_run),
        )
        yield CounterMetricFamily(
            "sdxl_prompt_cache_hits_total",
            "Admissions whose prompt embeddings the prompt-embedding cache held (no text encoding).",
            value=float(s.prompt_cache_hits),
        )
        yield CounterMetricFamily(
            "sdxl_prompt_cache_misses_total",
            "Admissions that ran the text encoders while the prompt-embedding cache was on.",
            value=float(s.prompt_cache_misses),
        )
        # Per-request LoRA adapters: totals over all adapters, never a series per adapter name (a folder
        # may hold thousands; names come from users' files).
        yield CounterMetricFamily(
            "sdxl_lora_loads_total",
            "LoRA adapters loaded into the device's adapter bank.",
            value=float(s.lora_loads),
        )
        yield CounterMetricFamily(
            "sdxl_lora_evictions_total",
            "LoRA adapters evicted from the adapter bank (least recently used, held by no busy slot).",
            value=float(s.lora_evictions),
        )
        yield CounterMetricFamily(
            "sdxl_lora_load_seconds_total",
            "Seconds from an adapter's first use to its place written in the bank, summed over loads.",
            value=float(s.lora_load_seconds),
        )
        yield CounterMetricFamily(
            "sdxl_lora_load_failures_total",
            "Adapter loads that failed (the file changed or vanished after the request was checked).",
            value=float(s.lora_load_failures),
        )
        yield CounterMetricFamily(
            "sdxl_lora_requests_total",
            "Requests with LoRA adapters that reached a slot.",
            value=float(s.lora_requests),
        )
        yield GaugeMetricFamily(
            "sdxl_lora_resident",
            "LoRA adapters resident in the adapter bank now.",
            value=float(s.lora_resident),
        )
        if self._per_engine is not None:
            yield from _per_engine_families(self._per_engine())
        histogram = self._step_histogram() if self._step_histogram else None
        if histogram is not None:
            buckets, total = histogram
            yield HistogramMetricFamily(
                "sdxl_step_duration_seconds",
                "Device time of one batched denoising step.",
                buckets=[(_bound(b), count) for b, count in buckets],
                sum_value=total,
            )


def _per_engine_families(engines: list[EngineStats]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """With an engine per device, each engine's share under an `engine` label (its device's index among
    the server's): the unlabelled families are the group's sums and means, which hide an engine that the
    router starves or floods. A few series per device, never per request."""
    families = (
        (
            GaugeMetricFamily,
            "sdxl_engine_queue_depth",
            "Images waiting for a slot of this engine.",
            "queue_depth",
        ),
        (GaugeMetricFamily, "sdxl_engine_slots_busy", "This engine's slots holding an image.", "slots_busy"),
        (
            GaugeMetricFamily,
            "sdxl_engine_device_busy_ratio",
            "Share of recent wall time this engine's device was computing.",
            "device_busy_ratio",
        ),
        (CounterMetricFamily, "sdxl_engine_images", "Images this engine generated.", "images_total"),
    )
    for kind, name, documentation, field in families:
        family = kind(name, documentation, labels=["engine"])
        for index, stats in enumerate(engines):
            family.add_metric([str(index)], float(getattr(stats, field)))
        yield family


def _bound(upper: float) -> str:
    return "+Inf" if upper == float("inf") else repr(float(upper))
