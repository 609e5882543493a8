"""Integration tests: real local services (the collector emulator over HTTP, Kafka, Prism) and
the real command in subprocesses."""
