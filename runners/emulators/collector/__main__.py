"""``python -m moesif_beam.runners.emulators.collector``: the same as ``moesif-beam collector``."""

from moesif_beam.runners.emulators.collector import main

raise SystemExit(main())
