"""Benchmarks: each module prints a table of variants measured side by side in one process."""
