"""Edits spliced into a module's source text at AST positions, so that everything else (comments, layout) stays
as written. Used by export_code.py."""

from __future__ import annotations

import ast
import re


class EditError(ValueError):
    """Two edits overlap, or a position does not hold the name it should."""


class SourceEdits:
    """Text edits on one module's source, by AST positions (columns are UTF-8 byte offsets).

    Removals and replacements cover whole statements; renames cover one identifier. A rename that falls inside a
    removed statement (a package_only method, say) is skipped, and so is any edit inside a removed statement."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.statements: list[tuple[int, int, str]] = []
        self.renames: list[tuple[int, int, str]] = []

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col].decode("utf-8"))

    def remove_lines(self, node: ast.AST, first_line: int | None = None, keep_pass: bool = False) -> None:
        first = first_line or node.lineno
        indent = re.match(r"\s*", self.lines[first - 1]).group(0)
        self.statements.append((self.starts[first - 1], self.starts[node.end_lineno],
                                f"{indent}pass\n" if keep_pass else ""))

    def replace(self, node: ast.AST, text: str) -> None:
        self.statements.append((self.offset(node.lineno, node.col_offset),
                                self.offset(node.end_lineno, node.end_col_offset), text))

    def rename(self, lineno: int, col: int, old: str, new: str) -> None:
        start = self.offset(lineno, col)
        if self.text[start:start + len(old)] != old:
            raise EditError(f"position mismatch renaming {old!r} at line {lineno}")
        self.renames.append((start, start + len(old), new))

    def rename_definition(self, node: ast.AST, new: str) -> None:
        found = re.compile(r"(?:async\s+)?(?:def|class)\s+(\w+)").match(self.text, self.offset(node.lineno,
                                                                                                  node.col_offset))
        self.renames.append((found.start(1), found.end(1), new))

    def apply(self) -> str:
        edits = self.statements + self.renames
        kept = [x for x in edits if not any(s <= x[0] and x[1] <= e and (s, e) != x[:2] for s, e, _ in self.statements)]
        text, end = self.text, len(self.text)
        for start, stop, new in sorted(kept, reverse=True):
            if stop > end:
                raise EditError(f"overlapping edits at character {start} of the module")
            text, end = text[:start] + new + text[stop:], start
        text = re.sub(r"\n\n\n+(?=[ \t]+\S)", "\n\n", text)  # one blank line where an indented definition went
        return re.sub(r"\n{4,}", "\n\n\n", text)
