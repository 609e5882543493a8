"""moesif-beam: schemas."""
