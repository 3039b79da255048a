"""`import veil`, `import veil.cli` and every `veil ... --help` load none of the heavy libraries.

Each case runs in a fresh interpreter under ``python -X importtime``, which lists every module
the process imported, so the check is on the real command line and on modules, not on time.
The command paths are read from the parsers themselves, so a new subcommand is checked too.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from veil.commands import COMMANDS

#: What `veil --help` must not pay for (seconds each to import): the ML stack, TenSEAL, gRPC,
#: the data and plotting libraries, OpenDP and dp-accounting.
HEAVY = frozenset(
    {
        "torch",
        "sklearn",
        "tenseal",
        "transformers",
        "grpc",
        "pandas",
        "scipy",
        "matplotlib",
        "opendp",
        "dp_accounting",
    }
)


def imported(*argv: str) -> tuple[str, set[str]]:
    """A fresh `python -X importtime ARGV`, which must succeed: its stdout, and the top-level
    packages it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    yield path
    for name, child in _subcommands(parser).items():
        yield from _walk(child, (*path, name))


def command_paths() -> list[tuple[str, ...]]:
    """Every command path of `veil` (`run`, `pki init`, ...), from the modules' own parsers."""
    paths: list[tuple[str, ...]] = []
    for module in dict.fromkeys(c.module for c in COMMANDS.values()):
        scratch = argparse.ArgumentParser(prog="veil")
        sub = scratch.add_subparsers()
        importlib.import_module(module).register(sub)
        for name, parser in sub.choices.items():
            paths += _walk(parser, (name,))
    return paths


@pytest.mark.parametrize("statement", ["import veil", "import veil.cli"])
def test_importing_veil_loads_nothing_heavy(statement: str) -> None:
    _, loaded = imported("-c", statement)
    assert "veil" in loaded
    assert not loaded & HEAVY


@pytest.mark.parametrize("path", [(), *command_paths()], ids=lambda p: " ".join(p) or "veil")
def test_help_loads_nothing_heavy(path: tuple[str, ...]) -> None:
    usage, loaded = imported("-m", "veil.cli", *path, "--help")
    assert usage.startswith(" ".join(("usage: veil", *path)))
    assert not loaded & HEAVY, f"`veil {' '.join(path)} --help` imports {sorted(loaded & HEAVY)}"


def test_version_prints_the_version_and_loads_nothing_heavy() -> None:
    import veil

    version, loaded = imported("-m", "veil.cli", "--version")
    assert version == f"veil {veil.__version__}\n"
    assert not loaded & HEAVY


def test_every_command_is_listed_with_the_module_that_registers_it() -> None:
    # A command a module registers but COMMANDS does not name would be unreachable: the top
    # parser only knows the commands of COMMANDS.
    for module in dict.fromkeys(c.module for c in COMMANDS.values()):
        scratch = argparse.ArgumentParser(prog="veil")
        sub = scratch.add_subparsers()
        importlib.import_module(module).register(sub)
        listed = {name for name, c in COMMANDS.items() if c.module == module}
        assert set(sub.choices) == listed, module


def test_public_names_load_on_first_use() -> None:
    # `from veil.run import ...` binds the submodule `veil.run` on the package; the function
    # `veil.run` must stay what `veil.run` means.
    code = """
import inspect, sys
import veil
assert "veil.run" not in sys.modules and "torch" not in sys.modules
from veil.run import RESULT_FILE
assert inspect.isfunction(veil.run) and veil.run.__module__ == "veil.run", veil.run
from veil import ConfigError, DataError, Result, RunConfig, StoreError, UserError, VeilError
from veil import load_config, run
import veil.config, veil.result
assert run is veil.run and RunConfig is veil.config.RunConfig
assert load_config is veil.config.load_config and Result is veil.result.Result
assert issubclass(ConfigError, UserError) and issubclass(StoreError, VeilError)
assert all(getattr(veil, name) is not None for name in veil.__all__)
try:
    veil.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("veil.no_such_name resolved")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "ok\n"


def test_spelled_out_choices_match_their_source() -> None:
    # The command modules spell out a few constants so that `--help` does not import their
    # source (torch, OpenDP, dp-accounting, pydantic); they must not drift from it.
    from typing import get_args

    from veil import config
    from veil.commands import audit, dashboard, privacy, run
    from veil.privacy.audit import runner
    from veil.privacy.dp import accountant, queries
    from veil.report import dashboard as dashboard_page

    assert get_args(config.Mode) == run.MODES
    assert get_args(config.Aggregation) == run.AGGREGATIONS
    assert audit.ATTACKS == runner.ATTACKS
    assert (dashboard.DEFAULT_HOST, dashboard.DEFAULT_PORT) == (
        dashboard_page.DEFAULT_HOST,
        dashboard_page.DEFAULT_PORT,
    )
    assert privacy.QUERY_KINDS == queries.QUERY_KINDS
    assert privacy.MECHANISMS == queries.MECHANISMS
    assert privacy.VERIFY_TOLERANCE == accountant.VERIFY_TOLERANCE
