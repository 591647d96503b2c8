"""`--engine-per-device` through a real server on 2 simulated CPU devices: GetServerInfo and the metrics
describe the group as one engine, and a request of several images, split over the two engines, comes
back as one response whose images are the ones their seeds draw."""

from __future__ import annotations

import numpy as np
import pytest
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.grpc_details import decode, image_stub
from sdxl_test_support.metrics_page import metric_samples, sample
from sdxl_test_support.xla_flags import xla_flags

# The programs of tests/unit/engine/test_engine_group.py's engines (one slot, 64x64, 8 steps, one step per
# dispatch): a run that has compiled those loads them here.
ARGS = (
    "--engine-per-device", "--slots-per-device", "1", "--resolutions", "64x64", "--max-steps", "8",
    "--steps-per-dispatch", "1",
)  # fmt: skip


@pytest.fixture(scope="module")
def server(module_server_factory):
    return module_server_factory(*ARGS, env={"XLA_FLAGS": xla_flags(2)})


def generate(stub, request_id: str, seed: int, num_images: int) -> sdxl_pb2.GenerateResponse:
    request = sdxl_pb2.GenerateRequest(
        prompt="a red circle", seed=seed, num_images=num_images, steps=3, guidance_scale=6.0,
        request_id=request_id,
    )  # fmt: skip
    return stub.Generate(request, timeout=120)


@pytest.mark.slow
def test_a_split_request_is_served_as_one_and_draws_each_seeds_image(server):
    with server.channel() as channel:
        stub = image_stub(channel)
        info = stub.GetServerInfo(sdxl_pb2.GetServerInfoRequest(), timeout=30)
        assert (info.devices, info.engines, info.slots, info.policy) == (2, 2, 2, "continuous")
        whole = generate(stub, "split-3", seed=7, num_images=3)
        alone = generate(stub, "alone-8", seed=8, num_images=1)
    assert [(image.index, image.seed) for image in whole.images] == [(0, 7), (1, 8), (2, 9)]
    # Image 1 of the split request (seed 8) is the image a request with seed 8 draws, whichever engine
    # ran either of them.
    assert np.array_equal(np.asarray(decode(whole.images[1])), np.asarray(decode(alone.images[0])))
    assert not np.array_equal(np.asarray(decode(whole.images[0])), np.asarray(decode(whole.images[1])))
    assert whole.timings.denoise_seconds > 0 and whole.timings.total_seconds >= whole.timings.denoise_seconds
    samples = metric_samples(server.scrape_metrics())
    assert sample(samples, "sdxl_slots_total") == 2
    assert sample(samples, "sdxl_images_total") >= 4
    # Each engine's share under its device's index: the split request's 3 images ran on both engines,
    # and the shares add up to the group's count.
    per_engine = [sample(samples, "sdxl_engine_images_total", engine=str(i)) for i in range(2)]
    assert min(per_engine) >= 1 and sum(per_engine) == sample(samples, "sdxl_images_total")
    assert ("sdxl_engine_device_busy_ratio", frozenset({("engine", "1")})) in samples
    # Each engine logs its own start; the group logs that all are ready.
    assert len([e for e in server.log_entries() if str(e.get("message", "")).startswith("engine ready")]) == 2
