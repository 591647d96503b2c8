"""What tests and benchmarks share (installed as ``sdxl_test_support`` by ``make install``: no path edits).

- ``servers``: real ``sdxl-server serve`` processes on free ports (``RunningServer``: the one reader of the
  "listening" line; readiness through the gRPC health service), for tests/ and bench/;
- ``held_warmup``: the test-only entry point that holds a server's warm-up until a file exists;
- ``fake_engine``: the engine's Protocol without JAX, for in-process tests of the service's doors;
- ``grpc_details`` and ``metrics_page``: rich error details, decoded images, and /metrics as numbers;
- ``checkpoint_writers``: the tiny model in the checkpoint layouts users have;
- ``chart_render``: the Helm chart rendered by the real Helm CLI (tests/chart and tests/monitoring).
"""
