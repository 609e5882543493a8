"""Packaging for moesif-beam: installable locally and shippable to Beam workers (--setup_file)."""

from setuptools import find_packages, setup

setup(
    name="moesif-beam",
    version="0.1.0",
    description="Apache Beam pipelines that deliver API-gateway logs and action streams to Moesif.",
    python_requires=">=3.10",
    packages=find_packages(
        include=[
            "pipelines",
            "pipelines.*",
            "transforms",
            "transforms.*",
            "schemas",
            "schemas.*",
            "runners",
            "runners.*",
        ]
    ),
    package_data={"schemas": ["*.avsc"]},
    include_package_data=True,
    install_requires=[
        "apache-beam==2.77.0",
        "fastavro==1.13.1",
        "requests==2.34.2",
        "confluent-kafka==2.16.1",
        # Parses and writes every record: several times faster than the standard library,
        # and strict where Moesif is (no NaN, no Infinity, no overflowing numbers).
        "orjson==3.13.0",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "testcontainers==4.15.0",
            "hypothesis==6.170.17",
            "pytest-timeout==2.4.0",
        ],
        "dev": ["ruff==0.17.6", "mypy==2.4.1", "types-requests==2.33.0.20261030"],
    },
    entry_points={"console_scripts": ["moesif-beam=runners.cli:main"]},
)
