"""Execution engines: Prism and Flink job servers of our own, flink-local, the local runner.

* :mod:`~moesif_beam.runners.engines.prism`: builds Prism (pinned to the Beam version) and runs
  it as the streaming runner's job server, listening on loopback only.
* :mod:`~moesif_beam.runners.engines.local_workers`: the FnApiRunner whose worker processes are
  forked from moesif-beam (``_worker_stub`` is the command it starts in their place).
* :mod:`~moesif_beam.runners.engines.children`: options that keep child processes from
  outliving us; :mod:`~moesif_beam.runners.engines.loopback`: Beam's gRPC servers on loopback;
  :mod:`~moesif_beam.runners.engines.run_state`: a run's owned directories and their clean-up.
* :mod:`~moesif_beam.runners.engines.flink`: Beam's Flink job server (2.62.0, from Maven
  Central), provisioned and started as our child, bound to loopback.
* :mod:`~moesif_beam.runners.engines.flink_cluster` and
  :mod:`~moesif_beam.runners.engines.flink_worker_pool`: ``moesif-beam flink-local``, a real
  Flink 1.19 cluster from PyPI with a Python worker pool from this environment.
"""
