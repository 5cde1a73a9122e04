"""Reading a training script without running it: where it builds or iterates a
DataLoader outside ``if __name__ == "__main__":``, and which start method it sets.

Under spawn and forkserver every worker re-imports the main script; code outside
the guard runs again there. ``nostall doctor --script`` uses this to say which
line would run again and what would happen.
"""

from __future__ import annotations

import ast
import multiprocessing
import sys
from collections.abc import Sequence
from pathlib import Path

from .._options import START_METHODS


def parse_script(script: str | Path) -> ast.Module:
    path = Path(script)
    try:
        source = path.read_text()
    except OSError as exc:
        raise ValueError(f"--script: cannot read {str(path)!r} ({exc.strerror}). Pass the path of "
                         "your training script.") from None
    try:
        return ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise ValueError(f"--script: {path} does not parse as Python: line {exc.lineno}: {exc.msg}. "
                         "Pass the training script itself (a .py file).") from None


def name_of(node: ast.AST) -> str:
    """``DataLoader`` for ``DataLoader``, ``torch.utils.data.DataLoader`` and calls of them."""
    if isinstance(node, ast.Call):
        return name_of(node.func)
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def is_loader_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and name_of(node.func) == "DataLoader"


def is_main_guard(node: ast.AST) -> bool:
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)):
        return False
    test = node.test
    sides = [test.left, *test.comparators]
    return (len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
            and any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def import_time_nodes(node: ast.AST):
    """Nodes that run when the script is imported: not in functions, not under the guard."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if is_main_guard(child):
            for stmt in child.orelse:  # the `else:` of the guard does run on import
                yield stmt
                yield from import_time_nodes(stmt)
            continue
        yield child
        yield from import_time_nodes(child)


class ScriptScan:
    """Where a script creates and iterates DataLoaders, by line."""

    def __init__(self, tree: ast.Module) -> None:
        self.loader_vars = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and is_loader_call(node.value):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                self.loader_vars.update(t.id for t in targets if isinstance(t, ast.Name))
        # For each module-level function: the line where it (or a function it calls)
        # iterates / creates a loader. A call of such a function at import time counts.
        functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.iterating: dict[str, int] = {}
        self.creating: dict[str, int] = {}
        for name, fn in functions.items():
            nodes = list(ast.walk(fn))
            if lines := self.iterations(nodes):
                self.iterating[name] = lines[0]
            if lines := [n.lineno for n in nodes if is_loader_call(n)]:
                self.creating[name] = lines[0]
        for table in (self.iterating, self.creating):
            changed = True
            while changed:  # propagate through calls between the script's own functions
                changed = False
                for name, fn in functions.items():
                    if name in table:
                        continue
                    for n in ast.walk(fn):
                        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in table:
                            table[name] = table[n.func.id]
                            changed = True
                            break

    def mentions_loader(self, expr: ast.AST) -> bool:
        """Whether ``expr`` uses a DataLoader: a ``DataLoader(...)`` call, a name assigned one,
        or (a heuristic) a name containing "loader", e.g. ``train_loader``, ``make_loader()``."""
        for n in ast.walk(expr):
            if is_loader_call(n):
                return True
            name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else ""
            if name and (name in self.loader_vars or "loader" in name.lower()):
                return True
        return False

    def iterations(self, nodes: Sequence[ast.AST]) -> list[int]:
        """Lines of ``for ... in loader``, comprehensions over it, ``iter(loader)``, ``list(loader)``."""
        lines = []
        for n in nodes:
            if isinstance(n, (ast.For, ast.AsyncFor, ast.comprehension)) and self.mentions_loader(n.iter):
                lines.append(n.iter.lineno)
            elif (isinstance(n, ast.Call) and name_of(n.func) in ("iter", "list") and n.args
                  and isinstance(n.func, ast.Name) and self.mentions_loader(n.args[0])):
                lines.append(n.lineno)
        return sorted(set(lines))


def script_start_method(script: str | Path) -> tuple[str, int] | None:
    """The start method a script sets (``set_start_method("spawn")``, ``get_context(...)``,
    ``multiprocessing_context="spawn"``) and its line, if it sets one with a literal."""
    for node in ast.walk(parse_script(script)):
        if not isinstance(node, ast.Call):
            continue
        values = []
        if name_of(node.func) in ("set_start_method", "get_context") and node.args:
            values.append(node.args[0])
        values += [k.value for k in node.keywords if k.arg == "multiprocessing_context"]
        for v in values:
            if isinstance(v, ast.Constant) and v.value in START_METHODS:
                return v.value, node.lineno
    return None


def resolve_start_method(start_method: str | None, script: str | Path | None) -> tuple[str, str]:
    """The start method to check for and where it comes from (argument, script, platform)."""
    if start_method is not None:
        if start_method not in START_METHODS:
            raise ValueError(f"--start-method must be one of {', '.join(START_METHODS)}; got {start_method!r}.")
        return start_method, "--start-method"
    if script is not None and (found := script_start_method(script)) is not None:
        return found[0], f"set in {Path(script).name} line {found[1]}"
    # The first method listed is the platform's default (fork on Linux up to Python 3.13,
    # forkserver from 3.14, spawn on macOS and Windows); this does not fix the default.
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return multiprocessing.get_all_start_methods()[0], f"Python {version}'s default on {sys.platform}"




def unguarded_uses(script: str | Path | ast.Module) -> tuple[list, list]:
    """``(starts, creates)``: ``(line, what)`` pairs for each place that iterates or
    creates a DataLoader when the script is imported (outside the ``__main__`` guard),
    directly or through a function the script calls at import time."""
    tree = script if isinstance(script, ast.Module) else parse_script(script)
    scan = ScriptScan(tree)
    nodes = list(import_time_nodes(tree))
    starts = [(line, f"line {line} iterates a DataLoader") for line in scan.iterations(nodes)]
    creates = [(n.lineno, f"line {n.lineno} creates a DataLoader") for n in nodes if is_loader_call(n)]
    for n in nodes:
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            name = n.func.id
            if name in scan.iterating:
                starts.append((n.lineno, (f"line {n.lineno} calls {name}(), which iterates a DataLoader "
                                          f"(line {scan.iterating[name]})")))
            elif name in scan.creating:
                creates.append((n.lineno, (f"line {n.lineno} calls {name}(), which creates a DataLoader "
                                           f"(line {scan.creating[name]})")))
    return starts, creates
