"""Local execution engines: Prism as our own job server, the local runner with forked workers.

* :mod:`~moesif_beam.runners.engines.prism`: builds Prism (pinned to the Beam version) and runs
  it as the streaming runner's job server, listening on loopback only.
* :mod:`~moesif_beam.runners.engines.local_workers`: the FnApiRunner whose worker processes are
  forked from moesif-beam (``_worker_stub`` is the command it starts in their place).
* :mod:`~moesif_beam.runners.engines.children`: options that keep child processes from
  outliving us; :mod:`~moesif_beam.runners.engines.loopback`: Beam's gRPC servers on loopback;
  :mod:`~moesif_beam.runners.engines.run_state`: a run's owned directories and their clean-up.
"""
