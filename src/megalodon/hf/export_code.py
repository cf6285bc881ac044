"""Inline a package's modules into one self-contained source file: the build step behind the HF export.

`bundle(roots, recipe)` follows the module-level imports of `roots` inside the package, orders the modules so
that each comes after what it imports, and writes them one after another into a single namespace:
- the package's own imports disappear (their names are now globals of the same file); a lazy import inside a
  function becomes an alias, or, when its module is not bundled, a `raise ImportError(...)`;
- external imports are gathered, deduplicated, at the top;
- a module-level name bound by two modules (or shadowing a builtin another module uses) is renamed
  `<name>__<module>` in the later one, at every place that refers to it and nowhere else (scopes.py);
- `recipe.substitutes` swaps a module's source for another's (a pure-PyTorch stand-in for the Triton dispatch);
- definitions decorated with `package_only` are left out, and so are imports of `recipe.dropped` modules.
The result is checked: it compiles, imports nothing of the package, and reads no name it does not define.
Comments and formatting are kept: edits are spliced into the original text, never re-printed from the AST.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megalodon.hf.scopes import (bound_names, declared_globals, global_name_nodes, module_level_statements,
                                 undefined_globals)
from megalodon.hf.source_edits import EditError, SourceEdits

DROP_DECORATOR = "package_only"


def package_only(definition):
    """Marks a function or class that exists only in the installed package: the exported code leaves it out."""
    return definition


class ExportError(RuntimeError):
    """The package's sources cannot be inlined as they are; the message names the module and the construct."""


@dataclass(frozen=True)
class Recipe:
    package: str  # the top-level package whose modules are inlined, e.g. "megalodon"
    root: Path  # its directory
    substitutes: dict[str, str] = field(default_factory=dict)  # module -> module whose source stands in for it
    dropped: frozenset[str] = frozenset()  # modules whose imports are removed; their names must go unused


@dataclass
class Bundle:
    source: str
    modules: list[str]  # in the order they were written
    exports: dict[tuple[str, str], str]  # (module, name) -> the name it has in this file


@dataclass
class _Module:
    name: str
    path: Path
    text: str
    tree: ast.Module
    bindings: list[tuple[str, tuple]] = field(default_factory=list)  # (name, identity) in source order
    renames: dict[str, str] = field(default_factory=dict)
    typing_only: set[int] = field(default_factory=set)  # ids of imports under `if TYPE_CHECKING:` (never run)


def bundle(roots: list[str], recipe: Recipe, header: str, provided: tuple[str, Bundle] | None = None) -> Bundle:
    """One source file holding `roots` and every package module they import at module level.

    header: the file's docstring; the list of inlined modules is appended to it.

    provided: (relative module name, Bundle) already written beside this file; its modules are imported from it
    (`from .<name> import ...`) instead of being inlined a second time.
    """
    return _Bundler(recipe, provided).run(roots, header)


class _Bundler:
    def __init__(self, recipe: Recipe, provided: tuple[str, Bundle] | None):
        self.recipe = recipe
        self.provided_module, self.provided = provided if provided else ("", None)
        self.modules: dict[str, _Module] = {}
        self.order: list[_Module] = []
        self.identity_name: dict[tuple, str] = {}  # identity -> name in the bundle
        self.external: dict[tuple, set[str]] = {}  # ("ext", module, attr) -> plain `import a.b` paths it covers
        self.unavailable: set[str] = set()  # names bound only by imports replaced with a raise

    # ---- finding modules -------------------------------------------------------------------------------------
    def locate(self, name: str) -> Path | None:
        parts = name.split(".")
        base = self.recipe.root.joinpath(*parts[1:])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def kind(self, target: str) -> str:
        """"provided", "dropped", "unavailable" (behind a substituted module) or "bundle"."""
        if self.provided and target in self.provided.modules:
            return "provided"
        if target in self.recipe.dropped:
            return "dropped"
        if any(target.startswith(s + ".") for s in self.recipe.substitutes):
            return "unavailable"
        return "bundle"

    def absolute(self, module: _Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module.name.split(".")
        if module.path.name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        return ".".join(package + ([node.module] if node.module else []))

    def is_ours(self, name: str) -> bool:
        return name == self.recipe.package or name.startswith(self.recipe.package + ".")

    def imports_ours(self, module: _Module, node: ast.Import | ast.ImportFrom) -> bool:
        if isinstance(node, ast.Import):
            return any(self.is_ours(alias.name) for alias in node.names)
        return self.is_ours(self.absolute(module, node))

    def load(self, name: str, chain: tuple[str, ...] = ()) -> _Module:
        if name in self.modules:
            return self.modules[name]
        if name in chain:
            raise ExportError("module-level import cycle: " + " -> ".join(chain + (name,)))
        path = self.locate(self.recipe.substitutes.get(name, name))
        if path is None:
            raise ExportError(f"cannot find the source of {name} (imported by {chain[-1] if chain else 'the roots'})")
        text = path.read_text(encoding="utf-8")
        module = _Module(name, path, text, ast.parse(text, str(path)))
        module.typing_only = _type_checking_imports(module.tree)
        for statement in module_level_statements(module.tree):
            if id(statement) in module.typing_only:
                continue
            if isinstance(statement, ast.Import) and any(self.is_ours(a.name) for a in statement.names):
                raise ExportError(f"{name}: `import {statement.names[0].name}` at module level; the export inlines "
                                  "only `from <module> import <names>`")
            if isinstance(statement, ast.ImportFrom) and self.is_ours(self.absolute(module, statement)):
                target = self.absolute(module, statement)
                self.check_names_not_modules(name, target, statement)
                if self.kind(target) == "unavailable":
                    raise ExportError(f"{name} imports {target} at module level; kernels behind a substituted "
                                      "module must be imported lazily, inside the function that uses them")
                if self.kind(target) == "bundle":
                    self.load(target, chain + (name,))
        self.modules[name] = module
        self.order.append(module)
        return module

    def check_names_not_modules(self, name: str, target: str, statement: ast.ImportFrom) -> None:
        for alias in statement.names:
            if self.locate(f"{target}.{alias.name}") is not None:
                raise ExportError(f"{name} imports the module {target}.{alias.name} as a name; the export inlines "
                                  "names, not module objects: import the names it uses instead")

    # ---- names -------------------------------------------------------------------------------------------
    def origin(self, importer: str, target: str, name: str) -> tuple:
        kind = self.kind(target)
        if kind == "dropped":
            return ("dropped", target, name)
        if kind == "provided":
            if (target, name) not in self.provided.exports:
                raise ExportError(f"{importer} imports {name} from {target}, which does not define it")
            return ("provided", self.provided.exports[(target, name)])
        for bound, identity in self.modules[target].bindings:
            if bound == name:
                return identity
        raise ExportError(f"{importer} imports {name} from {target}, which does not define it"
                          + (f" (its export stand-in is {self.recipe.substitutes[target]})"
                             if target in self.recipe.substitutes else ""))

    def collect_bindings(self, module: _Module) -> None:
        top = set(map(id, module.tree.body))
        for statement in module_level_statements(module.tree):
            if id(statement) in module.typing_only or (isinstance(statement, ast.ImportFrom)
                                                       and statement.module == "__future__"):
                continue
            if isinstance(statement, ast.ImportFrom) and self.is_ours(self.absolute(module, statement)):
                target = self.absolute(module, statement)
                for alias in statement.names:
                    module.bindings.append((alias.asname or alias.name, self.origin(module.name, target,
                                                                                      alias.name)))
            elif isinstance(statement, (ast.Import, ast.ImportFrom)) and id(statement) in top:
                for alias in statement.names:
                    if isinstance(statement, ast.ImportFrom):
                        identity = ("ext", statement.module, alias.name)
                    elif alias.asname:
                        identity = ("ext", alias.name, None)
                    else:  # `import a.b` binds `a`
                        identity = ("ext", alias.name.split(".")[0], None)
                    self.external.setdefault(identity, set()).add(alias.name if not alias.asname else "")
                    module.bindings.append((alias.asname or alias.name.split(".")[0], identity))
            elif not _is_dunder_all(statement):
                module.bindings.extend((n, ("def", module.name, n)) for n in bound_names(statement))

    def assign_names(self) -> None:
        bound_here = {m.name: {n for n, _ in m.bindings} for m in self.order}
        reserved = {node.id for m in self.order for node in global_name_nodes(m.tree)
                    if node.id not in bound_here[m.name]}  # builtins some module relies on
        taken: dict[str, tuple] = {}
        for module in self.order:
            tag = module.name.rsplit(".", 1)[-1]
            for name, identity in module.bindings:
                if identity[0] == "dropped":
                    continue
                if identity not in self.identity_name:
                    chosen, suffix = name, 1
                    while chosen in taken or chosen in reserved:
                        chosen = f"{name}__{tag}" + (str(suffix) if suffix > 1 else "")
                        suffix += 1
                    taken[chosen] = identity
                    self.identity_name[identity] = chosen
                if self.identity_name[identity] != name:
                    module.renames[name] = self.identity_name[identity]
            clash = declared_globals(module.tree) & set(module.renames)
            if clash:
                raise ExportError(f"{module.name} assigns {sorted(clash)} through `global`, and another module "
                                  "binds the same name(s): rename one of them")

    # ---- rewriting -------------------------------------------------------------------------------------------
    def rewrite(self, module: _Module) -> str:
        edits = SourceEdits(module.text)
        sole = _sole_statements(module.tree)
        top = set(map(id, module.tree.body))
        for index, statement in enumerate(module.tree.body):
            docstring = index == 0 and isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            imports = isinstance(statement, (ast.Import, ast.ImportFrom))
            if docstring or imports or _is_dunder_all(statement):
                edits.remove_lines(statement)
        for node in ast.walk(module.tree):
            if id(node) in module.typing_only and self.imports_ours(module, node):
                edits.replace(node, "pass" if id(node) in sole else "")
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                renamed = set(bound_names(node)) & set(module.renames)
                if renamed and node in module_level_statements(module.tree):
                    raise ExportError(f"{module.name} binds {sorted(renamed)} by an import inside a module-level "
                                      "block, and another module binds the same name(s): rename one of them")
                replacement = self.inner_import(module, node)
                if replacement is not None:
                    edits.replace(node, replacement or ("pass" if id(node) in sole else ""))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and any(
                    _decorator_name(d) == DROP_DECORATOR for d in node.decorator_list):
                edits.remove_lines(node, first_line=node.decorator_list[0].lineno,
                                   keep_pass=id(node) in sole)
        for node in global_name_nodes(module.tree):
            if node.id in module.renames:
                edits.rename(node.lineno, node.col_offset, node.id, module.renames[node.id])
        for statement in module_level_statements(module.tree):
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    statement.name in module.renames:
                edits.rename_definition(statement, module.renames[statement.name])
        return edits.apply()

    def inner_import(self, module: _Module, node: ast.Import | ast.ImportFrom) -> str | None:
        """What replaces an import inside a function (None: leave it); module-level ones are handled apart."""
        if isinstance(node, ast.Import):
            if not any(self.is_ours(a.name) for a in node.names):
                return None
            return self.unavailable_import(node.names[0].name, [a.asname or a.name.split(".")[0]
                                                                for a in node.names])
        target = self.absolute(module, node)
        if not self.is_ours(target):
            return None
        if target in self.modules or self.kind(target) == "provided":
            aliases = []
            for alias in node.names:
                local = alias.asname or alias.name
                name = self.identity_name.get(self.origin(module.name, target, alias.name))
                if name is None:
                    return self.unavailable_import(target, [local])
                if name != local:
                    aliases.append(f"{local} = {name}")
            return "; ".join(aliases)
        return self.unavailable_import(target, [alias.asname or alias.name for alias in node.names])

    def unavailable_import(self, target: str, names: list[str]) -> str:
        self.unavailable.update(names)
        return f"raise ImportError({target + ' is not part of this exported code'!r})"

    # ---- the file --------------------------------------------------------------------------------------------
    def run(self, roots: list[str], header: str) -> Bundle:
        for root in roots:
            self.load(root)
        for module in self.order:
            self.collect_bindings(module)
        self.assign_names()
        sections = [self.section(module) for module in self.order]
        listed = "".join(f"- {m.name}\n" for m in self.order)
        docstring = f'"""{header.strip()}\n\nInlined from these modules, in this order:\n{listed}"""\n'
        source = "\n\n".join([docstring + "\nfrom __future__ import annotations", self.imports()] + sections)
        source += "\n"
        self.check(source)
        exports = {(m.name, n): self.identity_name[i] for m in self.order for n, i in m.bindings if i[0] != "dropped"}
        return Bundle(source, [m.name for m in self.order], exports)

    def section(self, module: _Module) -> str:
        relative = module.path.relative_to(self.recipe.root.parent).as_posix()
        banner = f"# ---- {relative}"
        if module.name in self.recipe.substitutes:
            banner += f", in place of {module.name}"
        banner += " " + "-" * max(4, 116 - len(banner))
        doc = ast.get_docstring(module.tree)
        comment = "".join(f"# {line}".rstrip() + "\n" for line in doc.splitlines()) if doc else ""
        try:
            body = self.rewrite(module)
        except EditError as err:
            raise ExportError(f"{module.name}: {err}") from None
        return banner + "\n" + comment + "\n" + body.strip("\n")

    def imports(self) -> str:
        plain, grouped, provided = [], {}, []
        for identity, name in self.identity_name.items():
            if identity[0] == "provided":
                provided.append(identity[1] if identity[1] == name else f"{identity[1]} as {name}")
            elif identity[0] == "ext" and identity[2] is None:
                module = identity[1]
                for path in self.external[identity]:  # "" for `import module as name`, else `import path`
                    if path and path != module and name != module:
                        raise ExportError(f"`import {path}` binds {module}, which another module binds "
                                          "differently: import it under an alias")
                    plain.append(f"import {path or module}" if name == module else f"import {module} as {name}")
            elif identity[0] == "ext":
                grouped.setdefault(identity[1], []).append(identity[2] if identity[2] == name else
                                                           f"{identity[2]} as {name}")
        froms = [f"from {m} import {', '.join(sorted(names))}" for m, names in grouped.items()]
        blocks = []
        for stdlib in (True, False):  # isort's order: standard library, then the rest; `import` before `from`
            block = [line for line in sorted(set(plain)) + sorted(froms)
                     if (_top_module(line) in sys.stdlib_module_names) == stdlib]
            if block:
                blocks.append("\n".join(_wrap(line) for line in block))
        if provided:
            blocks.append(_wrap(f"from .{self.provided_module} import {', '.join(sorted(provided))}"))
        return "\n\n".join(blocks)

    def check(self, source: str) -> None:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and node.module != self.provided_module:
                raise ExportError(f"the bundle imports .{node.module}, which is not written beside it")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(self.is_ours(n) for n in names):
                raise ExportError(f"the bundle still imports {names} (line {node.lineno})")
        missing = undefined_globals(source, "<bundle>") - self.unavailable
        if missing:
            raise ExportError(f"the bundle reads names nothing in it defines: {sorted(missing)}; a dropped "
                              f"module ({sorted(self.recipe.dropped)}) or a package_only definition is still used")


def _is_dunder_all(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                     for t in statement.targets)


def _type_checking_imports(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _decorator_name(node.test) == "TYPE_CHECKING":
            found.update(id(n) for statement in node.body for n in ast.walk(statement)
                         if isinstance(n, (ast.Import, ast.ImportFrom)))
    return found


def _decorator_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _sole_statements(tree: ast.Module) -> set[int]:
    """ids of statements that are alone in their block (removing one must leave a `pass`)."""
    sole = set()
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and len(block) == 1 and isinstance(block[0], ast.stmt):
                sole.add(id(block[0]))
    return sole


def _top_module(import_line: str) -> str:
    return import_line.split()[1].split(".")[0]


def _wrap(line: str, width: int = 120) -> str:
    if len(line) <= width or " import " not in line or not line.startswith("from "):
        return line
    head, names = line.split(" import ", 1)
    return f"{head} import (\n" + "".join(f"    {name},\n" for name in names.split(", ")) + ")"
