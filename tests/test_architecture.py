"""The shape of the package, read from its source with `ast`: nothing of `veil` is imported, so
these run in about a second and need none of the heavy libraries.

- No import cycles between modules of `veil`. Imports inside functions count (a lazy import
  only hides a cycle); imports under ``if TYPE_CHECKING:`` do not (they never run).
- No module imports a private name (``_x``) of another module, by ``from veil.m import _x`` or
  by ``veil.m._x``.
- No module under ``veil/privacy/`` imports ``veil.config``: a mechanism takes plain parameters
  and does not know the config file exists.
- Every exception class in `veil` derives from `veil.errors.VeilError`.

The last tests run the checks on a small package written for them, so that each check is seen
to fail.
"""

from __future__ import annotations

import ast
import builtins
import functools
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
VEIL_ERROR = ("veil.errors", "VeilError")


@dataclass(frozen=True)
class Module:
    """One source file: `name` is its dotted name (``veil.data`` for ``veil/data/__init__.py``)."""

    name: str
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        """The package that relative imports in this module start from."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


#: Every module of a package, by dotted name.
Package = Mapping[str, Module]


@dataclass(frozen=True)
class Import:
    """One name an import statement brings in: `target` is the package's module that runs,
    `name` the name taken from it (None when the module itself is imported)."""

    source: str
    target: str
    name: str | None
    line: int


def parse_package(src: Path, top: str = "veil") -> dict[str, Module]:
    """Every ``.py`` file under ``src/top``, parsed."""
    found: dict[str, Module] = {}
    for path in sorted((src / top).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        found[name] = Module(name, path, ast.parse(path.read_text(), filename=str(path)))
    return found


@functools.cache
def veil() -> dict[str, Module]:
    return parse_package(SRC)


def _type_checking_only(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(node: ast.AST) -> Iterator[ast.AST]:
    """`node` and every node under it, except the bodies of ``if TYPE_CHECKING:``."""
    yield node
    if isinstance(node, ast.If) and _type_checking_only(node):
        for other in node.orelse:
            yield from _nodes(other)
        return
    for child in ast.iter_child_nodes(node):
        yield from _nodes(child)


def _owning_module(dotted: str, package: Package) -> str | None:
    """The longest prefix of `dotted` that is a module of `package`."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in package:
            return candidate
    return None


def _origin(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: Module, package: Package) -> Iterator[Import]:
    """What `module` imports from `package`, wherever the import statement stands."""
    for node in _nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owning_module(alias.name, package)
                if target is not None:
                    yield Import(module.name, target, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            origin = _origin(module, node)
            if origin not in package:
                continue
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                if submodule in package:
                    yield Import(module.name, submodule, None, node.lineno)
                else:
                    yield Import(module.name, origin, alias.name, node.lineno)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _bindings(module: Module, package: Package) -> dict[str, str]:
    """Local name -> the dotted thing an import binds it to (a module of `package`, a name in
    one, or anything outside it)."""
    bound: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            origin = _origin(module, node)
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{origin}.{alias.name}"
    return bound


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but names and attributes."""
    chain: list[str] = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(chain)]


def private_uses(module: Module, package: Package) -> Iterator[Import]:
    """Private names of other modules that `module` takes: ``from veil.m import _x``, and
    ``veil.m._x`` through a name an import bound."""
    for found in imports(module, package):
        if found.name is not None and _is_private(found.name) and found.target != module.name:
            yield found
    bound = _bindings(module, package)
    for node in _nodes(module.tree):
        chain = _dotted(node) if isinstance(node, ast.Attribute) else None
        if chain is None or chain[0] not in bound:
            continue
        dotted = ".".join([bound[chain[0]], *chain[1:]])
        owner = _owning_module(dotted, package)
        if owner is None or owner == module.name or dotted == owner:
            continue
        name = dotted[len(owner) + 1 :].split(".")[0]
        if _is_private(name):
            yield Import(module.name, owner, name, node.lineno)


def import_graph(package: Package) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, module in package.items():
        edges = graph.setdefault(name, {})
        for found in imports(module, package):
            if found.target != name:
                edges.setdefault(found.target, found.line)
    return graph


def find_cycle(graph: Mapping[str, Mapping[str, int]]) -> list[str] | None:
    """One cycle of `graph` as a closed chain ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # Depth-first, without recursion; each frame is (node, its successors not yet seen).
        path, on_path = [start], {start}
        stack = [(start, iter(sorted(graph[start])))]
        while stack:
            node, successors = stack[-1]
            following = next(successors, None)
            if following is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif following in on_path:
                return [*path[path.index(following) :], following]
            elif following not in done:
                stack.append((following, iter(sorted(graph.get(following, {})))))
                path.append(following)
                on_path.add(following)
    return None


def describe_cycle(cycle: list[str], graph: Mapping[str, Mapping[str, int]]) -> str:
    """``a (line 3) -> b (line 9) -> a``: each module with the line of its import of the next."""
    hops = [f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)]
    return " -> ".join([*hops, cycle[-1]])


# -- exception classes ---------------------------------------------------------------------

#: A class of the package: (module, class name).
ClassId = tuple[str, str]


def _classes(module: Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in ast.walk(module.tree) if isinstance(node, ast.ClassDef)}


def _resolve(dotted: str, package: Package, seen: frozenset[str] = frozenset()) -> ClassId | str:
    """The class `dotted` names: a class of `package`, or else the dotted name outside it
    (``builtins.ValueError``, ``grpc.RpcError``), following re-exports."""
    owner = _owning_module(dotted, package)
    if owner is None or dotted == owner or dotted in seen:
        return dotted
    rest = dotted[len(owner) + 1 :].split(".")
    module = package[owner]
    if rest[0] in _classes(module):
        return (owner, rest[0])
    bound = _bindings(module, package)
    if rest[0] in bound:
        return _resolve(".".join([bound[rest[0]], *rest[1:]]), package, seen | {dotted})
    return dotted


def _base(node: ast.expr, module: Module, package: Package) -> ClassId | str:
    chain = _dotted(node)
    if chain is None:
        return ast.unparse(node)
    if len(chain) == 1 and chain[0] in _classes(module):
        return (module.name, chain[0])
    bound = _bindings(module, package)
    if chain[0] in bound:
        return _resolve(".".join([bound[chain[0]], *chain[1:]]), package)
    return ".".join(["builtins", *chain]) if len(chain) == 1 else ".".join(chain)


def class_bases(package: Package) -> dict[ClassId, list[ClassId | str]]:
    """Every class of `package` and its direct bases, resolved."""
    return {
        (name, cls.name): [_base(b, module, package) for b in cls.bases]
        for name, module in package.items()
        for cls in _classes(module).values()
    }


def _is_exception_root(base: str) -> bool:
    """Whether a base from outside the package is an exception (that is not only a
    BaseException such as KeyboardInterrupt). Third-party bases are judged by their name, so
    that no library needs importing."""
    module, _, name = base.rpartition(".")
    if module == "builtins":
        found = getattr(builtins, name, None)
        return isinstance(found, type) and issubclass(found, Exception)
    return name.endswith(("Error", "Exception"))


def exceptions_outside_the_tree(package: Package) -> list[str]:
    """``module.Class`` of every exception class of `package` that does not derive from
    `veil.errors.VeilError`."""
    bases = class_bases(package)

    @functools.cache
    def ancestors(cls: ClassId) -> frozenset[ClassId | str]:
        found: set[ClassId | str] = set()
        for base in bases.get(cls, []):
            found.add(base)
            if isinstance(base, tuple) and base != cls:
                found |= ancestors(base)
        return frozenset(found)

    outside = []
    for cls in sorted(bases):
        lineage = ancestors(cls)
        roots = [b for b in lineage if isinstance(b, str) and _is_exception_root(b)]
        if roots and VEIL_ERROR not in lineage and cls != VEIL_ERROR:
            outside.append(f"{cls[0]}.{cls[1]} (from {', '.join(sorted(roots))})")
    return outside


# -- the package -----------------------------------------------------------------------------


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph(veil())
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe_cycle(cycle, graph)}"


def test_no_module_imports_a_private_name_of_another() -> None:
    package = veil()
    found = sorted(
        {(u.source, u.target, u.name) for m in package.values() for u in private_uses(m, package)},
        key=str,
    )
    assert not found, f"private names imported from another module (make them public): {found}"


def test_privacy_mechanisms_do_not_import_the_config() -> None:
    package = veil()
    found = sorted(
        name
        for name, module in package.items()
        if name.startswith("veil.privacy.")
        and any(
            use.target == "veil.config" or use.target.startswith("veil.config.")
            for use in imports(module, package)
        )
    )
    assert not found, f"veil/privacy modules that import veil.config (pass plain values): {found}"


def test_every_exception_derives_from_veil_error() -> None:
    package = veil()
    assert VEIL_ERROR in class_bases(package), "veil.errors.VeilError is gone"
    outside = exceptions_outside_the_tree(package)
    assert not outside, (
        f"exceptions outside the VeilError tree (derive from veil.errors.VeilError too, keeping "
        f"a builtin base that callers catch): {outside}"
    )


# -- the checks themselves, on a package written for them -------------------------------------

SAMPLE = {
    "veil/__init__.py": "",
    "veil/errors.py": "class VeilError(Exception):\n    pass\n",
    "veil/a.py": (
        "from typing import TYPE_CHECKING\n"
        "import grpc\n"
        "from veil.errors import VeilError\n"
        "if TYPE_CHECKING:\n"
        "    from veil import c\n"
        "class Good(VeilError, ValueError):\n    pass\n"
        "class Stray(RuntimeError):\n    pass\n"
        "class Rpc(grpc.RpcError):\n    pass\n"
        "class Stop(KeyboardInterrupt):\n    pass\n"
        "def later():\n"
        "    from veil.b import helper\n"
    ),
    "veil/b.py": (
        "import veil.a\n"
        "from veil import errors as e\n"
        "from veil.a import Good\n"
        "class Child(Good):\n    pass\n"
        "class Other(e.VeilError):\n    pass\n"
        "def helper():\n"
        "    return veil.a._hidden\n"
    ),
    "veil/c.py": "from veil.a import _secret, Stray\nclass Deeper(Stray):\n    pass\n",
}


def sample(tmp_path: Path, **changes: str) -> dict[str, Module]:
    for name, text in {**SAMPLE, **changes}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return parse_package(tmp_path)


def test_a_cycle_through_a_function_level_import_is_found_and_type_checking_is_not(
    tmp_path: Path,
) -> None:
    package = sample(tmp_path)
    graph = import_graph(package)
    assert find_cycle(graph) == ["veil.a", "veil.b", "veil.a"]
    assert describe_cycle(["veil.a", "veil.b", "veil.a"], graph) == (
        "veil.a (line 15) -> veil.b (line 1) -> veil.a"
    )
    assert "veil.c" not in graph["veil.a"]  # imported under TYPE_CHECKING only
    quiet = sample(tmp_path / "quiet", **{"veil/b.py": "from veil.errors import VeilError\n"})
    assert find_cycle(import_graph(quiet)) is None


def test_private_names_are_found_by_import_and_by_attribute(tmp_path: Path) -> None:
    package = sample(tmp_path)
    found = {
        (u.source, u.target, u.name) for m in package.values() for u in private_uses(m, package)
    }
    assert found == {("veil.c", "veil.a", "_secret"), ("veil.b", "veil.a", "_hidden")}


def test_exceptions_outside_the_tree_are_found_through_inheritance_and_aliases(
    tmp_path: Path,
) -> None:
    outside = exceptions_outside_the_tree(sample(tmp_path))
    assert outside == [
        "veil.a.Rpc (from grpc.RpcError)",
        "veil.a.Stray (from builtins.RuntimeError)",
        "veil.c.Deeper (from builtins.RuntimeError)",
    ]


# -- function length (issue 21) ----------------------------------------------------------------

#: The most lines a function of `veil` may span, from its ``def`` line to its last line
#: (docstring included, decorators not). Generated modules (``*_pb2*.py``) are not checked.
MAX_FUNCTION_LINES = 80


def _functions(
    node: ast.AST, prefix: str = ""
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function under `node` with its qualified name (``Class.method``, ``outer.inner``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}{child.name}", child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


def long_functions(package: Package, limit: int = MAX_FUNCTION_LINES) -> dict[tuple[str, str], int]:
    """(module, qualified name) -> lines, for every function of `package` over `limit` lines
    outside generated modules."""
    found: dict[tuple[str, str], int] = {}
    for name, module in package.items():
        if "_pb2" in module.path.name:  # generated: *_pb2.py, *_pb2_grpc.py
            continue
        for qualname, node in _functions(module.tree):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit:
                key = (name, qualname)
                found[key] = max(lines, found.get(key, 0))
    return found


def test_no_function_is_over_80_lines() -> None:
    found = sorted(f"{m}.{f} ({n} lines)" for (m, f), n in long_functions(veil()).items())
    assert not found, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {found}"
    )


def test_long_functions_are_found_in_classes_and_nested_and_generated_code_is_not(
    tmp_path: Path,
) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(79))  # with the def line: 80 lines
    package = sample(
        tmp_path,
        **{
            "veil/long.py": (
                f"def fits():\n{body}"
                f"def over():\n{body}    return x0\n"
                "class C:\n"
                "    async def method(self):\n"
                + "".join(f"    {line}" for line in body.splitlines(keepends=True))
                + "        return x0\n"
                "def outer():\n"
                "    def inner():\n"
                + "".join(f"    {line}" for line in body.splitlines(keepends=True))
                + "        return x0\n"
                "    return inner\n"
            ),
            "veil/service_pb2_grpc.py": f"def generated():\n{body}    return x0\n",
        },
    )
    assert long_functions(package) == {
        ("veil.long", "over"): 81,
        ("veil.long", "C.method"): 81,
        ("veil.long", "outer"): 83,
        ("veil.long", "outer.inner"): 81,
    }
