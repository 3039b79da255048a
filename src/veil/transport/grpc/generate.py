"""Regenerate `veil_pb2.py` and `veil_pb2_grpc.py` from `veil.proto` (needs grpcio-tools)."""

from __future__ import annotations

from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    src = here.parents[2]
    return int(
        protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{src}",
                f"--python_out={src}",
                f"--grpc_python_out={src}",
                f"--pyi_out={src}",
                str(here.relative_to(src) / "veil.proto"),
            ]
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
