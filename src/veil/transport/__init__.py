"""Transports carry the federation's messages: in-process simulation now; gRPC and Ray later."""

from veil.transport.local import LocalTransport

__all__ = ["LocalTransport"]
