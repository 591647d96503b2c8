"""The batching policy, decided as data: boundary plans over plain requests, applied to fake programs.

No JAX here. `FakePrograms` stands in for the compiled programs: it keeps, per bank, which image sits in
each slot with its steps left and which image sits in each held row, applies a plan the way the step
loop does (the same order, the same indices), and checks what the real programs silently assume: at every
step of a dispatch the UNet rows of each block's busy slots (two for a guided step, one for an unguided
one, packed in slot order) fit in the dispatch's row bucket, and no slot runs past its last step; a
rearrangement
stashes only finished images into empty held rows; a decode's rows hold exactly the images it names.
"""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from sdxl_server.engine.api import DeadlineUnreachableError, GenerationRequest, Resolution
from sdxl_server.engine.batching.admission_queue import AdmissionQueue
from sdxl_server.engine.batching.boundary_plan import (
    Admission,
    BoundaryPlan,
    BoundaryPlanner,
    Decode,
    Dispatch,
    ProgramSizes,
    Repacking,
    steps_per_dispatch,
)
from sdxl_server.engine.batching.buckets import bucket_sizes, row_bucket_sizes
from sdxl_server.engine.batching.decode_hold import HeldImage
from sdxl_server.engine.batching.slot_table import SlotTable
from sdxl_server.engine.batching.tracked_request import TrackedRequest, WorkItem
from sdxl_server.engine.stats import StatsBoard

SQUARE = Resolution(64, 64)
WIDE = Resolution(128, 64)


def test_neither_the_planning_module_nor_these_tests_import_jax():
    load_this_file = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('policy_tests', {__file__!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "import sdxl_server.engine.batching.boundary_plan; "
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))"
    )
    subprocess.run([sys.executable, "-c", load_this_file], check=True)


def tracked(
    request_id: str,
    *,
    steps: int = 4,
    num_images: int = 1,
    resolution: Resolution = SQUARE,
    deadline: float | None = None,
    guidance_scale: float = 7.5,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> TrackedRequest:
    request = GenerationRequest(
        request_id=request_id,
        prompt="a cat",
        negative_prompt="",
        seed=0,
        num_images=num_images,
        steps=steps,
        guidance_scale=guidance_scale,
        resolution=resolution,
        deadline=deadline,
        guidance_interval=guidance_interval,
    )
    return TrackedRequest(request, lambda event: None, np.zeros((2, 2, 4), np.int32), True, submitted_at=0.0)


class FakeBank:
    def __init__(self, total: int) -> None:
        self.slots: list[list | None] = [None] * total  # [image, steps left] per slot
        self.held: list[WorkItem | None] = [None] * total


class FakePrograms:
    def __init__(self, resolutions: tuple[Resolution, ...], devices: int, per_device: int) -> None:
        self.per = per_device
        self.banks = {res: FakeBank(devices * per_device) for res in resolutions}
        self.decoded: list[WorkItem] = []  # in decode order
        self.dispatches: list[Dispatch] = []
        self.row_steps = 0  # compiled UNet rows run, summed over dispatches and steps (one device's)

    def apply(self, plan: BoundaryPlan, planner: BoundaryPlanner) -> None:
        for compaction in plan.compactions:
            for decode in compaction.room:
                self.decode(decode)
            if compaction.room:
                assert not any(self.banks[compaction.resolution].held), "the room's decodes empty the bank"
            if compaction.repacking is not None:
                self.rearrange(self.banks[compaction.resolution], compaction.repacking)
        for admission in plan.admissions:
            self.insert(admission)
        for decode in plan.decodes:
            self.decode(decode)
        for decode in plan.decodes:
            assert not any(self.banks[decode.resolution].held), "a bank's decodes leave none of it held"
        if plan.dispatch is not None:
            self.step(plan.dispatch)
            planner.record_dispatch(plan.dispatch)

    def rearrange(self, bank: FakeBank, r: Repacking) -> None:
        per, old = self.per, list(bank.slots)
        for position, source in enumerate(r.held_source):
            if r.held_take[position]:
                base = position - position % per
                stashed = old[base + source]
                assert stashed is not None and stashed[1] == 0, "only a finished image is stashed"
                assert bank.held[position] is None, "a held image was overwritten before its decode"
                bank.held[position] = stashed[0]
        for position, source in enumerate(r.order):
            base = position - position % per
            bank.slots[position] = old[base + source] if r.live[position] else None

    def insert(self, admission: Admission) -> None:
        bank = self.banks[admission.resolution]
        assert admission.device == admission.slot // self.per
        assert bank.slots[admission.slot] is None, "admitted into a busy slot"
        bank.slots[admission.slot] = [admission.item, admission.item.steps]

    def decode(self, decode: Decode) -> None:
        bank = self.banks[decode.resolution]
        assert decode.first >= 0 and decode.first + decode.bucket <= self.per, "a decode outside the block"
        counts = decode.counts()  # the rows each device's VAE decodes (0: it skips the pass)
        assert counts.shape == (len(self.banks[decode.resolution].slots) // self.per,)
        assert all(0 <= count <= decode.bucket for count in counts), counts
        for device, row, item in decode.images():
            assert 0 <= row < counts[device], "a delivered image its device does not decode"
            assert bank.held[device * self.per + decode.first + row] is item
            bank.held[device * self.per + decode.first + row] = None
            self.decoded.append(item)

    def step(self, dispatch: Dispatch) -> None:
        self.dispatches.append(dispatch)
        buckets = dict(dispatch.buckets)
        for resolution, bank in self.banks.items():
            for offset in range(dispatch.steps):  # the device lays the rows out again at every step
                for base in range(0, len(bank.slots), self.per):
                    rows = sum(
                        entry[0].rows_at(entry[0].steps - entry[1] + offset)
                        for entry in bank.slots[base : base + self.per]
                        if entry is not None and entry[1] > offset
                    )
                    assert rows <= buckets.get(resolution, 0), "UNet rows past the compiled row batch"
            for entry in bank.slots:
                if entry is None or entry[1] == 0:
                    continue
                assert dispatch.steps <= entry[1], "a slot ran past its last step"
                entry[1] -= dispatch.steps
        self.row_steps += dispatch.steps * sum(bucket for _, bucket in dispatch.buckets)


class Server:
    """A planner over a real slot table and queue, its plans applied to fake programs."""

    def __init__(
        self,
        *,
        devices: int = 1,
        per_device: int = 2,
        policy: str = "continuous",
        hold_steps: int = 0,
        most_steps_per_dispatch: int = 1,
        resolutions: tuple[Resolution, ...] = (SQUARE,),
        decode_batch: int | None = None,
    ) -> None:
        board = StatsBoard(slots_total=devices * per_device)
        self.queue = AdmissionQueue(max_images=1000, board=board)
        self.slots = SlotTable(resolutions, devices, per_device)  # 2 x per_device rows (and slots) a device
        sizes = ProgramSizes(
            buckets={res: bucket_sizes(min(decode_batch or per_device, per_device)) for res in resolutions},
            steps_per_dispatch=bucket_sizes(most_steps_per_dispatch),
            row_buckets={res: row_bucket_sizes(per_device) for res in resolutions},
        )
        self.planner = BoundaryPlanner(
            policy=policy, decode_hold_steps=hold_steps, sizes=sizes, slots=self.slots, queue=self.queue
        )
        self.programs = FakePrograms(resolutions, devices, self.slots.per_device)
        self.plans: list[BoundaryPlan] = []

    def submit(self, *requests: TrackedRequest) -> None:
        for request in requests:
            self.queue.put(request, lambda: 1.0, lambda ahead: None)

    def boundary(self, now: float = 0.0) -> BoundaryPlan:
        self.queue.receive()
        plan = self.planner.plan(now)
        self.programs.apply(plan, self.planner)
        self.plans.append(plan)
        for occupant in self.slots.occupants():  # the host's mirror matches the device
            entry = self.programs.banks[occupant.resolution].slots[occupant.slot]
            assert entry is not None and entry[0] is occupant.item and entry[1] == occupant.remaining
        return plan

    def run_until_idle(self, limit: int = 1000) -> None:
        for _ in range(limit):
            plan = self.boundary()
            if plan.dispatch is None and not self.slots.busy and not len(self.queue):
                return
        raise AssertionError("the server did not become idle")


def admitted(plan: BoundaryPlan) -> list[str]:
    return [a.item.request.request_id for a in plan.admissions]


def test_continuous_admission_fills_a_free_slot_at_the_next_boundary():
    server = Server(per_device=2)
    server.submit(tracked("long", steps=6))
    assert admitted(server.boundary()) == ["long"]
    server.submit(tracked("late", steps=2))
    assert admitted(server.boundary()) == ["late"]  # while "long" still runs
    assert server.slots.busy == 2 and server.slots.images == 2  # two guided images: 4 rows of 4


def test_static_admission_waits_for_the_whole_batch_to_finish():
    server = Server(per_device=2, policy="static")
    server.submit(tracked("long", steps=3))
    assert admitted(server.boundary()) == ["long"]
    server.submit(tracked("late", steps=2))
    assert [admitted(server.boundary()) for _ in range(2)] == [[], []]  # "long" runs its steps 2 and 3
    assert admitted(server.boundary()) == ["late"]  # the slots are all free again


def test_a_static_batch_is_taken_in_queue_order_without_backfilling():
    """The static policy stands for the recipe's batches: it takes the queue's head images while their
    rows fit, and an unguided image behind a guided one that does not fit waits for the next batch."""
    server = Server(per_device=2, policy="static")  # 4 rows
    server.submit(tracked("a", steps=3), tracked("u", steps=3, guidance_scale=0.0))
    server.submit(tracked("b", steps=3), tracked("short", steps=1, guidance_scale=0.0))
    assert admitted(server.boundary()) == ["a", "u"]  # "b" needs 2 rows of the 1 left; "short" waits


def test_a_boundary_admits_no_more_guided_images_than_their_rows_fit_in_queue_order():
    server = Server(per_device=2)
    server.submit(tracked("a", num_images=2), tracked("b"))
    plan = server.boundary()
    assert [(a.item.request.request_id, a.item.index) for a in plan.admissions] == [("a", 0), ("a", 1)]
    assert len(server.queue) == 1 and plan.left_queue == 2


def test_busy_slots_are_packed_at_the_front_of_the_block_after_one_finishes():
    server = Server(per_device=4)  # compiled row batches 1, 2, 4, 7, 8
    server.submit(tracked("short", steps=1), tracked("b", steps=5), tracked("c", steps=5))
    first = server.boundary()
    assert [a.slot for a in first.admissions] == [0, 1, 2]
    assert first.dispatch is not None and first.dispatch.buckets == ((SQUARE, 7),)  # 3 guided: 6 rows
    second = server.boundary()  # "short" finished: its latents go to the held buffer, b and c move up
    (compaction,) = second.compactions
    assert compaction.repacking is not None
    assert list(compaction.repacking.order) == [1, 2, 0, 3, 4, 5, 6, 7]  # 8 slots: rows' worth
    assert list(compaction.repacking.live) == [True, True] + [False] * 6
    assert compaction.repacking.held_counts == [1]
    assert [o.slot for o in server.slots.occupants()] == [0, 1]
    assert second.dispatch is not None and second.dispatch.buckets == ((SQUARE, 4),)  # 2 guided
    server.submit(tracked("d", steps=2))
    third = server.boundary()
    assert [a.slot for a in third.admissions] == [2]  # at the end of the packed block


def test_an_image_goes_to_the_device_with_the_least_work_left():
    """Devices step together: the one with less work left would idle through the others' rest, so an
    image goes where the fewest row-steps remain, not merely the fewest rows now."""
    server = Server(devices=2, per_device=2)
    server.submit(tracked("a", steps=6), tracked("b", steps=1), tracked("c", steps=2))
    assert [a.device for a in server.boundary().admissions] == [0, 1, 1]  # "c": 2 row-steps left, not 12
    server.boundary()  # "b" finished on device 1; each device runs one guided image now
    server.submit(tracked("d", steps=5))
    assert [a.device for a in server.boundary().admissions] == [1]  # 2 row-steps left there, 10 on 0


def test_placement_counts_the_load_of_every_bank_on_a_device():
    server = Server(devices=2, per_device=2, resolutions=(SQUARE, WIDE))
    server.submit(tracked("wide", steps=5, resolution=WIDE), tracked("square", steps=5))
    placed = {a.item.request.request_id: a.device for a in server.boundary().admissions}
    assert placed == {"wide": 0, "square": 1}  # both banks' blocks were empty: device 1 had less to do
    plan = server.plans[-1]
    assert plan.dispatch is not None and plan.dispatch.buckets == ((SQUARE, 2), (WIDE, 2))


def hold_scenario(queued_behind: int) -> list[BoundaryPlan]:
    """2 devices x 1 slot, decode hold 4 steps: "first" (2 steps) on device 0 and "second" (3 steps) on
    device 1; "first" finishes at dispatch 2, its latents are held at boundary 3, when a queued image
    takes its slot and `queued_behind` - 1 images still wait."""
    server = Server(devices=2, per_device=1, hold_steps=4)
    server.submit(tracked("first", steps=2), tracked("second", steps=3))
    server.submit(*(tracked(f"queued-{i}", steps=8) for i in range(queued_behind)))
    for _ in range(4):
        server.boundary()
    return server.plans


def decoded_counts(plans: list[BoundaryPlan]) -> list[int]:
    return [len(d.images()) for plan in plans for d in plan.decodes]


def test_with_a_deep_backlog_a_lone_finished_image_waits_to_be_decoded_with_another_devices():
    plans = hold_scenario(queued_behind=3)  # 2 still wait after boundary 3: as many as slots
    assert plans[2].decodes == ()  # "second" (on the other device) finishes within the budget
    (decode,) = plans[3].decodes
    assert decode.bucket == 1 and len(decode.images()) == 2  # one image on each device, one program
    assert list(decode.counts()) == [1, 1]
    assert decoded_counts(plans) == [2]


def test_with_a_shallow_backlog_a_finished_image_is_decoded_at_once():
    plans = hold_scenario(queued_behind=1)  # nothing waits after boundary 3: the hold would be latency
    (decode,) = plans[2].decodes
    assert [item.request.request_id for _, _, item in decode.images()] == ["first"]
    assert list(decode.counts()) == [1, 0]  # the other device, holding nothing, skips the VAE
    assert decoded_counts(plans) == [1, 1]


def test_a_decode_counts_the_vae_rows_each_device_runs():
    """What the engine's sdxl_decode_rows_total adds: each device's smallest decode batch that holds its
    rows (as programs.py's `decode` picks), none for a device that holds nothing."""

    def held(*rows: int) -> list[HeldImage]:
        return [HeldImage(item=WorkItem(tracked(f"row-{r}"), 0), row=r, since_step=0) for r in rows]

    decode = Decode(SQUARE, bucket=4, held=[held(0, 1, 2), held(), held(1), held(0)], first=0)
    assert list(decode.counts()) == [3, 0, 2, 1]
    assert decode.rows_run((1, 2, 4)) == 4 + 0 + 2 + 1  # 3 rows run in a batch of 4


def test_a_dispatch_runs_the_most_steps_no_slot_overshoots():
    server = Server(per_device=2, most_steps_per_dispatch=4)  # 1, 2 or 4 steps per dispatch
    server.submit(tracked("seven", steps=7))
    server.run_until_idle()
    assert [d.steps for d in server.programs.dispatches] == [4, 2, 1]
    server.submit(tracked("a", steps=3), tracked("b", steps=6))
    server.run_until_idle()
    # min steps left: 3 -> 2 (a: 1 left) -> 1 (a done; b: 3 left) -> 2 -> 1
    assert [d.steps for d in server.programs.dispatches[3:]] == [2, 1, 2, 1]


def test_a_dispatch_does_not_outlast_the_steps_until_a_waiting_image_could_enter():
    sizes = bucket_sizes(4)
    assert steps_per_dispatch(sizes, [7, 9], room_in=0) == 1  # it could enter now (not admissible yet)
    assert steps_per_dispatch(sizes, [7, 9], room_in=2) == 2  # its rows free in 2 steps
    assert steps_per_dispatch(sizes, [7, 9], room_in=7) == 4  # not before an occupant ends
    assert steps_per_dispatch(sizes, [7, 3], room_in=None) == 2  # nobody waits


def test_a_full_server_still_runs_k_steps_while_images_wait():
    server = Server(per_device=1, most_steps_per_dispatch=4)
    server.submit(tracked("running", steps=8), tracked("waiting", steps=8))
    plan = server.boundary()
    assert plan.dispatch is not None and plan.dispatch.steps == 4 and len(server.queue) == 1


def test_cancelled_and_expired_images_leave_their_slots_and_the_queue_and_each_request_fails_once():
    server = Server(per_device=2)
    cancelled = tracked("cancelled", num_images=2, steps=9)
    late = tracked("late", steps=9, deadline=5.0)
    waiting = tracked("waiting", steps=9, deadline=5.0)
    server.submit(cancelled, late, waiting)
    server.boundary(now=0.0)  # "cancelled" takes both slots; the others wait
    cancelled.cancel_requested = True
    plan = server.boundary(now=1.0)
    assert [(r.item.request.request_id, r.slot) for r in plan.retirements] == [
        ("cancelled", 0),
        ("cancelled", 1),
    ]
    assert admitted(plan) == ["late", "waiting"]
    assert [request.request_id for request, _ in plan.failures()] == ["cancelled"]
    plan = server.boundary(now=5.0)
    assert sorted(r.item.request.request_id for r in plan.retirements) == ["late", "waiting"]
    assert [str(error) for _, error in plan.failures()] == ["deadline passed after 1 of 9 steps"] * 2
    assert all(isinstance(error, DeadlineUnreachableError) for _, error in plan.failures())
    assert server.slots.busy == 0 and plan.dispatch is None


def test_a_queued_image_whose_deadline_passed_never_reaches_a_slot():
    server = Server(per_device=1)
    server.submit(tracked("running", steps=3), tracked("late", steps=3, deadline=2.0))
    server.boundary(now=0.0)
    plan = server.boundary(now=2.0)
    assert [(r.item.request.request_id, r.slot) for r in plan.retirements] == [("late", -1)]
    assert plan.left_queue == 1 and len(server.queue) == 0


@pytest.mark.parametrize(
    ("policy", "decode_batch"), [("continuous", None), ("static", None), ("continuous", 2)]
)
def test_every_image_of_a_mixed_workload_is_decoded_exactly_once(policy, decode_batch):
    """Two devices, two banks, steps per dispatch up to 4, a decode hold, arrivals between boundaries,
    decodes of every slot or of at most 2 images a call: the fake programs check every plan."""
    rng = random.Random(7)
    server = Server(
        devices=2,
        per_device=3,
        policy=policy,
        hold_steps=3,
        most_steps_per_dispatch=4,
        resolutions=(SQUARE, WIDE),
        decode_batch=decode_batch,
    )
    images = 0
    for i in range(40):
        count = rng.choice([1, 1, 2])
        images += count
        resolution = rng.choice([SQUARE, WIDE])
        server.submit(tracked(f"r{i}", steps=rng.randint(1, 9), num_images=count, resolution=resolution))
        for _ in range(rng.randint(0, 2)):
            server.boundary()
    server.run_until_idle()
    decoded = [(item.request.request_id, item.index) for item in server.programs.decoded]
    assert len(decoded) == images and len(set(decoded)) == images


def test_held_images_beyond_the_decode_batch_are_decoded_in_several_calls_within_the_block():
    """7 slots, decodes of at most 4 images: 7 finished images take a call of 4 from row 0, then one of
    4 that starts at row 3 (kept within the block) and delivers rows 4 to 6 only."""
    server = Server(per_device=7, decode_batch=4, hold_steps=0)  # 14 rows: 7 guided, or 14 unguided
    server.submit(*(tracked(f"r{i}", steps=1) for i in range(7)))
    server.boundary()  # admits all 7 and runs their one step
    plan = server.boundary()  # they finished: stashed (the held buffer fits 14), then decoded
    calls = [(d.first, d.bucket, len(d.images())) for d in plan.decodes]
    assert calls == [(0, 4, 4), (4, 4, 3)]
    assert sorted(item.request.request_id for item in server.programs.decoded) == [f"r{i}" for i in range(7)]


def test_a_last_decode_call_that_would_pass_the_blocks_end_starts_early():
    """20 unguided images fill a block of 10 slots per device (20 rows), decodes of at most 7 (buckets
    1, 2, 4, 7): calls of 7 from rows 0 and 7, then the last 6 in a call of 7 that starts at row 13."""
    server = Server(per_device=10, decode_batch=7, hold_steps=0)
    server.submit(*(tracked(f"r{i}", steps=1, guidance_scale=0.0) for i in range(20)))
    server.boundary()
    plan = server.boundary()
    assert [(d.first, d.bucket, len(d.images())) for d in plan.decodes] == [(0, 7, 7), (7, 7, 7), (13, 7, 6)]
    assert [list(d.counts()) for d in plan.decodes] == [[7], [7], [7]]  # row 13 again, then 14-19
    assert len(server.programs.decoded) == 20


# ---- rows, not slots


def test_one_unguided_image_runs_the_smallest_row_batch():
    server = Server(per_device=2)  # row batches 1, 2, 4
    server.submit(tracked("unguided", steps=2, guidance_scale=1.0))
    plan = server.boundary()
    assert plan.dispatch is not None and plan.dispatch.buckets == ((SQUARE, 1),)
    assert plan.dispatch.rows_busy == 1


def test_guidance_zero_and_one_take_one_row_and_above_one_takes_two():
    for scale, rows in ((0.0, 1), (1.0, 1), (1.01, 2), (7.5, 2)):
        server = Server(per_device=1)
        server.submit(tracked(f"g{scale}", steps=3, guidance_scale=scale))
        plan = server.boundary()
        assert plan.dispatch is not None and plan.dispatch.rows_busy == rows, scale


def test_a_slot_drops_to_one_row_when_its_guidance_interval_ends():
    server = Server(per_device=2, most_steps_per_dispatch=1)
    server.submit(tracked("interval", steps=10, guidance_interval=(0.0, 0.4)), tracked("plain", steps=10))
    server.run_until_idle()
    rows = [d.rows_busy for d in server.programs.dispatches]
    assert rows == [4] * 4 + [3] * 6  # steps 0..3 guided (0.4 x 10), then one row for "interval"
    buckets = [bucket for d in server.programs.dispatches for _, bucket in d.buckets]
    assert buckets == [4] * 4 + [3] * 6  # 3 rows run the 2P - 1 bucket: no padded row


def test_a_slot_whose_guidance_starts_later_grows_to_two_rows():
    server = Server(per_device=2, most_steps_per_dispatch=1)
    server.submit(tracked("late-guidance", steps=4, guidance_interval=(0.5, 1.0)))
    server.run_until_idle()
    assert [d.rows_busy for d in server.programs.dispatches] == [1, 1, 2, 2]
    assert [d.buckets[0][1] for d in server.programs.dispatches] == [1, 1, 2, 2]


def test_a_multi_step_dispatch_covers_the_most_rows_of_any_of_its_steps():
    server = Server(per_device=2, most_steps_per_dispatch=4)
    server.submit(tracked("late-guidance", steps=8, guidance_interval=(0.25, 1.0)))
    plan = server.boundary()
    assert plan.dispatch is not None and plan.dispatch.steps == 4
    assert plan.dispatch.rows_busy == 1 and plan.dispatch.buckets == ((SQUARE, 2),)  # step 2 is guided


def test_unguided_images_cost_half_the_rows_of_guided_ones():
    def row_steps(scale: float) -> int:
        server = Server(per_device=4, most_steps_per_dispatch=2)
        server.submit(*(tracked(f"r{i}", steps=6, guidance_scale=scale) for i in range(8)))
        server.run_until_idle()
        return server.programs.row_steps

    assert row_steps(1.0) * 2 == row_steps(7.5)


def test_admission_places_an_image_on_the_device_with_the_fewest_rows():
    server = Server(devices=2, per_device=2)
    server.submit(tracked("guided", steps=9), tracked("unguided-a", steps=9, guidance_scale=0.0))
    assert [a.device for a in server.boundary().admissions] == [0, 1]
    server.submit(tracked("unguided-b", steps=9, guidance_scale=0.0))
    # Both blocks hold one image; device 1's runs one row and device 0's two.
    assert [a.device for a in server.boundary().admissions] == [1]


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_a_mixed_guidance_workload_fits_its_row_batches_at_every_step(policy):
    rng = random.Random(11)
    server = Server(
        devices=2,
        per_device=3,
        policy=policy,
        hold_steps=2,
        most_steps_per_dispatch=4,
        resolutions=(SQUARE, WIDE),
    )
    images = 0
    for i in range(40):
        start = rng.choice([0.0, 0.0, 0.3])
        end = rng.choice([1.0, 0.4, 0.7])
        server.submit(
            tracked(
                f"m{i}",
                steps=rng.randint(1, 12),
                guidance_scale=rng.choice([0.0, 1.0, 5.0]),
                guidance_interval=(start, end),
                resolution=rng.choice([SQUARE, WIDE]),
            )
        )
        images += 1
        for _ in range(rng.randint(0, 2)):
            server.boundary()
    server.run_until_idle()
    assert len(server.programs.decoded) == images


# ---- rows as the capacity: a device holds 2P rows' worth of images (P = slots per device)


def ids(plans: list[BoundaryPlan]) -> list[str]:
    return [request_id for plan in plans for request_id in admitted(plan)]


def test_twice_as_many_unguided_images_share_one_step_as_guided_ones():
    server = Server(per_device=2)  # 4 rows a device: 2 guided images or 4 unguided ones
    server.submit(*(tracked(f"u{i}", steps=3, guidance_scale=0.0) for i in range(5)))
    plan = server.boundary()
    assert admitted(plan) == ["u0", "u1", "u2", "u3"] and len(server.queue) == 1
    assert plan.dispatch is not None and plan.dispatch.slots_busy == 4
    assert plan.dispatch.rows_busy == 4 and plan.dispatch.buckets == ((SQUARE, 4),)  # one step of 2P rows
    assert server.slots.busy == server.slots.capacity == 2  # in guided images: 4 rows taken of 4


def test_a_guided_image_waits_for_its_rows_and_one_behind_it_passes_only_if_that_cannot_delay_it():
    """Backfilling: the guided image's two rows are free after 3 steps (when "u0" ends). "longer" would
    still hold its row then and push the guided image back a step: it waits. "shorter" ends with "u0":
    it runs in the row that would otherwise be idle, and the guided image enters as soon as before."""
    server = Server(per_device=2)  # 4 rows
    server.submit(tracked("u0", steps=3, guidance_scale=0.0))
    server.submit(*(tracked(f"u{i}", steps=10, guidance_scale=0.0) for i in (1, 2)))  # 3 rows of 4
    server.submit(tracked("guided", steps=3), tracked("longer", steps=4, guidance_scale=0.0))
    server.submit(tracked("shorter", steps=3, guidance_scale=0.0))
    assert admitted(server.boundary()) == ["u0", "u1", "u2", "shorter"]
    assert [admitted(server.boundary()) for _ in range(2)] == [[], []]  # steps 2 and 3
    assert admitted(server.boundary()) == ["guided"]  # then "longer", once a row frees


def test_a_mix_of_few_step_unguided_and_guided_images_fills_the_rows_a_waiting_guided_one_cannot_use():
    """The rows benchmark's mix (2 devices x 4 rows, K = 4): 4-step unguided images alternating with
    20-step guided ones. Without backfilling the 4-step images behind a waiting guided one left rows
    empty (52 steps; the rows' bound is 44: 4 x 40 + 4 x 4 row-steps a device over 4 rows)."""
    server = Server(devices=2, per_device=2, most_steps_per_dispatch=4, hold_steps=4)
    for i in range(16):
        few = i % 2 == 0
        server.submit(tracked(f"r{i}", steps=4 if few else 20, guidance_scale=0.0 if few else 7.5))
    server.run_until_idle()
    assert sum(d.steps for d in server.programs.dispatches) == 48
    assert len(server.programs.decoded) == 16


def test_images_of_a_shape_refused_behind_the_head_are_not_offered_again_until_one_enters():
    """A long queue of one shape behind a waiting head costs one placement check, not one per image."""
    board = StatsBoard(slots_total=2)
    queue = AdmissionQueue(max_images=100, board=board)
    queue.put(tracked("head", steps=20), lambda: 1.0, lambda ahead: None)
    queue.put(tracked("same", steps=8, num_images=50, guidance_scale=0.0), lambda: 1.0, lambda ahead: None)
    queue.put(tracked("other", steps=2, guidance_scale=0.0), lambda: 1.0, lambda ahead: None)
    queue.receive()
    offered: list[str] = []

    def place_behind(item: WorkItem, head: WorkItem) -> bool:
        assert head.request.request_id == "head"
        offered.append(item.request.request_id)
        return item.request.request_id == "other"

    taken = queue.take(lambda item: False, place_behind)
    assert offered == ["same", "other"]
    assert [item.request.request_id for item in taken] == ["other"] and len(queue) == 51


def test_a_stream_of_unguided_images_behind_a_guided_one_cannot_starve_it():
    """One row frees at a time (staggered ends) while new unguided images keep arriving behind the
    guided one: were they let past, each would take the row that just freed and the guided image, which
    needs two at once, would wait for as long as they keep coming."""
    server = Server(per_device=2)
    server.submit(*(tracked(f"u{i}", steps=2 + i, guidance_scale=0.0) for i in range(4)))
    server.submit(tracked("guided", steps=2))
    for i in range(6):
        server.submit(tracked(f"late{i}", steps=6, guidance_scale=0.0))
        server.boundary()
    order = ids(server.plans)
    assert order[:5] == ["u0", "u1", "u2", "u3", "guided"]
    assert admitted(server.plans[3]) == ["guided"]  # u0 and u1 ended after steps 2 and 3: two rows free


def test_a_slot_dropping_to_one_row_frees_room_that_the_next_boundary_uses():
    server = Server(per_device=2)  # 4 rows
    server.submit(tracked("interval", steps=10, guidance_interval=(0.0, 0.2)), tracked("guided", steps=10))
    server.submit(tracked("unguided", steps=4, guidance_scale=0.0))
    assert admitted(server.boundary()) == ["interval", "guided"]  # 4 rows: full
    assert admitted(server.boundary()) == []  # "interval" is still guided at its step 1
    plan = server.boundary()  # from its step 2, "interval" takes one row: 1 + 2 + 1
    assert admitted(plan) == ["unguided"]
    assert plan.dispatch is not None and plan.dispatch.rows_busy == 4 and plan.dispatch.slots_busy == 3


def test_a_multi_step_dispatch_stops_where_an_interval_end_lets_a_waiting_image_in():
    server = Server(per_device=2, most_steps_per_dispatch=4)
    server.submit(tracked("interval", steps=10, guidance_interval=(0.0, 0.2)), tracked("guided", steps=10))
    server.submit(tracked("unguided", steps=4, guidance_scale=0.0))
    first = server.boundary()
    assert first.dispatch is not None and first.dispatch.steps == 2  # not 4: the rows free after 2
    assert admitted(server.boundary()) == ["unguided"]


def test_the_steps_until_a_queued_image_can_enter_count_rows_an_interval_end_frees():
    server = Server(per_device=1)  # 2 rows
    server.submit(tracked("interval", steps=10, guidance_interval=(0.0, 0.3)))
    server.submit(tracked("unguided", steps=2, guidance_scale=0.0))
    server.boundary()  # "interval" ran its step 0; its steps 1 and 2 are guided too
    assert server.planner.steps_until_a_queued_image_can_enter() == 2
    assert len(server.queue) == 1


def test_admission_counts_the_rows_an_image_takes_once_its_guidance_begins():
    server = Server(per_device=1)  # 2 rows
    server.submit(tracked("late-guidance", steps=4, guidance_interval=(0.5, 1.0)))
    server.submit(tracked("unguided", steps=4, guidance_scale=0.0))
    assert admitted(server.boundary()) == ["late-guidance"]  # 1 + 1 rows now, but 2 + 1 from step 2
    server = Server(per_device=1)
    server.submit(tracked("late-guidance", steps=4, guidance_interval=(0.5, 1.0)))
    server.submit(tracked("short", steps=2, guidance_scale=0.0))  # ends before the guidance begins
    assert admitted(server.boundary()) == ["late-guidance", "short"]


def test_rows_of_every_bank_on_a_device_count_against_its_capacity():
    server = Server(devices=1, per_device=2, resolutions=(SQUARE, WIDE))
    server.submit(tracked("square", steps=5), tracked("wide", steps=5, resolution=WIDE))
    server.submit(tracked("third", steps=5, guidance_scale=0.0))
    plan = server.boundary()
    assert admitted(plan) == ["square", "wide"] and server.slots.busy == 2
    assert plan.dispatch is not None and plan.dispatch.buckets == ((SQUARE, 2), (WIDE, 2))


def test_an_image_not_admissible_yet_lets_later_ones_pass_and_one_that_does_not_fit_does_not():
    queue = AdmissionQueue(max_images=10, board=StatsBoard(slots_total=1))
    for request_id in ("loading", "fits", "too-big", "behind"):
        queue.put(tracked(request_id), lambda: 1.0, lambda ahead: None)
    queue.receive()
    queue.admissible = lambda item: item.request.request_id != "loading"  # its adapters still load
    offered: list[str] = []

    def place(item: WorkItem) -> bool:
        offered.append(item.request.request_id)
        return item.request.request_id != "too-big"

    assert [item.request.request_id for item in queue.take(place)] == ["fits"]
    assert offered == ["fits", "too-big"]
    assert [item.request.request_id for item in queue.items()] == ["loading", "too-big", "behind"]
