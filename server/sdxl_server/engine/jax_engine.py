"""`JaxEngine`: the `api.Engine` the service uses, over the step loop (see step_loop.py).

Threads: the caller's (submit, cancel, stats: never wait on the device), the step loop, the device
clock's watcher, and the image workers. Requests are validated and tokenized in the caller's thread, so
that bad input fails at once and the loop only computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata

import jax
import numpy as np

from sdxl_server.engine.adapters.adapter_bank import BankLayout
from sdxl_server.engine.adapters.adapter_directory import (
    AdapterDirectory,
    adapter_infos,
    check_adapters,
    open_adapter_directory,
)
from sdxl_server.engine.adapters.adapter_loads import AdapterLoads
from sdxl_server.engine.adapters.fusing import fuse_into_model
from sdxl_server.engine.adapters.request_adapters import RequestAdapters
from sdxl_server.engine.api import (
    CancelledError,
    DeadlineUnreachableError,
    EngineError,
    EngineFatalError,
    EngineInfo,
    EngineStats,
    Failed,
    GenerationRequest,
    Limits,
    Listener,
    NotReadyError,
    Queued,
    QueueFullError,
    Resolution,
    Ticket,
)
from sdxl_server.engine.batching.admission_queue import AdmissionQueue
from sdxl_server.engine.batching.buckets import bucket_sizes, rows_per_device
from sdxl_server.engine.batching.guidance_rows import guided_steps, peak_rows
from sdxl_server.engine.batching.slot_table import SlotTable
from sdxl_server.engine.batching.tracked_request import TrackedRequest
from sdxl_server.engine.device import xla_cache as compile_cache
from sdxl_server.engine.device.attention import attention_kernel, resolve_attention
from sdxl_server.engine.device.memory_plan import fit_to_memory
from sdxl_server.engine.device.mesh import make_mesh
from sdxl_server.engine.device.program_cache import ProgramCache, architecture
from sdxl_server.engine.device.programs import ProgramSet, Rearrangement, build_programs, busy_slots
from sdxl_server.engine.device_clock import DeviceClock
from sdxl_server.engine.event_trace import EventTrace, TraceEvent, TraceKind
from sdxl_server.engine.image_workers import ImageWorkers
from sdxl_server.engine.models.loader import LoadedModel, load_model, resolve_dtype
from sdxl_server.engine.models.model_source import resolve_model
from sdxl_server.engine.request_budget import estimate_seconds
from sdxl_server.engine.sampling.book import TableBook
from sdxl_server.engine.sampling.choices import SAMPLER_SPACINGS, sampler_spacing
from sdxl_server.engine.settings import EngineConfig
from sdxl_server.engine.stats import LoopStatistics, LoopView, StatsBoard
from sdxl_server.engine.step_loop import StepLoop
from sdxl_server.request_rules import check_request

log = logging.getLogger(__name__)

_VERSIONED = ("jax", "jaxlib", "flax", "diffusers", "transformers")
_TOKENIZED_TEXTS = 1024  # texts whose token ids are kept (each 2 x 77 int32s)


class _Phase(enum.Enum):
    """The engine's lifecycle: new -> starting -> ready -> draining -> stopped, or failed from any."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class JaxEngine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        load: Callable[[EngineConfig], LoadedModel] | None = None,
    ) -> None:
        """`clock` gives the time deadlines are measured in (time.monotonic; tests pass their own).
        `load`: how start() gets the model (default `load_engine_model`; an engine group shares one)."""
        self.config = config
        self._clock = clock
        self._load = load or load_engine_model
        self._phase = _Phase.NEW
        self._failure: BaseException | None = None
        self._stats = StatsBoard(slots_total=0)
        self._queue = AdmissionQueue(config.max_queue, self._stats)
        self._trace = EventTrace(config.trace_capacity)
        self._live: set[TrackedRequest] = set()
        self._live_lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._adapters: AdapterDirectory | None = None  # --lora-dir, once the model is loaded
        # The per-request adapter banks' layouts by component (the UNet's, each text encoder's).
        self._adapter_layouts: dict[str, BankLayout] = {}
        self._adapter_loads: AdapterLoads | None = None
        self._programs: ProgramSet | None = None
        self._slots: SlotTable | None = None
        self._device: DeviceClock | None = None
        self._workers: ImageWorkers | None = None
        self._loop: StepLoop | None = None
        self._thread: threading.Thread | None = None
        # Programs start() loaded from the compilation cache directory instead of compiling them.
        self.compilation_cache_hits = 0
        self.programs_loaded = 0  # of those, programs the program cache held whole
        self.memory_probes_recorded = 0  # memory-plan probes not compiled: their figures were recorded
        self.startup_phases: dict[str, float] = {}  # seconds spent in each part of start()

    # ---- lifecycle

    def start(self) -> None:
        if self._phase is not _Phase.NEW:
            raise RuntimeError(f"engine already {self._phase.value}")
        self._phase = _Phase.STARTING
        started = time.monotonic()
        cfg = self.config
        phases = self.startup_phases
        if cfg.compilation_cache_dir:
            compile_cache.enable(cfg.compilation_cache_dir)
        hits_before = compile_cache.hits()
        with _timed(phases, "load"):
            model = self._load(cfg)
            self._adapters = open_adapter_directory(
                cfg.lora_dir, model, cfg.lora_rescan_seconds, cfg.lora_places, cfg.lora_max_rank
            )
            if self._adapters is not None:
                self._adapter_layouts = self._adapters.layouts
        mesh = make_mesh(cfg.max_devices, cfg.first_device)
        platform = mesh.devices.flat[0].platform
        saved = ProgramCache(
            cfg.compilation_cache_dir,
            architecture(model.pipeline, model.dtype_name),
            list(mesh.devices.flat),
            attention=resolve_attention(cfg.attention, platform),  # part of the programs' key
        )
        with _timed(phases, "memory_plan"):  # before the real compile: a size that cannot fit stops here
            cfg = self.config = fit_to_memory(
                cfg, model, list(mesh.devices.flat), records=saved, adapter_layouts=self._adapter_layouts
            )
        slots = cfg.slots_per_device * mesh.size
        ks = bucket_sizes(cfg.steps_per_dispatch)  # 1, 2, 4, ..., K: the largest that fits runs
        with _timed(phases, "trace_and_compile"), attention_kernel(cfg.attention, platform):
            programs = build_programs(
                model,
                mesh,
                cfg.resolutions,
                cfg.slots_per_device,
                cfg.max_steps,
                ks,
                saved,
                decode_batch=cfg.max_decode_batch,
                adapter_layouts=self._adapter_layouts or None,
                loras_per_request=cfg.max_loras_per_request,
            )
        self.compilation_cache_hits = compile_cache.hits() - hits_before + saved.hits
        self.programs_loaded = saved.hits  # whole executables, no tracing (e.g. from `sdxl-server compile`)
        self.memory_probes_recorded = saved.records_found
        with _timed(phases, "schedules"):
            schedules = TableBook(
                model.pipeline.scheduler.config,
                np.asarray(model.scheduler_state.common.alphas_cumprod),
                cfg.max_steps,
            )
        self._model, self._programs = model, programs
        # Texts seen recently skip the tokenizers (8 Python CLIP tokenizer calls per request, under a lock
        # and the GIL the step loop needs): a shared negative prompt, the empty one, a repeated prompt.
        # The ids are only read (np.stack copies them), so sharing the cached arrays is safe.
        self._tokenize = functools.lru_cache(maxsize=_TOKENIZED_TEXTS)(model.tokenize)
        self._slots = SlotTable(cfg.resolutions, mesh.size, cfg.slots_per_device)
        self._stats.set_slots_total(slots)
        self._device = DeviceClock(cfg.busy_window_seconds, on_error=self._fail)
        with _timed(phases, "warm_up"):
            self._device.seed_estimates(*self._warm_up(programs))
        self._stats.publish(
            LoopView(
                step_seconds=self._device.step_seconds_ewma,
                step_seconds_by_resolution=tuple(sorted(self._device.step_seconds_by_key.items())),
                decode_seconds=self._device.decode_seconds_ewma,
            )
        )  # the warm-up's estimates, before the step loop publishes its first view
        self._workers = ImageWorkers(
            cfg.encode_workers,
            self._fail,
            cfg.max_pending_decodes,
            stats=self._stats,
            clock=self._clock,
            png_compression=cfg.png_compression,
        )
        if self._adapter_layouts:
            self._adapter_loads = AdapterLoads(
                self._adapter_layouts,
                programs.adapter_banks,
                cfg.max_loras_per_request,
                wake=self._queue.wake,
            )
        self._loop = StepLoop(
            config=cfg,
            programs=programs,
            schedules=schedules,
            slots=self._slots,
            queue=self._queue,
            device=self._device,
            workers=self._workers,
            trace=self._trace,
            stats=self._stats,
            clock=self._clock,
            on_fatal=self._fail,
            adapters=self._adapter_loads,
        )
        self._thread = threading.Thread(target=self._loop.run, name="sdxl-step-loop", daemon=True)
        self._thread.start()
        counters = self._stats.counters
        counters.compile_seconds = programs.compile_seconds
        counters.startup_seconds = time.monotonic() - started
        counters.ready = True
        self._phase = _Phase.READY
        self._publish()
        log.info(
            "engine ready: %d slots on %d devices in %.1fs (%s); %d programs (batch buckets %s per "
            "device) built in %.1fs, %d compilation cache hits",
            slots,
            mesh.size,
            counters.startup_seconds,
            ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items()),
            programs.programs_compiled,
            "/".join(str(b) for b in programs.by_resolution[cfg.default_resolution].buckets),
            programs.compile_seconds,
            self.compilation_cache_hits,
        )

    def _warm_up(self, programs: ProgramSet) -> tuple[float, float, dict[str, float]]:
        """Runs each program twice and returns the second runs' step and decode seconds (a first run
        has one-time costs: a fresh server that trusted it would refuse work it can do in time), the
        estimates before any traffic: a full bank's step per resolution, and one image's decode."""
        params = programs.params
        text = {"text_encoder": params["text_encoder"], "text_encoder_2": params["text_encoder_2"]}
        assert self._model is not None
        ids = np.zeros((2, 2, self._model.max_tokens), np.int32)
        jax.block_until_ready(programs.encode(text, ids))

        def second_run(run: Callable[[], object]) -> float:
            jax.block_until_ready(run())
            began = time.perf_counter()
            jax.block_until_ready(run())
            return time.perf_counter() - began

        by_resolution: dict[str, float] = {}
        decode_seconds = 0.0
        for resolution, res_programs in programs.by_resolution.items():
            bank = res_programs.empty_bank
            largest = res_programs.row_buckets[-1]
            busy = busy_slots(bank.slots)  # on the empty bank a step skips its UNet on every device
            for (k, bucket), step in sorted(res_programs.steps.items()):
                seconds = second_run(functools.partial(step, params["unet"], busy)) / k
                if bucket == largest:
                    by_resolution[str(resolution)] = max(by_resolution.get(str(resolution), 0.0), seconds)
            per = rows_per_device(self.config.slots_per_device)  # slots per device block
            devices = bank.held.shape[0] // per
            for bucket, decode in sorted(res_programs.decode.items()):
                every_row = np.full(devices, bucket, np.int32)  # each device decodes the whole batch
                seconds = second_run(
                    functools.partial(decode, params["vae"], bank.held, np.int32(0), every_row)
                )
                if bucket == 1:  # one finished image at a time is the common case under staggered load
                    decode_seconds = max(decode_seconds, seconds)
            unchanged = np.tile(np.arange(per, dtype=np.int32), devices)
            nothing = np.zeros(per * devices, bool)
            plan = Rearrangement(unchanged, nothing, np.zeros_like(unchanged), nothing)
            jax.block_until_ready(res_programs.rearrange(bank, plan))
        return max(by_resolution.values()), decode_seconds, by_resolution

    def stop(self, drain_seconds: float = 0.0) -> None:
        if self._phase is _Phase.STOPPED:
            return
        if self._phase in (_Phase.NEW, _Phase.STARTING):
            self._phase = _Phase.STOPPED
            return
        if self._phase is _Phase.READY:
            self._phase = _Phase.DRAINING
            self._publish(ready=False)
        if self._loop is not None and self._thread is not None:
            self._loop.finish_and_exit()
            self._thread.join(timeout=max(drain_seconds, 0.0))
            if self._thread.is_alive():
                self._loop.abort()
                self._thread.join(timeout=60)
            self._queue.drain()  # the loop has ended: what it left queued is failed below
        if self._workers is not None:
            self._workers.shutdown(wait=True)  # images already decoding still reach their callers
        self._fail_live(NotReadyError("the engine stopped before the request finished"))
        if self._device is not None:
            self._device.stop()
        if self._adapter_loads is not None:
            self._adapter_loads.shutdown()
        if self._phase is not _Phase.FAILED:
            self._phase = _Phase.STOPPED
        self._publish(ready=False)

    # ---- the interface

    def info(self) -> EngineInfo:
        cfg = self.config
        devices = self._slots.devices if self._slots else len(jax.local_devices())
        if cfg.max_devices is not None:
            devices = min(devices, cfg.max_devices)
        platform_name = jax.default_backend()
        return EngineInfo(
            model=cfg.model,
            limits=self.limits(),
            slots=max(cfg.slots_per_device, 0) * devices,  # `auto` (negative) is decided at start
            devices=devices,
            device_kind=jax.local_devices()[0].device_kind,
            policy=cfg.policy,
            dtype=self._model.dtype_name
            if self._model
            else str(np.dtype(resolve_dtype(cfg.dtype, platform_name))),
            versions=_versions(),
            adapters=adapter_infos(
                self._adapters, self._adapter_loads.resident_files if self._adapter_loads else frozenset()
            ),
        )

    def limits(self) -> Limits:
        cfg = self.config
        return Limits(
            resolutions=cfg.resolutions,
            min_steps=cfg.min_steps,
            max_steps=cfg.max_steps,
            default_steps=cfg.default_steps,
            min_guidance_scale=cfg.min_guidance_scale,
            max_guidance_scale=cfg.max_guidance_scale,
            default_guidance_scale=cfg.default_guidance_scale,
            max_images_per_request=min(cfg.max_images_per_request, cfg.max_queue),
            max_prompt_tokens=self._model.max_tokens if self._model else 77,
            max_queue=cfg.max_queue,
            default_sampler=cfg.default_sampler,
            default_timestep_spacing=cfg.default_timestep_spacing,
            samplers=dict(SAMPLER_SPACINGS),  # engine/sampling/ tabulates each of them
            accepts_timesteps=True,  # for the samplers in sampling.choices.TAKES_TIMESTEPS
            train_timesteps=self._train_timesteps(),
            max_loras_per_request=cfg.max_loras_per_request if cfg.lora_dir else 0,
            min_lora_scale=cfg.min_lora_scale,
            max_lora_scale=cfg.max_lora_scale,
        )

    def _train_timesteps(self) -> int:
        if self._model is None:
            return 1000
        return int(self._model.pipeline.scheduler.config.num_train_timesteps)

    def submit(self, request: GenerationRequest, listener: Listener) -> Ticket:
        if self._phase is not _Phase.READY or self._model is None:
            raise NotReadyError(self._not_ready_reason())
        if not request.timestep_spacing and not request.timesteps:  # unset: the sampler's own default
            spacing = sampler_spacing(request.sampler, "", self.config.default_timestep_spacing)
            request = dataclasses.replace(request, timestep_spacing=spacing)
        check_request(request, self.limits())
        # NOT_FOUND for a name the folder does not hold; an unusable adapter (one the bank cannot apply
        # included, as GetServerInfo lists it) names its field.
        files = check_adapters(self._adapters, request.loras)
        now = self._clock()
        if request.deadline is not None:
            if request.deadline <= now:
                raise DeadlineUnreachableError("the deadline has already passed")
            rows = peak_rows(guided_steps(request.guidance_scale, request.guidance_interval, request.steps))
            needed = self.estimate_seconds(request.num_images, request.steps, request.resolution, rows)
            if needed is not None and now + needed > request.deadline:
                raise DeadlineUnreachableError(
                    f"needs about {needed:.1f}s but the deadline is in {request.deadline - now:.1f}s"
                )
        # Overload fast path: a full queue says so before the tokenizer runs (~1 ms per prompt, taken from
        # the step loop's share of the GIL); put() below re-checks under the queue's lock.
        waiting = self._stats.waiting()
        if waiting + request.num_images > self._queue.max_images:
            raise QueueFullError(
                f"admission queue full ({waiting} of {self._queue.max_images} images waiting)",
                self._retry_after(),
            )
        tokenizing = time.perf_counter()
        prompt_ids, prompt_truncated = self._tokenize(request.prompt)
        negative_ids, _ = self._tokenize(request.negative_prompt)
        unknown_words = self._model.unknown_words(request.prompt, request.negative_prompt)
        tokenize_seconds = time.perf_counter() - tokenizing
        tracked = TrackedRequest(
            request,
            listener,
            token_ids=np.stack([negative_ids, prompt_ids]),
            zero_negative=request.negative_prompt == "",
            submitted_at=now,
            on_terminal=self._forget,
        )
        tracked.budget.tokenize_seconds = tokenize_seconds
        if files:
            adapters = RequestAdapters(files, tuple(lora.scale for lora in request.loras))
            tracked.adapters = adapters
            # Adapters on the text encoders change the prompt's embeddings: they join the cache's key.
            tracked.prompt_key = dataclasses.replace(tracked.prompt_key, adapters=adapters.on_text_encoders())
        with self._live_lock:
            self._live.add(tracked)

        def queued(ahead: int) -> None:
            boundary = self._loop.boundary if self._loop else 0
            self._trace.add(TraceEvent(TraceKind.SUBMIT, boundary, request.request_id))
            tracked.deliver(
                Queued(position=ahead, prompt_truncated=prompt_truncated, unknown_words=unknown_words)
            )

        try:
            self._queue.put(tracked, self._retry_after, queued)
        except Exception:
            self._forget(tracked)
            raise
        # It failed or stopped while this request was admitted.
        if self._phase in (_Phase.FAILED, _Phase.STOPPED):
            tracked.deliver(Failed(NotReadyError(self._not_ready_reason())))
        return tracked

    def cancel(self, ticket: Ticket) -> None:
        if not isinstance(ticket, TrackedRequest) or ticket.terminal:
            return
        ticket.cancel_requested = True
        if self._phase in (_Phase.READY, _Phase.DRAINING):
            self._queue.wake()  # the step loop frees its slots at the next boundary and reports Failed
        else:
            ticket.deliver(Failed(CancelledError("cancelled by the caller")))

    def stats(self) -> EngineStats:
        return self._stats.snapshot()

    def estimate_seconds(
        self, num_images: int, steps: int, resolution: Resolution | None = None, rows_per_image: int = 2
    ) -> float | None:
        """Seconds a request would take from now, from the step loop's last published view, counted in
        UNet rows (request_budget.estimate_seconds). None before the engine has measured anything."""
        return estimate_seconds(self._stats.snapshot(), num_images, steps, rows_per_image, resolution)

    def trace(self) -> list[TraceEvent]:
        """What the step loop did, in order (admissions, step boundaries, finishes, cancellations)."""
        return self._trace.events()

    def loop_statistics(self) -> LoopStatistics:
        """The step loop's running totals (boundaries, steps, host and backpressure seconds) and what was
        compiled, for benchmarks and tests; all zero before start."""
        return self._loop.statistics() if self._loop is not None else LoopStatistics()

    def compiled_programs(self) -> ProgramSet:
        """The programs start() built, for benchmarks that time them on their own and tests that inspect
        them; the step loop runs these same objects."""
        if self._programs is None:
            raise RuntimeError("the engine has no programs before start()")
        return self._programs

    def device_busy_seconds(self, since: float | None = None) -> float:
        """Device time measured since start, or since the time.monotonic() `since` (within the busy
        window), for benchmarks: the busy ratio over any interval."""
        if self._device is None:
            return 0.0
        return self._device.busy_seconds_total if since is None else self._device.busy_seconds_since(since)

    def step_histogram(self) -> tuple[list[tuple[float, int]], float] | None:
        """Device seconds per batched step (cumulative buckets ending with +inf, and their sum), for the
        metric sdxl_step_duration_seconds; None before start."""
        return self._device.step_histogram() if self._device else None

    # ---- internals

    def _retry_after(self) -> float:
        return self._stats.snapshot().retry_after_seconds

    def _not_ready_reason(self) -> str:
        if self._phase is _Phase.FAILED:
            return f"the engine failed and will not recover: {self._failure}"
        return {_Phase.NEW: "the engine is not started", _Phase.STARTING: "the engine is warming up"}.get(
            self._phase, f"the engine is {self._phase.value}"
        )

    def _forget(self, request: TrackedRequest) -> None:
        with self._live_lock:
            self._live.discard(request)

    def _fail_live(self, error: EngineError) -> None:
        # Every live request, queued ones included, ends here; the queue's contents stay the step loop's.
        with self._live_lock:
            live = list(self._live)
        for request in live:
            request.deliver(Failed(error))

    def _fail(self, error: BaseException) -> None:
        """A fatal error (device or step loop): unhealthy from now on, every waiting caller is told."""
        if self._phase is _Phase.FAILED:
            return
        log.error("engine failed: %s", error, exc_info=error)
        self._failure = error
        self._phase = _Phase.FAILED
        self._stats.counters.healthy = False
        if self._loop is not None:
            self._loop.abort()
        self._fail_live(EngineFatalError(f"device or step loop failure: {type(error).__name__}"))
        self._publish(ready=False)

    def _publish(self, ready: bool | None = None) -> None:
        """Lifecycle flags only: everything else in the stats is the step loop's to publish."""
        if ready is not None:
            self._stats.counters.ready = ready


def load_engine_model(config: EngineConfig) -> LoadedModel:
    """The model as the engine runs it: loaded, its fused LoRA adapters merged (before anything is placed
    on a device). Only read from then on, so engines of one process may share it."""
    model = load_model(resolve_model(config.model, config.tiny_model_dir), config.dtype, config.model_configs)
    fuse_into_model(model, config.fuse_lora)
    return model


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    begun = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - begun


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
