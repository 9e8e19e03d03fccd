"""The shape of pushsvc/: no import cycle, imports only in the allowed directions, and no
library internal touched outside pushsvc/compat.py.

Everything is read from the source with ``ast``: every import counts,
including those under ``if TYPE_CHECKING:`` and inside functions (a cycle
hidden in a function is still a cycle in the design).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pushsvc"

# Who may import the node: the frontends, the command model and the plugin that wires them.
NODE_USERS = {
    "pushsvc.backend",
    "pushsvc.commands",
    "pushsvc.http",
    "pushsvc.tap",
    "pushsvc.websocket",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def sources() -> dict[str, ast.Module]:
    """Every module of pushsvc/, parsed."""
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def imports_of(name: str, tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(module, imported names) for every import statement anywhere in ``tree``.

    Relative imports are resolved; ``from package import module`` yields the module.
    """
    modules = sources()
    is_package = any(other.startswith(name + ".") for other in modules)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{base}.{n}" in modules]
            for sub in submodules:
                yield f"{base}.{sub}", []
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                yield base, rest


@cache
def graph() -> dict[str, set[str]]:
    """Module -> the pushsvc modules it imports."""
    modules = sources()
    return {
        name: {target for target, _ in imports_of(name, tree) if target in modules} - {name}
        for name, tree in modules.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(edges.get(node, ())):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        on_path.discard(node)
        path.pop()
        done.add(node)
        return None

    for node in sorted(edges):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def reachable(start: str) -> set[str]:
    """Every pushsvc module that importing ``start`` may import, directly or not."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph()[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


# -- the graph ----------------------------------------------------------------------


def test_the_graph_sees_every_kind_of_import() -> None:
    edges = graph()
    assert "pushsvc.hub" in edges["pushsvc.node"]  # at the top
    assert "pushsvc.hub" in edges["pushsvc.metrics"]  # under TYPE_CHECKING only
    assert "pushsvc.broker.redis" in edges["pushsvc.tap"]  # inside a function
    assert "pushsvc.compat" in edges["pushsvc.websocket"]  # from pushsvc import compat


def test_find_cycle_names_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# -- directions -----------------------------------------------------------------------


def test_only_the_frontends_and_commands_import_the_node() -> None:
    users = {name for name, targets in graph().items() if "pushsvc.node" in targets}
    assert users <= NODE_USERS, f"imports pushsvc.node: {sorted(users - NODE_USERS)}"


def test_the_hub_imports_nothing_of_pushsvc_but_errors() -> None:
    assert graph()["pushsvc.hub"] <= {"pushsvc.errors"}, graph()["pushsvc.hub"]


def test_brokers_never_reach_the_node_or_the_hub() -> None:
    brokers = [name for name in graph() if name.startswith("pushsvc.broker.")]
    assert brokers
    wrong = {
        name: sorted(reachable(name) & {"pushsvc.node", "pushsvc.hub"})
        for name in brokers
        if reachable(name) & {"pushsvc.node", "pushsvc.hub"}
    }
    assert not wrong, f"a broker talks to its node through BrokerHandler only: {wrong}"


def test_history_never_reaches_the_node_and_takes_only_frame_from_the_hub() -> None:
    history = [name for name in graph() if name.startswith("pushsvc.history")]
    assert history
    reaching_node = [name for name in history if "pushsvc.node" in reachable(name)]
    assert not reaching_node, f"history imports the node: {reaching_node}"
    from_hub = {
        (name, tuple(names))
        for name in history
        for target, names in imports_of(name, sources()[name])
        if target == "pushsvc.hub"
    }
    # The replay gate holds and sends the hub's frames; nothing else of the hub.
    assert from_hub <= {("pushsvc.history.replay", ("Frame",))}, from_hub


# -- library internals ----------------------------------------------------------------------


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@cache
def own_private_names() -> set[str]:
    """Private names pushsvc defines itself (outside compat.py, which imitates libraries)."""
    names: set[str] = set()
    for module, tree in sources().items():
        if module == "pushsvc.compat":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if private(name)}


def library_internals(module: str, tree: ast.Module) -> Iterator[str]:
    """Places in ``tree`` that reach a private name pushsvc does not define, or a private module."""
    own = own_private_names()
    for node in ast.walk(tree):
        where = f"{module}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
            yield f"{where}: {ast.unparse(node)}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
            and node.args[1].value not in own
        ):
            yield f"{where}: {ast.unparse(node)}"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for target, names in imports_of(module, ast.Module(body=[node], type_ignores=[])):
                if target.startswith("pushsvc"):
                    continue
                hidden = [p for p in target.split(".") if private(p)]
                hidden += [n for n in names if private(n)]
                if hidden:
                    yield f"{where}: import of {target} {names or ''}".rstrip()


def test_the_internals_check_finds_what_it_is_for() -> None:
    tree = ast.parse(
        "from twisted.internet._sslverify import x\n"
        "from autobahn.util import _private\n"
        "transport._tempDataLen\n"
        "getattr(transport, '_producer', None)\n"
        "self._perMessageCompress\n"
        "self._by_uid\n"  # pushsvc's own (the hub's)
    )
    found = list(library_internals("example", tree))
    assert [line.split(": ", 1)[1] for line in found] == [
        "import of twisted.internet._sslverify ['x']",
        "import of autobahn.util ['_private']",
        "transport._tempDataLen",
        "getattr(transport, '_producer', None)",
        "self._perMessageCompress",
    ], found


def test_library_internals_only_in_compat() -> None:
    found = [
        place
        for module, tree in sources().items()
        if module != "pushsvc.compat"
        for place in library_internals(module, tree)
    ]
    assert not found, "library internals outside pushsvc/compat.py:\n" + "\n".join(found)


# Library internals pushsvc/compat.py says it wraps (its section headers name them); the
# public-looking ones too, which no underscore rule catches.
COMPAT_INTERNALS = (
    "_tempDataLen",
    "dataBuffer",
    "_writeDisconnected",
    "_producer",
    "pformat",
    "hltype",
    "hlval",
    "CONFIG_ATTRS",
    "_perMessageCompress",
    "send_queue",
    "sendCloseFrame",
    "wasClean",
)


def test_what_compat_wraps_is_used_only_through_compat() -> None:
    compat = (PACKAGE / "compat.py").read_text()
    stale = [name for name in COMPAT_INTERNALS if name not in compat]
    assert not stale, f"compat.py no longer wraps {stale}: drop them from COMPAT_INTERNALS"
    found = []
    for module, tree in sources().items():
        if module == "pushsvc.compat":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in COMPAT_INTERNALS:
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Constant) and node.value in COMPAT_INTERNALS:
                found.append(f"{module}:{node.lineno}: {node.value!r}")
    found.sort(key=lambda place: int(place.split(":")[1]))
    assert not found, "use the pushsvc.compat helper instead:\n" + "\n".join(found)


def own_private_attributes(cls: type, tree: ast.ClassDef) -> set[str]:
    """Private names a pushsvc class defines: in its body, or as self.X = ... in its methods."""
    names = {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return {name for name in names if private(name)}


def test_no_subclass_reuses_a_private_name_of_its_library_base() -> None:
    """A private name shared with a library base class is that library's internal, reused.

    The library's own methods read and write it too; its next release may
    give it another meaning.
    """
    clashes = []
    for module, tree in sources().items():
        loaded = importlib.import_module(module)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef) or module == "pushsvc.compat":
                continue
            cls = getattr(loaded, node.name, None)
            if not inspect.isclass(cls):
                continue  # a class defined inside a function
            libraries = [
                base
                for base in cls.__mro__[1:]
                if base.__module__.split(".")[0] not in ("pushsvc", "builtins", "typing")
            ]
            for name in sorted(own_private_attributes(cls, node)):
                owner = next((base for base in libraries if name in dir(base)), None)
                if owner is not None:
                    clashes.append(
                        f"{module}.{node.name}.{name} is also "
                        f"{owner.__module__}.{owner.__qualname__}.{name}"
                    )
    assert not clashes, "\n".join(clashes)
