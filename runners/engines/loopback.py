"""Beam's own gRPC servers, made to listen on 127.0.0.1 while moesif-beam runs a pipeline.

Beam 2.77 binds the servers it opens for its workers to every interface (``[::]:0``),
unauthenticated: the FnApiRunner's control, data, state and logging servers (one set per
run in ``worker_handlers.GrpcServer``) and the LOOPBACK worker pool a portable run starts
(``worker_pool_main.BeamFnExternalWorkerPoolServicer.start``). Anyone who can reach the
machine could then drive a worker. Beam hands these endpoints to its workers as
``localhost:<port>``, so nothing off the machine could use them anyway: binding them to
127.0.0.1 loses nothing. Beam has no option for it, so while a run is on, every gRPC
server made in this process has its wildcard addresses rewritten to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc

__all__ = ["loopback_address", "loopback_grpc_servers"]

_WILDCARDS = ("[::]:", "0.0.0.0:", ":")


def loopback_address(address: str) -> str:
    """``address`` with a wildcard host replaced by 127.0.0.1; other hosts are kept."""
    for prefix in _WILDCARDS:
        if address.startswith(prefix):
            return "127.0.0.1:" + address[len(prefix) :]
    return address


@contextlib.contextmanager
def loopback_grpc_servers() -> Iterator[None]:
    """While inside, ``grpc.server(...)`` makes servers that never bind a wildcard address.

    Beam calls ``grpc.server`` through the ``grpc`` module at run time, so replacing the
    module's function reaches every server Beam makes during the run, and nothing else.
    """
    original = grpc.server

    def server(*args: Any, **kwargs: Any) -> Any:
        made = original(*args, **kwargs)
        add_insecure_port = made.add_insecure_port
        made.add_insecure_port = lambda address: add_insecure_port(loopback_address(address))
        return made

    grpc.server = server
    try:
        yield
    finally:
        grpc.server = original
