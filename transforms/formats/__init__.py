"""Input formats: one module per source format, each a pure mapping to Moesif records."""
