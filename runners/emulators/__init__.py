"""Stand-ins for outside services, for tests, benchmarks and offline runs.

* :mod:`~moesif_beam.runners.emulators.collector`: Moesif's Collector API (``moesif-beam
  collector``).
* :mod:`~moesif_beam.runners.emulators.kafka_local`: a real single-node Apache Kafka broker
  (``moesif-beam kafka-local``).
"""
