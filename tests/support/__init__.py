"""What tests and benchmarks share: server processes, a fake engine, parsers of the server's output."""
