"""Unit tests: pure functions and in-process pipelines; no service, subprocess run or network."""
