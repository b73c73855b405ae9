"""Fingerprints of the code a workflow stage runs: every rule records ``code_of(<stage>)`` as a parameter, so a
code edit re-runs exactly the rules whose code changed (Snakemake: "params changed") and what depends on them.

A stage is a ``varup`` subcommand (``code_of("train")``) or a module run with ``python -m`` (``"varup.bench.suite"``).
Its code, found statically with :mod:`ast` (nothing is imported): for a subcommand, its ``cmd_*`` function in
cli.py with the cli.py helpers it reaches, its block of ``build_parser``, ``main`` and cli.py's top-level
statements; then every varup module imported by these, at any depth (imports inside functions included, and the
packages above each module), and the package data files a module names (e.g. ``imagenet100.txt``). Each piece is
hashed by its syntax tree without docstrings: comments, docstrings and formatting change no fingerprint.

Imported by the Snakefile: standard library only, so ``snakemake -n`` stays fast.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # src/varup


def module_file(name: str, root: Path = PACKAGE) -> Path | None:
    """The file of varup module ``name`` (``varup.a.b`` -> root/a/b.py or root/a/b/__init__.py), else None."""
    parts = name.split(".")
    if parts[0] != "varup":
        return None
    base = root.joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _parse(path: Path) -> ast.Module:
    return _parse_text(str(path), path.read_text())


@functools.lru_cache(maxsize=None)
def _parse_text(name: str, text: str) -> ast.Module:  # keyed by the text: an edited file is parsed again
    return strip_docstrings(ast.parse(text, name))


def imported_names(nodes, package: str) -> set[str]:
    """varup modules (and candidate ``module.name`` pairs) imported anywhere in ``nodes``; ``package`` resolves
    relative imports."""
    out = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return {n for n in out if n == "varup" or n.startswith("varup.")}


def with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def module_closure(names, root: Path = PACKAGE, exclude=()) -> list[str]:
    """Every varup module reached from ``names`` through imports (sorted), without ``exclude``."""
    todo, seen = {p for n in names for p in with_parents(n)} - set(exclude), set()
    while todo:
        name = todo.pop()
        f = module_file(name, root)
        if f is None or name in seen or name in exclude:
            continue
        seen.add(name)
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        todo |= {p for n in _file_imports(str(f), f.read_text(), package) for p in with_parents(n)} - seen
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def _file_imports(path: str, text: str, package: str) -> frozenset[str]:  # keyed by the text, as _parse_text
    return frozenset(imported_names([_parse_text(path, text)], package))


def _cmd_block(parser: ast.FunctionDef, command: str) -> tuple[list[ast.stmt], str]:
    """The statements of ``build_parser`` that define ``command`` (from its ``p = cmd(...)`` to the next one, and
    the nested ``def cmd``), and the name of its handler function."""
    def cmd_call(st):
        v = getattr(st, "value", None)
        return v if isinstance(v, ast.Call) and getattr(v.func, "id", None) == "cmd" else None

    block, handler, inside = [s for s in parser.body if isinstance(s, ast.FunctionDef)], None, False
    for st in parser.body:
        call = cmd_call(st)
        if call is not None:
            inside = isinstance(call.args[0], ast.Constant) and call.args[0].value == command
            handler = call.args[1].id if inside else handler
        if inside:
            block.append(st)
    if handler is None:
        raise KeyError(f"varup has no subcommand {command!r} (cli.build_parser)")
    return block, handler


def _reached(funcs: dict[str, ast.FunctionDef], start: list[ast.AST]) -> list[ast.FunctionDef]:
    """The cli.py functions referenced by name from ``start``, transitively (build_parser and main excluded)."""
    names, todo = set(), list(start)
    while todo:
        for n in ast.walk(todo.pop()):
            if isinstance(n, ast.Name) and n.id in funcs and n.id not in names | {"build_parser", "main"}:
                names.add(n.id)
                todo.append(funcs[n.id])
    return [funcs[n] for n in sorted(names)]


def _command_section(funcs: dict[str, ast.FunctionDef], command: str) -> tuple[list[ast.stmt], str]:
    """``command``'s block in ``build_parser`` or in one of the parser's sections (``add_*_commands(cmd)``)."""
    sections = [funcs["build_parser"]] + [f for n, f in funcs.items() if n.startswith("add_") and n.endswith("_commands")]
    for section in sections:
        try:
            return _cmd_block(section, command)
        except KeyError:
            continue
    raise KeyError(f"varup has no subcommand {command!r} (cli.build_parser and its add_*_commands sections)")


def cli_pieces(command: str, root: Path = PACKAGE, tree: ast.Module | None = None) -> list[ast.AST]:
    """The parts of cli.py (or of its syntax tree ``tree``) that subcommand ``command`` runs."""
    tree = tree or _parse(root / "cli.py")
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    block, handler = _command_section(funcs, command)
    top = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
    return [*top, funcs["main"], *block, *_reached(funcs, [funcs[handler], *block])]


def strip_docstrings(node: ast.AST) -> ast.AST:
    """``node`` without its docstrings (changed in place)."""
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            n.body = body[1:] or [ast.Pass()]
    return node


@functools.lru_cache(maxsize=None)
def data_files(root: Path = PACKAGE) -> list[Path]:
    """The package's files other than Python sources (package data: class lists, reported numbers, the schema)."""
    skip = {".py", ".pyc"}
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix not in skip and "__pycache__" not in f.parts)


def digest(nodes, root: Path = PACKAGE) -> tuple[str, tuple[Path, ...]]:
    """sha256 of syntax trees (docstrings stripped by the parse), and the package data files they name in a string
    (their bytes are hashed by :func:`code_of`, which reads them every time)."""
    names = {n.value for top in nodes for n in ast.walk(top) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    h = hashlib.sha256("".join(ast.dump(n) for n in nodes).encode())
    return h.hexdigest(), tuple(f for f in data_files(root) if f.name in names)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, text: str, root: Path) -> tuple[str, tuple[Path, ...]]:  # keyed by the text
    return digest([_parse_text(path, text)], root)


@functools.lru_cache(maxsize=None)
def _cli_digest(stage: str, text: str, root: Path) -> tuple[str, tuple[Path, ...]]:  # keyed by cli.py's text
    return digest(cli_pieces(stage, root, _parse_text(str(root / "cli.py"), text)), root)


def stage_modules(stage: str, root: Path = PACKAGE) -> list[str]:
    """The varup modules whose code goes into ``code_of(stage)``; cli.py goes in by its pieces (cli_pieces)."""
    if stage.startswith("varup."):
        return module_closure([stage], root)
    names = imported_names(cli_pieces(stage, root), "varup") | {"varup.__main__"}
    return module_closure(names, root, exclude=("varup.cli",))


def code_of(stage: str, root: Path = PACKAGE) -> str:
    """The fingerprint (16 hex digits) of the code that ``varup <stage>`` (or ``python -m <stage>``) runs."""
    parts = [] if stage.startswith("varup.") else [("cli", _cli_digest(stage, (root / "cli.py").read_text(), root))]
    for name in stage_modules(stage, root):
        f = module_file(name, root)
        parts.append((name, _file_digest(str(f), f.read_text(), root)))
    h = hashlib.sha256()
    for name, (tree, files) in parts:
        h.update(name.encode() + tree.encode())
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]
