"""moesif-beam tests."""
