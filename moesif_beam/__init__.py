"""moesif-beam: Apache Beam pipelines that move API traffic and product events into Moesif.

Installed, the repository's top-level folders are this package's subpackages:
``moesif_beam.pipelines``, ``moesif_beam.transforms``, ``moesif_beam.schemas`` and
``moesif_beam.runners`` (setuptools ``package_dir``). In a source checkout the same names
resolve through this folder's links to those folders.
"""

__all__ = ["__version__"]

# The one place the version is written: setup.py reads it from here.
__version__ = "0.2.0"
