"""moesif-beam: runners."""
