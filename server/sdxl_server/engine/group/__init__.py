"""An engine per device behind one `api.Engine` (``--engine-per-device``).

The engine (jax_engine.py) runs its devices in lockstep: one SPMD program per step, so every device
pays the busiest device's row bucket and waits for it, and a decode on one holds the step of all. An
`EngineGroup` runs one engine per device instead, each on its own clock, and routes every request to
the engine with the least work outstanding; a request of several images is split over the engines and
its events are merged back into one stream. See docs/ARCHITECTURE.md, "An engine per device".
"""
