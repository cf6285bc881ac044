"""A property of the kernel modules' source that CI's torch cannot check by running them."""

import re
from pathlib import Path

TRITON_DIR = Path(__file__).resolve().parents[2] / "src" / "megalodon" / "ops" / "triton"


def test_custom_op_modules_keep_real_annotations():
    """torch < 2.5 builds a custom op's schema from its annotations and cannot read the strings that
    `from __future__ import annotations` makes of them: with it, the ops fail to register at import on torch 2.4
    (the package's minimum), which CI's newer torch would not notice."""
    modules = [p for p in sorted(TRITON_DIR.glob("*.py")) if "@opaque_op(" in p.read_text()]
    assert len(modules) >= 3, modules
    for path in modules:
        assert not re.search(r"^from __future__ import annotations", path.read_text(), re.MULTILINE), path.name
