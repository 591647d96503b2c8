"""Benchmarks: each prints a table and writes JSON (and plots) under bench/results/."""
