"""Java and the broker's jars: a suitable ``java``, and Kafka's jars fetched once, cached.

The jars come from Maven Central: ``org.apache.kafka:kafka_2.13:<version>``, its runtime
dependencies and the log4j2 binding for slf4j. They are resolved with ``mvn`` when it is
installed, and otherwise over HTTPS from a pinned list (only for :data:`KAFKA_VERSION`), each
checked against Maven Central's SHA-1, into :func:`kafka_cache_dir`, published by an atomic
rename.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from moesif_beam.runners.emulators.kafka_local.config import (
    KAFKA_VERSION,
    MIN_JAVA_VERSION,
    LocalKafkaError,
)
from moesif_beam.runners.engines.children import child_options
from moesif_beam.runners.locks import exclusive_lock

_SCALA_BINARY: Final = "2.13"
# Kafka 4.x logs through slf4j 1.7 (slf4j-api 1.7.36) onto log4j2 but leaves the binding to the
# distribution; this is the binding its tarball ships, at the log4j2 version Kafka 4.4.0 uses.
_LOG4J_SLF4J_BINDING: Final = "org.apache.logging.log4j:log4j-slf4j-impl:2.25.5"
_DEPENDENCY_PLUGIN: Final = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
_MAVEN_CENTRAL: Final = "https://repo1.maven.org/maven2"
_FETCH_PREFIX: Final = "libs-fetch-"

# The runtime classpath of kafka_2.13 plus the binding above, exactly as Maven resolves it
# (`dependency:copy-dependencies -DincludeScope=runtime`), for downloads without Maven. Only
# the pinned version has a list; other versions need `mvn`.
_PINNED_ARTIFACTS: Final[Mapping[str, str]] = {
    "4.4.0": """
        at.yawk.lz4:lz4-java:1.11.2
        com.dynatrace.hash4j:hash4j:0.22.0
        com.fasterxml.jackson.core:jackson-annotations:2.21
        com.fasterxml.jackson.core:jackson-core:2.21.7
        com.fasterxml.jackson.core:jackson-databind:2.21.7
        com.fasterxml.jackson.dataformat:jackson-dataformat-yaml:2.21.7
        com.fasterxml.jackson.datatype:jackson-datatype-jdk8:2.21.7
        com.github.ben-manes.caffeine:caffeine:3.2.0
        com.github.luben:zstd-jni:1.5.7-17
        com.google.re2j:re2j:1.8
        com.typesafe.scala-logging:scala-logging_2.13:3.9.6
        com.yammer.metrics:metrics-core:2.2.0
        commons-beanutils:commons-beanutils:1.11.0
        commons-collections:commons-collections:3.2.2
        commons-digester:commons-digester:2.1
        commons-logging:commons-logging:1.3.5
        commons-validator:commons-validator:1.10.1
        net.sf.jopt-simple:jopt-simple:5.0.4
        net.sourceforge.argparse4j:argparse4j:0.7.0
        org.apache.kafka:kafka-clients:4.4.0
        org.apache.kafka:kafka-coordinator-common:4.4.0
        org.apache.kafka:kafka-group-coordinator-api:4.4.0
        org.apache.kafka:kafka-group-coordinator:4.4.0
        org.apache.kafka:kafka-metadata:4.4.0
        org.apache.kafka:kafka-raft:4.4.0
        org.apache.kafka:kafka-server-common:4.4.0
        org.apache.kafka:kafka-server:4.4.0
        org.apache.kafka:kafka-share-coordinator:4.4.0
        org.apache.kafka:kafka-storage-api:4.4.0
        org.apache.kafka:kafka-storage:4.4.0
        org.apache.kafka:kafka-tools-api:4.4.0
        org.apache.kafka:kafka-transaction-coordinator:4.4.0
        org.apache.kafka:kafka_2.13:4.4.0
        org.apache.logging.log4j:log4j-api:2.25.5
        org.apache.logging.log4j:log4j-core:2.25.5
        org.apache.logging.log4j:log4j-slf4j-impl:2.25.5
        org.bitbucket.b_c:jose4j:0.9.6
        org.hdrhistogram:HdrHistogram:2.2.2
        org.jspecify:jspecify:1.0.0
        org.pcollections:pcollections:4.0.2
        org.scala-lang:scala-library:2.13.18
        org.scala-lang:scala-reflect:2.13.18
        org.slf4j:slf4j-api:1.7.36
        org.xerial.snappy:snappy-java:1.1.10.7
        org.yaml:snakeyaml:2.5
    """,
}


def _java_executable() -> str:
    """The ``java`` that runs the broker: ``$JAVA_HOME/bin/java`` if set, else the PATH's."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        msg = (
            f"Java {MIN_JAVA_VERSION}+ is needed to run the local Kafka broker, but no `java` "
            "was found on PATH or in JAVA_HOME; install a JDK/JRE 17 or newer"
        )
        raise LocalKafkaError(msg)
    return found


def _parse_java_version(text: str) -> int | None:
    """The feature version from ``java -version`` output (``1.8.0_1`` -> 8, ``17.0.2`` -> 17)."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:  # Java 8 and older report "1.x"
        return int(match.group(2))
    return major


@functools.cache
def java_version(java: str | None = None) -> int:
    """Returns the feature version (e.g. 17) of ``java``, checked once per executable.

    Raises:
        LocalKafkaError: If there is no ``java``, it cannot run, or it is older than
            :data:`MIN_JAVA_VERSION`.
    """
    java = java or _java_executable()
    try:
        probe = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"cannot run {java} -version: {exc}"
        raise LocalKafkaError(msg) from exc
    version = _parse_java_version(probe.stderr + probe.stdout)
    if version is None:
        msg = f"cannot tell the version of {java} from: {(probe.stderr + probe.stdout).strip()!r}"
        raise LocalKafkaError(msg)
    if version < MIN_JAVA_VERSION:
        msg = (
            f"the local Kafka broker needs Java {MIN_JAVA_VERSION} or newer, but {java} is "
            f"Java {version}; install a newer JDK or point JAVA_HOME at one"
        )
        raise LocalKafkaError(msg)
    return version


def kafka_cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the jars of Kafka ``version`` are cached (``.../moesif-beam/kafka-<version>``).

    ``$XDG_CACHE_HOME`` is used when it is set to an absolute path (relative values are invalid
    per the XDG spec and ignored), else ``~/.cache``.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return root / "moesif-beam" / f"kafka-{version}"


def _libs_complete(libs: Path, version: str) -> bool:
    # The directory only appears through an atomic rename of a finished download, so these
    # checks guard against later tampering (someone deleting jars), not against half downloads.
    required = (f"kafka_{_SCALA_BINARY}-{version}.jar", f"kafka-clients-{version}.jar")
    return all((libs / name).is_file() for name in required) and any(
        libs.glob("log4j-slf4j*-impl-*.jar")
    )


def ensure_kafka_libs(version: str = KAFKA_VERSION) -> Path:
    """Returns the directory holding every jar the broker of ``version`` needs, fetching once.

    Guarantees: the returned directory is complete (it is published by renaming a finished
    download, so an interrupted fetch leaves no partial cache); when it is already cached,
    nothing touches the network; the first fetch prints one line to stderr.

    Raises:
        LocalKafkaError: If the jars cannot be fetched (no ``mvn`` for an unpinned version,
            Maven Central unreachable, a checksum mismatch), with the reason.
    """
    base = kafka_cache_dir(version)
    libs = base / "libs"
    if _libs_complete(libs, version):
        return libs
    base.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(base / ".lock"):
        if _libs_complete(libs, version):  # another process finished while we waited
            return libs
        if libs.exists():
            shutil.rmtree(libs)  # damaged after publication; fetch again
        # Leftovers of fetches that were killed before they could clean up; we hold the lock,
        # so no live fetch owns them.
        for stale in base.glob(f"{_FETCH_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        mvn = shutil.which("mvn")
        if mvn is None and version not in _PINNED_ARTIFACTS:
            msg = (
                f"cannot fetch Apache Kafka {version}: Maven (`mvn`) is not installed, and only "
                f"Kafka {', '.join(_PINNED_ARTIFACTS)} can be downloaded without it"
            )
            raise LocalKafkaError(msg)
        print(
            f"moesif-beam: fetching Apache Kafka {version} from Maven Central into {libs} "
            "(first use only)...",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix=_FETCH_PREFIX, dir=base) as work:
            staging = Path(work) / "libs"
            staging.mkdir()
            if mvn is not None:
                _fetch_with_maven(mvn, version, Path(work), staging)
            else:
                _fetch_pinned_over_https(version, staging)
            if not _libs_complete(staging, version):
                msg = f"fetching Apache Kafka {version} produced an incomplete set of jars"
                raise LocalKafkaError(msg)
            staging.rename(libs)  # atomic publication: the cache is all or nothing
    return libs


def _fetch_with_maven(mvn: str, version: str, work: Path, dest: Path) -> None:
    """Resolves the broker's runtime classpath with Maven and copies the jars into ``dest``."""
    group, artifact, binding_version = _LOG4J_SLF4J_BINDING.split(":")
    pom = textwrap.dedent(f"""\
        <project xmlns="http://maven.apache.org/POM/4.0.0">
          <modelVersion>4.0.0</modelVersion>
          <groupId>moesif-beam</groupId>
          <artifactId>kafka-local-classpath</artifactId>
          <version>1</version>
          <packaging>pom</packaging>
          <dependencies>
            <dependency>
              <groupId>org.apache.kafka</groupId>
              <artifactId>kafka_{_SCALA_BINARY}</artifactId>
              <version>{version}</version>
            </dependency>
            <dependency>
              <groupId>{group}</groupId>
              <artifactId>{artifact}</artifactId>
              <version>{binding_version}</version>
            </dependency>
          </dependencies>
        </project>
        """)
    (work / "pom.xml").write_text(pom, encoding="utf-8")
    command = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(work / "pom.xml"),
        # A pinned plugin version: the same resolution on every Maven installation.
        f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
        f"-DoutputDirectory={dest}",
        "-DincludeScope=runtime",
    ]
    try:
        result = subprocess.run(
            command,
            cwd=work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            **child_options(),  # an orphaned Maven would keep writing into a dead fetch
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"Maven could not fetch Apache Kafka {version}: {exc}"
        raise LocalKafkaError(msg) from exc
    if result.returncode != 0:
        output = _strip_ansi(result.stdout + result.stderr).strip().splitlines()
        detail = "\n".join(output[-25:])
        msg = f"Maven could not fetch Apache Kafka {version} (exit {result.returncode}):\n{detail}"
        raise LocalKafkaError(msg)


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _fetch_pinned_over_https(version: str, dest: Path) -> None:
    """Downloads the pinned artifact list from Maven Central, each checked against its SHA-1."""
    coordinates = _PINNED_ARTIFACTS[version].split()
    repo = os.environ.get("MOESIF_BEAM_MAVEN_REPO", _MAVEN_CENTRAL).rstrip("/")
    # A few parallel downloads: ~45 files, most of the time is latency, not bandwidth.
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(_download_artifact, repo, c, dest) for c in coordinates]
        for future in concurrent.futures.as_completed(futures):
            future.result()


def _download_artifact(repo: str, coordinate: str, dest: Path) -> None:
    group, artifact, version = coordinate.split(":")
    name = f"{artifact}-{version}.jar"
    url = f"{repo}/{group.replace('.', '/')}/{artifact}/{version}/{name}"
    if not url.startswith(("https://", "http://")):
        msg = f"MOESIF_BEAM_MAVEN_REPO must be an http(s) URL, got {repo!r}"
        raise LocalKafkaError(msg)
    # SHA-1 because that is what Maven Central publishes; it guards against corrupt transfers.
    digest = hashlib.sha1(usedforsecurity=False)
    try:
        # The scheme is checked above: only http(s) URLs are opened.
        with urllib.request.urlopen(url + ".sha1", timeout=60) as response:  # noqa: S310
            expected = response.read().decode("ascii", "replace").split()[0].lower()
        with (
            urllib.request.urlopen(url, timeout=60) as response,  # noqa: S310
            (dest / name).open("wb") as out,
        ):
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        msg = f"cannot download {url}: {exc}"
        raise LocalKafkaError(msg) from exc
    if digest.hexdigest() != expected:
        msg = f"checksum mismatch for {url}: expected SHA-1 {expected}, got {digest.hexdigest()}"
        raise LocalKafkaError(msg)
