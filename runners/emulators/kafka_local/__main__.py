"""``python -m moesif_beam.runners.emulators.kafka_local``, the same as ``moesif-beam kafka-local``.

Runs a real single-node Apache Kafka broker in the foreground.
"""

from moesif_beam.runners.emulators.kafka_local import main

raise SystemExit(main())
