"""``python -m moesif_beam.runners.emulators.segment``."""

from moesif_beam.runners.emulators.segment import main

raise SystemExit(main())
