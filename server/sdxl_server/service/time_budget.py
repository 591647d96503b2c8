"""A request's time budget: where its time went, from arrival at a front door to its response.

The engine reports its phases in `Finished` (tokenizing, text encoding, queue wait, denoising, decode,
copy to host, image encoding; engine/request_budget.py); the service adds the two it spends itself:
``admission`` (the serving gate, validation, the deadline and queue checks and the hop to the thread that
submits; tokenizing excluded) and ``response`` (from the engine's last event to the end of the request:
the bridge into the event loop and building the response). The same figures go to the response's
Timings (both doors), the ``request done`` log line and ``sdxl_request_phase_seconds{phase}``.
"""

from __future__ import annotations

import dataclasses

from sdxl_client._proto.sdxl.v1 import sdxl_pb2

from sdxl_server.engine import api

# Every phase, in the order a request meets them; the metric's `phase` label takes only these values.
PHASES = (
    "admission",
    "tokenize",
    "text_encode",
    "queue",
    "denoise",
    "decode",
    "to_host",
    "image_encode",
    "response",
)


@dataclasses.dataclass(frozen=True)
class TimeBudget:
    seconds: dict[str, float]  # by phase (PHASES)
    total_seconds: float  # arrival to the end of the request, as the service saw it
    engine_total_seconds: float  # Finished.total_seconds: the engine's submit to its last image

    @classmethod
    def of(cls, arrived: float, submitted: float, ended: float, finished: api.Finished) -> TimeBudget:
        """`arrived`: the door handed the request over; `submitted`: engine.submit returned (it tokenizes
        first); `ended`: the request's last event was handled (all time.monotonic())."""
        admission = max(0.0, (submitted - arrived) - finished.tokenize_seconds)
        seconds = {
            "admission": admission,
            "tokenize": finished.tokenize_seconds,
            "text_encode": finished.text_encode_seconds,
            "queue": finished.queue_seconds,
            "denoise": finished.denoise_seconds,
            "decode": finished.decode_seconds,
            "to_host": finished.to_host_seconds,
            "image_encode": finished.image_encode_seconds,
            # What neither the admission nor the engine's total (which starts before tokenizing) covers:
            # from the engine's Finished to the end of the request.
            "response": max(0.0, (ended - arrived) - admission - finished.total_seconds),
        }
        return cls(seconds, ended - arrived, finished.total_seconds)

    def timings(self) -> sdxl_pb2.Timings:
        s = self.seconds
        return sdxl_pb2.Timings(
            queue_seconds=s["queue"],
            denoise_seconds=s["denoise"],
            total_seconds=self.engine_total_seconds,
            admission_seconds=s["admission"],
            tokenize_seconds=s["tokenize"],
            text_encode_seconds=s["text_encode"],
            decode_seconds=s["decode"],
            to_host_seconds=s["to_host"],
            image_encode_seconds=s["image_encode"],
        )

    def log_fields(self) -> dict[str, float]:
        """For the ``request done`` line: ``<phase>_s`` rounded to 0.1 ms."""
        return {f"{phase}_s": round(seconds, 4) for phase, seconds in self.seconds.items()}


def timings_json(timings: sdxl_pb2.Timings) -> dict[str, float]:
    """The OpenAI door's ``timings`` extension: the same fields as gRPC's Timings, by the same names."""
    return {field.name: getattr(timings, field.name) for field in sdxl_pb2.Timings.DESCRIPTOR.fields}
