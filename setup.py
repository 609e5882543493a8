"""Packaging for moesif-beam: installable locally and shippable to Beam workers (--setup_file).

The repository keeps its folders at the top (pipelines/, transforms/, schemas/, runners/);
installed, they are subpackages of one namespace, ``moesif_beam``, so the distribution never
puts generic top-level packages into a user's site-packages.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
FOLDERS = ("pipelines", "transforms", "schemas", "runners")

# The version is written once, in moesif_beam/__init__.py.
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "moesif_beam" / "__init__.py").read_text(), re.M
).group(1)

# moesif_beam.<folder>[.<sub>] -> <folder>[/<sub>]
PACKAGES = ["moesif_beam"] + [
    f"moesif_beam.{package}"
    for folder in FOLDERS
    for package in find_packages(where=str(ROOT), include=[folder, f"{folder}.*"])
]

setup(
    name="moesif-beam",
    version=VERSION,
    description="Apache Beam pipelines that deliver API-gateway logs and action streams to Moesif.",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir={
        "moesif_beam": "moesif_beam",
        **{f"moesif_beam.{folder}": folder for folder in FOLDERS},
    },
    package_data={"moesif_beam": ["py.typed"], "moesif_beam.schemas": ["*.avsc"]},
    install_requires=[
        "apache-beam==2.77.0",
        "fastavro==1.13.1",
        "requests==2.34.2",
        "confluent-kafka==2.16.1",
        # Parses and writes every record: several times faster than the standard library,
        # and strict where Moesif is (no NaN, no Infinity, no overflowing numbers).
        "orjson==3.13.0",
        # Compresses batch bodies at the default level: ISA-L's igzip, about 5x less CPU
        # than zlib for about as many bytes (docs/performance.md has the table).
        "isal==1.9.1",
        # The dedup spill's blocks are read back in one C call per block (about half the
        # cost of unpacking each record in Python), and the collector emulator's count-only
        # mode reads only an item's id and request time: about 2 µs per event against 16.
        "msgspec==0.23.0",
        # Planning a large file's ranges counts its newlines on two threads (numpy lets go
        # of the GIL): a quarter of the time of reading and counting in Python. Beam
        # installs it anyway (numpy<2.5); pinned here because we import it.
        "numpy==2.4.6",
        # --metrics_port: the Prometheus endpoint (the standard client library).
        "prometheus_client==0.26.0",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "testcontainers==4.15.0",
            "hypothesis==6.170.17",
            "pytest-timeout==2.4.0",
        ],
        "dev": ["ruff==0.17.6", "mypy==2.4.1", "types-requests==2.33.0.20261030"],
        # DataflowRunner's client libraries (83 more packages; every `import apache_beam`
        # then takes about 0.5 s longer): only for runs on Google Cloud Dataflow.
        "dataflow": ["apache-beam[gcp]==2.77.0"],
    },
    entry_points={"console_scripts": ["moesif-beam=moesif_beam.runners.entry:main"]},
)
