"""Python's name scopes, read from an AST: which names a module binds, and which Name nodes mean its globals.

The code export (export_code.py) inlines several modules into one namespace, so it must know exactly which
occurrences of a name refer to a module-level binding (to rename it when two modules bind the same name) and
which are locals, parameters or attributes that merely share the spelling. Standard library only.
"""

from __future__ import annotations

import ast
import symtable
from typing import Iterator

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def module_level_statements(tree: ast.Module) -> Iterator[ast.stmt]:
    """Every statement that runs at module level: the body, and the bodies of module-level if/try/with/for."""
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        children = []
        for field in ("body", "orelse", "finalbody"):
            children.extend(getattr(node, field, []) or [])
        for handler in getattr(node, "handlers", []) or []:
            children.extend(handler.body)
        stack.extend(reversed(children))


def _target_names(node: ast.AST) -> Iterator[str]:
    """Names that an assignment target binds (tuples and starred targets unpacked; attributes bind nothing)."""
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, (ast.Tuple, ast.List)):
        for element in node.elts:
            yield from _target_names(element)
    elif isinstance(node, ast.Starred):
        yield from _target_names(node.value)


def bound_names(statement: ast.stmt) -> list[str]:
    """Names a single statement binds in the scope it runs in (not inside nested functions or classes)."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return [alias.asname or alias.name.split(".")[0] for alias in statement.names]
    targets: list[ast.AST] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
        targets = [statement.target]
    elif isinstance(statement, (ast.For, ast.AsyncFor)):
        targets = [statement.target]
    elif isinstance(statement, (ast.With, ast.AsyncWith)):
        targets = [item.optional_vars for item in statement.items if item.optional_vars is not None]
    elif isinstance(statement, ast.Try):
        return [handler.name for handler in statement.handlers if handler.name]
    return [name for target in targets for name in _target_names(target)]


def _function_locals(node: ast.AST) -> set[str]:
    """Names local to a function, lambda or comprehension scope (its parameters and what its body binds)."""
    names: set[str] = set()
    if isinstance(node, _FUNCTIONS):
        args = node.args
        for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if arg is not None:
                names.add(arg.arg)
        body = node.body if isinstance(node.body, list) else [node.body]
    else:  # a comprehension: its loop targets
        for generator in node.generators:
            names.update(_target_names(generator.target))
        return names
    declared_global: set[str] = set()
    stack = list(body)
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.Global, ast.Nonlocal)):
            declared_global.update(child.names)
        elif isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Store, ast.Del)):
            names.add(child.id)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(child.name)
            stack.extend(child.decorator_list)  # evaluated here; the body is another scope
            continue
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            names.update(bound_names(child))
        elif isinstance(child, ast.ExceptHandler) and child.name:
            names.add(child.name)
        elif isinstance(child, (ast.MatchAs, ast.MatchStar)) and child.name:
            names.add(child.name)
        elif isinstance(child, ast.MatchMapping) and child.rest:
            names.add(child.rest)
        if isinstance(child, _FUNCTIONS + _COMPREHENSIONS):
            continue  # their own scopes (a walrus inside a comprehension is too rare here to model)
        stack.extend(ast.iter_child_nodes(child))
    return names - declared_global


def global_name_nodes(tree: ast.Module) -> Iterator[ast.Name]:
    """Every Name node that refers to a module-level binding (or a builtin), in any scope of the module."""

    def visit(node: ast.AST, shadowed: frozenset[str], class_locals: frozenset[str]) -> Iterator[ast.Name]:
        if isinstance(node, ast.Name):
            if node.id not in shadowed and node.id not in class_locals:
                yield node
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            outer = [*getattr(node, "decorator_list", []), *node.args.defaults,
                     *(d for d in node.args.kw_defaults if d is not None)]
            if not isinstance(node, ast.Lambda):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
                outer += [a.annotation for a in arguments if a.annotation is not None]
                outer += [node.returns] if node.returns is not None else []
            for child in outer:
                yield from visit(child, shadowed, class_locals)
            inner = shadowed | _function_locals(node)
            for child in (node.body if isinstance(node.body, list) else [node.body]):
                yield from visit(child, inner, frozenset())
            return
        if isinstance(node, ast.ClassDef):
            for child in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
                yield from visit(child, shadowed, class_locals)
            own = frozenset(name for statement in node.body for name in bound_names(statement))
            for statement in node.body:
                yield from visit(statement, shadowed, own)
            return
        if isinstance(node, _COMPREHENSIONS):
            first, *rest = node.generators
            yield from visit(first.iter, shadowed, class_locals)
            inner = shadowed | _function_locals(node)
            for child in [first.target, *first.ifs, *rest]:
                yield from visit(child, inner, frozenset())
            elements = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            for child in elements:
                yield from visit(child, inner, frozenset())
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, shadowed, class_locals)

    for statement in tree.body:
        yield from visit(statement, frozenset(), frozenset())


def declared_globals(tree: ast.Module) -> set[str]:
    """Names that some function declares `global` (assigned from inside a function: not renamable here)."""
    return {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}


def undefined_globals(source: str, filename: str) -> set[str]:
    """Global names that some scope of `source` reads but that neither the module nor the builtins define."""
    import builtins

    top = symtable.symtable(source, filename, "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    defined |= set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__package__"}
    used: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for symbol in table.get_symbols():
            at_top = table is top and symbol.is_referenced()
            if at_top or (table is not top and symbol.is_global() and symbol.is_referenced()):
                used.add(symbol.get_name())
    return used - defined
