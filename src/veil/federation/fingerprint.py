"""What a member and the coordinator must agree on before the member takes part in a run.

`fingerprint` computes, from one process's own config, model and data, three parts: the model
layout (every trainable parameter's name, shape and dtype), the data schema (feature columns,
classes, image shape, feature names when the data file names them, the data contract's hash) and
a hash of every config key, by section, leaving out the keys that legitimately differ per process
(addresses and timeouts under [deployment], local paths, thread counts). A member sends its
fingerprint when it joins (`Join` RPC), with its `Declared` row counts (never compared); the
coordinator computes its own with the same function and refuses a member whose fingerprint
differs, with one line that names what differs (`describe`), worded for each side: "data schema
differs: n_features 19 here, 22 at the coordinator".

Config values travel as hashes only; the layout and the schema travel as they are (they are no
more private than the config that determines them).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from veil.config import DeploymentConfig, RunConfig
from veil.errors import VeilError

#: Config keys left out of the comparison, by section (None: the whole section): each process
#: of one federation may set them differently without disagreeing on the run.
PER_PROCESS: dict[str, frozenset[str] | None] = {
    # Where this process listens or reaches the coordinator, and how long it waits.
    "deployment": frozenset(
        k for k in DeploymentConfig.model_fields if k == "address" or k.endswith("_s")
    ),
    "checkpoint": None,  # the coordinator's key file
    "ray": None,  # another mode's cluster settings
    # Where this machine keeps its files (the schema's hash and the layout are compared).
    "data": frozenset({"path", "schema_file", "organisations", "test_file"}),
    "model": frozenset({"model_dir"}),  # where it keeps the model's files (the layout is compared)
    "privacy": frozenset({"ledger"}),  # the coordinator's ledger file
    "federation": frozenset({"torch_threads"}),  # this machine's cores
}
#: The section name under which the config's top-level keys (name, seed, ...) are hashed.
TOP_LEVEL = "top level"

#: Bounds on what a member may send (a fingerprint is a few kilobytes for any real model).
MAX_PARAMETERS = 100_000
MAX_NAME = 1_000
MAX_DIMS = 32
MAX_SECTIONS = 64
MAX_KEYS = 256
MAX_FEATURE_NAMES = 100_000
#: The most rows a member may declare (a sanity bound, far above any organisation's table).
MAX_DECLARED_ROWS = 10**12
#: At most this many differences are named in one line.
MAX_NAMED = 4

Layout = tuple[tuple[str, tuple[int, ...], str], ...]


class MalformedFingerprint(VeilError, ValueError):
    """A fingerprint (from a member) that does not have the expected structure."""


@dataclass(frozen=True)
class Declared:
    """A member's declaration about its own data at join: its training-set size (with which
    the coordinator accounts record-level DP for it; result.json publishes it), its validation
    rows, and its data file's name (no path). Checked for type and range, not for truth: a
    member that lies about its size misstates its own records' guarantee only."""

    examples: int
    validation: int = 0
    file: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object `from_json` reads back."""
        return {"examples": self.examples, "validation": self.validation, "file": self.file}

    @classmethod
    def from_json(cls, raw: object) -> Declared:
        """Read a member's declaration; `MalformedFingerprint` for anything unexpected."""
        if not isinstance(raw, dict) or set(raw) != {"examples", "validation", "file"}:
            raise MalformedFingerprint("declared: expected examples, validation and file")
        examples, validation, file = raw["examples"], raw["validation"], raw["file"]
        if not (
            _count(examples)
            and _count(validation)
            and max(examples, validation) <= MAX_DECLARED_ROWS
            and (file is None or _short_text(file, MAX_NAME))
        ):
            raise MalformedFingerprint(
                f"declared: row counts up to {MAX_DECLARED_ROWS:,} and a file name expected"
            )
        return cls(int(examples), int(validation), file)


@dataclass(frozen=True)
class Fingerprint:
    """One process's view of the run: model layout, data schema, config hashes by section."""

    #: (name, shape, dtype) of every trainable parameter, in the model's order.
    model: Layout
    #: n_features, n_classes, image_shape (a list or None), feature_names (a list or None).
    data: dict[str, Any]
    #: section -> key -> hash of the key's value.
    config: dict[str, dict[str, str]]
    #: What a member declares about its own data, never compared: its training and validation
    #: row counts and its data file's name (`Declared`); None for the coordinator's.
    declared: Declared | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping that `from_json` reads back."""
        out: dict[str, Any] = {
            "model": [[name, list(shape), dtype] for name, shape, dtype in self.model],
            "data": self.data,
            "config": self.config,
        }
        if self.declared is not None:
            out["declared"] = self.declared.to_json()
        return out

    @classmethod
    def from_json(cls, raw: object) -> Fingerprint:
        """Read a fingerprint sent by a member; `MalformedFingerprint` for anything unexpected
        (wrong types, or more entries than `MAX_PARAMETERS`, `MAX_SECTIONS`, ...)."""
        if not isinstance(raw, dict) or not (
            {"model", "data", "config"} <= set(raw) <= {"model", "data", "config", "declared"}
        ):
            raise MalformedFingerprint("expected an object with model, data and config")
        model = raw["model"]
        if not isinstance(model, list) or len(model) > MAX_PARAMETERS:
            raise MalformedFingerprint(f"model: expected a list of at most {MAX_PARAMETERS}")
        layout = []
        for entry in model:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and _short_text(entry[0], MAX_NAME)
                and _shape(entry[1])
                and _short_text(entry[2], 16)
            ):
                raise MalformedFingerprint("model: each parameter is [name, shape, dtype]")
            layout.append((entry[0], tuple(entry[1]), entry[2]))
        declared = Declared.from_json(raw["declared"]) if "declared" in raw else None
        return cls(tuple(layout), _data(raw["data"]), _config(raw["config"]), declared)


def fingerprint(
    config: RunConfig,
    parameters: Mapping[str, np.ndarray],
    features: np.ndarray,
    meta: Mapping[str, Any],
    declared: Declared | None = None,
) -> Fingerprint:
    """This process's fingerprint: the one function both sides use.

    `parameters` are the model's trainable parameters (`veil.models.get_parameters`);
    `features` the process's own feature matrix (a member's training set, the coordinator's
    test set): its column count is the schema's n_features, whatever the data file's metadata
    says; `meta` the data's metadata (n_classes, image_shape, optional feature_names, and
    schema_hash when a data contract encoded the data); `declared` a member's declaration.
    """
    layout = tuple(
        (str(name), tuple(int(d) for d in arr.shape), np.dtype(arr.dtype).str)
        for name, arr in parameters.items()
    )
    image_shape = meta.get("image_shape")
    names = meta.get("feature_names")
    data = {
        "n_features": int(math.prod(features.shape[1:])) if features.ndim > 1 else 1,
        "n_classes": int(meta["n_classes"]),
        "image_shape": [int(d) for d in image_shape] if image_shape else None,
        "feature_names": [str(n) for n in names] if names else None,
        "schema_hash": str(meta["schema_hash"]) if meta.get("schema_hash") else None,
    }
    return Fingerprint(layout, data, config_hashes(config), declared)


def config_hashes(config: RunConfig) -> dict[str, dict[str, str]]:
    """section -> key -> SHA-256 (16 hex digits) of the key's canonical JSON value, without the
    `PER_PROCESS` keys; the top-level keys under `TOP_LEVEL`. Sections left unset are absent."""
    out: dict[str, dict[str, str]] = {}
    for section, value in config.to_dict().items():
        if not isinstance(value, dict):
            out.setdefault(TOP_LEVEL, {})[section] = _hash(value)
            continue
        if section in PER_PROCESS and PER_PROCESS[section] is None:
            continue
        skip = PER_PROCESS.get(section) or frozenset()
        out[section] = {k: _hash(v) for k, v in value.items() if k not in skip}
    return out


@dataclass(frozen=True)
class Difference:
    """One thing a member and the coordinator disagree on. `member` and `coordinator` are the
    two values as text; both None when they are hashes (a config key)."""

    part: Literal["data schema", "model layout", "configuration"]
    what: str
    member: str | None = None
    coordinator: str | None = None

    def text(self, side: Literal["member", "coordinator"], member: str) -> str:
        """What differs, worded for `side` ("here" is that side), without the part."""
        if self.member is None or self.coordinator is None:
            return self.what
        if side == "member":
            return f"{self.what} {self.member} here, {self.coordinator} at the coordinator"
        return f"{self.what} {self.member} at {member}, {self.coordinator} here"


def differences(member: Fingerprint, coordinator: Fingerprint) -> list[Difference]:
    """Everything the two fingerprints disagree on: data schema first, then the model layout,
    then the configuration (by section, naming the keys)."""
    out: list[Difference] = []
    for key in ("schema_hash", "n_features", "n_classes", "image_shape", "feature_names"):
        mine, theirs = member.data.get(key), coordinator.data.get(key)
        if key == "feature_names" and (mine is None or theirs is None):
            continue  # only compared when both data files name their features
        if mine != theirs:
            out.append(Difference("data schema", key, _show(mine), _show(theirs)))
    out.extend(_layout_differences(member.model, coordinator.model))
    for section in sorted(set(member.config) | set(coordinator.config)):
        label = "top-level keys" if section == TOP_LEVEL else f"[{section}]"
        mine_s, theirs_s = member.config.get(section), coordinator.config.get(section)
        if mine_s is None or theirs_s is None:
            state = ("not set", "set") if mine_s is None else ("set", "not set")
            out.append(Difference("configuration", label, *state))
            continue
        keys = sorted(k for k in set(mine_s) | set(theirs_s) if mine_s.get(k) != theirs_s.get(k))
        if keys:
            out.append(Difference("configuration", f"{label} {', '.join(keys)}"))
    return out


def describe(
    found: Sequence[Difference], side: Literal["member", "coordinator"], member: str
) -> str:
    """One line naming the differences (at most `MAX_NAMED`, then how many more), e.g. "data
    schema differs: n_features 19 here, 22 at the coordinator; configuration differs: [privacy]
    epsilon"."""
    parts = []
    for i, d in enumerate(found[:MAX_NAMED]):
        same = i > 0 and found[i - 1].part == d.part
        parts.append(d.text(side, member) if same else f"{d.part} differs: {d.text(side, member)}")
    line = "; ".join(parts)
    if len(found) > MAX_NAMED:
        line += f"; and {len(found) - MAX_NAMED} more"
    return line


def _layout_differences(member: Layout, coordinator: Layout) -> list[Difference]:
    mine = {name: (shape, dtype) for name, shape, dtype in member}
    theirs = {name: (shape, dtype) for name, shape, dtype in coordinator}
    out = []
    for name in [n for n, _, _ in coordinator if n not in mine]:
        out.append(Difference("model layout", f"parameter '{name[:100]}'", "missing", "present"))
    for name in [n for n, _, _ in member if n not in theirs]:
        out.append(Difference("model layout", f"parameter '{name[:100]}'", "present", "missing"))
    for name, _, _ in coordinator:
        if name in mine and mine[name] != theirs[name]:
            (m_shape, m_dtype), (c_shape, c_dtype) = mine[name], theirs[name]
            what = "shape" if m_shape != c_shape else "dtype"
            values = (list(m_shape), list(c_shape)) if what == "shape" else (m_dtype, c_dtype)
            out.append(
                Difference(
                    "model layout",
                    f"parameter '{name[:100]}' {what}",
                    _show(values[0]),
                    _show(values[1]),
                )
            )
    if not out and [n for n, _, _ in member] != [n for n, _, _ in coordinator]:
        out.append(Difference("model layout", "parameter order", "one order", "another"))
    return out


def _hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _short_text(value: object, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _shape(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _data(raw: object) -> dict[str, Any]:
    keys = {"n_features", "n_classes", "image_shape", "feature_names", "schema_hash"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise MalformedFingerprint(f"data: expected exactly {sorted(keys)}")
    names = raw["feature_names"]
    if not (raw["schema_hash"] is None or _short_text(raw["schema_hash"], 64)):
        raise MalformedFingerprint("data: schema_hash must be a hex digest or null")
    if not (
        _count(raw["n_features"])
        and _count(raw["n_classes"])
        and (raw["image_shape"] is None or (_shape(raw["image_shape"]) and raw["image_shape"]))
        and (
            names is None
            or (
                isinstance(names, list)
                and len(names) <= MAX_FEATURE_NAMES
                and all(_short_text(n, MAX_NAME) for n in names)
            )
        )
    ):
        raise MalformedFingerprint("data: counts, an image shape and feature names expected")
    return dict(raw)


def _config(raw: object) -> dict[str, dict[str, str]]:
    if not isinstance(raw, dict) or len(raw) > MAX_SECTIONS:
        raise MalformedFingerprint(f"config: expected at most {MAX_SECTIONS} sections")
    for section, keys in raw.items():
        if not (
            _short_text(section, 100)
            and isinstance(keys, dict)
            and len(keys) <= MAX_KEYS
            and all(_short_text(k, 100) and _short_text(v, 64) for k, v in keys.items())
        ):
            raise MalformedFingerprint("config: each section maps keys to hashes")
    return {str(s): dict(k) for s, k in raw.items()}
