"""moesif-beam: pipelines."""
