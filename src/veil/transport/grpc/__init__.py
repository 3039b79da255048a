"""The deployment transport over gRPC with mutual TLS (`client`, `server`, `codec`).

Importing this package silences gRPC's C-core log (``GRPC_VERBOSITY=NONE``, no ``GRPC_TRACE``):
a failed handshake would otherwise print a line of C-core internals at every reconnection
attempt, while Veil says what failed in one line of its own (`diagnose`). C-core reads these
variables when `grpc` is first imported, so import this package before `grpc`. A user who sets
either variable keeps it (to debug gRPC itself).
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
os.environ.setdefault("GRPC_TRACE", "")
