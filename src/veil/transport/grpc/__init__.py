"""The deployment transport over gRPC with mutual TLS (`client`, `server`, `codec`).

gRPC's C-core log is silenced by `veil/__init__.py` (``GRPC_VERBOSITY=NONE``, no
``GRPC_TRACE``), which runs before any Veil module can import `grpc` (C-core reads these
variables when `grpc` is first imported): a failed handshake would otherwise print a line of
C-core internals at every reconnection attempt, while Veil says what failed in one line of its
own (`diagnose`). A user who sets either variable keeps it (to debug gRPC itself).
"""
