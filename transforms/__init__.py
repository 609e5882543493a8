"""moesif-beam: transforms."""
