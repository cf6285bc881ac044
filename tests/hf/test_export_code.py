"""The code export's inliner (megalodon/hf/export_code.py) on small packages written here, then on megalodon.

Each synthetic package exercises one thing a real package does: two modules binding the same name, a local that
shares a global's spelling, a builtin that another module shadows, lazy imports, a substituted module.
"""

import ast
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

from megalodon.hf.export_code import ExportError, Recipe, bundle  # noqa: E402
from megalodon.hf.remote_code import build_remote_code  # noqa: E402
from megalodon.hf.scopes import undefined_globals  # noqa: E402


def _package(tmp_path, files: dict[str, str], **recipe) -> Recipe:
    root = tmp_path / "pkg"
    for name, source in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return Recipe(package="pkg", root=root, **recipe)


def _run(source: str) -> dict:
    namespace = {"__name__": "bundled"}
    exec(compile(source, "<bundle>", "exec"), namespace)
    return namespace


def test_names_bound_by_two_modules_are_renamed_where_they_are_globals(tmp_path):
    recipe = _package(tmp_path, {
        "a.py": """
            SCALE = 2

            def _check(x):
                return x * SCALE
            """,
        "b.py": """
            from pkg.a import _check as check_a

            SCALE = 10  # a second SCALE, and a second _check

            def _check(x):
                return x + SCALE

            def combined(x, SCALE=1000):  # a parameter spelled like the global stays a parameter
                inner = [SCALE for _check in range(1)]  # so does a comprehension variable
                return check_a(x), _check(x), inner[0], SCALE
            """,
    })
    result = bundle(["pkg.b"], recipe, "test bundle")
    assert result.modules == ["pkg.a", "pkg.b"]
    assert _run(result.source)["combined"](3) == (6, 13, 1000, 1000)
    assert result.exports[("pkg.b", "_check")] == "_check__b" and result.exports[("pkg.a", "_check")] == "_check"
    assert "# a second SCALE, and a second _check" in result.source  # comments survive


def test_a_definition_that_shadows_a_builtin_another_module_uses_is_renamed(tmp_path):
    recipe = _package(tmp_path, {
        "a.py": "def total(xs):\n    return sum(xs)\n",
        "b.py": "from pkg.a import total\n\ndef sum(x):\n    return -x\n\n"
                "def both(xs):\n    return total(xs), sum(1)\n",
    })
    assert _run(bundle(["pkg.b"], recipe, "t").source)["both"]([1, 2]) == (3, -1)


def test_lazy_imports_become_aliases_or_a_raise(tmp_path):
    recipe = _package(tmp_path, {
        "a.py": "VALUE = 7\n",
        "heavy.py": "import not_installed_anywhere\n",
        "b.py": """
            from pkg.a import VALUE

            def aliased():
                from pkg.a import VALUE as v
                return v

            def unavailable():
                from pkg.heavy import thing
                return thing
            """,
    })
    result = bundle(["pkg.b"], recipe, "t")
    namespace = _run(result.source)
    assert namespace["aliased"]() == 7
    with pytest.raises(ImportError, match="pkg.heavy is not part of this exported code"):
        namespace["unavailable"]()
    assert "not_installed_anywhere" not in result.source


def test_imports_for_type_checkers_only_create_no_cycle(tmp_path):
    recipe = _package(tmp_path, {
        "a.py": """
            from __future__ import annotations

            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from pkg.b import Holder

            def unwrap(holder: Holder) -> int:
                return holder.value
            """,
        "b.py": """
            from pkg.a import unwrap

            class Holder:
                value = 4

            def run():
                return unwrap(Holder())
            """,
    })
    result = bundle(["pkg.b"], recipe, "t")
    assert result.modules == ["pkg.a", "pkg.b"] and _run(result.source)["run"]() == 4


def test_substitutes_dropped_modules_and_package_only_definitions(tmp_path):
    recipe = _package(tmp_path, {
        "kernels/__init__.py": "import triton_like\n\ndef fast():\n    return True\n",
        "kernels/scan.py": "def scan():\n    return 'kernel'\n",
        "stub.py": "def fast():\n    return False\n",
        "tools.py": "def package_only(f):\n    return f\n",
        "ops.py": """
            from pkg.kernels import fast
            from pkg.tools import package_only

            def run():
                if fast():
                    from pkg.kernels.scan import scan
                    return scan()
                return "pytorch"

            class Model:
                @package_only
                def save(self):
                    from pkg.tools import helper
                    return helper()

                def name(self):
                    return "model"
            """,
    }, substitutes={"pkg.kernels": "pkg.stub"}, dropped=frozenset({"pkg.tools"}))
    result = bundle(["pkg.ops"], recipe, "t")
    namespace = _run(result.source)
    assert namespace["run"]() == "pytorch"
    assert not hasattr(namespace["Model"], "save") and namespace["Model"]().name() == "model"
    assert "triton_like" not in result.source and "package_only" not in result.source


def test_a_dropped_name_still_in_use_is_an_export_error(tmp_path):
    recipe = _package(tmp_path, {
        "tools.py": "def helper():\n    return 1\n",
        "ops.py": "from pkg.tools import helper\n\ndef run():\n    return helper()\n",
    }, dropped=frozenset({"pkg.tools"}))
    with pytest.raises(ExportError, match=r"reads names nothing in it defines: \['helper'\]"):
        bundle(["pkg.ops"], recipe, "t")


@pytest.mark.parametrize("source, message", [
    ("import pkg.a\n", "only `from <module> import <names>`"),
    ("from pkg import a\n", "imports the module pkg.a as a name"),
    ("from pkg.a import missing\n", "imports missing from pkg.a, which does not define it"),
    ("from pkg.kernels.scan import scan\n", "must be imported lazily"),
])
def test_constructs_the_inliner_cannot_keep_are_named(tmp_path, source, message):
    recipe = _package(tmp_path, {"a.py": "X = 1\n", "b.py": source, "kernels/__init__.py": "",
                                 "kernels/scan.py": "def scan():\n    pass\n", "stub.py": ""},
                      substitutes={"pkg.kernels": "pkg.stub"})
    with pytest.raises(ExportError, match=message):
        bundle(["pkg.b"], recipe, "t")


def test_a_second_file_imports_what_the_first_one_holds(tmp_path):
    recipe = _package(tmp_path, {"config.py": "class Config:\n    size = 3\n",
                                 "model.py": "from pkg.config import Config\n\ndef size():\n    return Config.size\n"})
    first = bundle(["pkg.config"], recipe, "t")
    second = bundle(["pkg.model"], recipe, "t", provided=("configuration_x", first))
    assert second.modules == ["pkg.model"]
    assert "from .configuration_x import Config\n" in second.source


# ---- the real export --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def remote_code():
    return {name: generated.source for name, generated in build_remote_code().items()}


def test_the_generated_files_import_only_torch_transformers_and_each_other(remote_code):
    allowed = {"torch", "transformers", "safetensors"}
    for name, source in remote_code.items():
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert (name, node.module) == ("modeling_megalodon.py", "configuration_megalodon")
                continue
            elif isinstance(node, ast.ImportFrom):
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert "megalodon" not in roots and "triton" not in roots, (name, node.lineno)
            assert roots <= allowed | set(sys.stdlib_module_names), (name, ast.unparse(node))
        assert undefined_globals(source, name) <= {"cema_scan", "CHUNK", "cema_step_kernel", "timestep_norm_triton",
                                                   "timestep_norm_step_kernel", "queries_keys_triton",
                                                   "supports_scores", "causal_softmax_fwd", "causal_softmax_bwd",
                                                   "supports_buffers", "write_and_attend_triton",
                                                   "supports_rows", "norm_rows", "norm_rows_training",
                                                   "norm_rows_backward", "silu_gate", "silu_gate_backward",
                                                   "add_linear", "add_linear_fits", "save_pretrained",
                                                   "load_pretrained"}


def test_the_generated_model_keeps_the_architecture_and_leaves_out_the_kernels(remote_code):
    model = remote_code["modeling_megalodon.py"]
    for definition in ("class Megalodon(nn.Module)", "class MegalodonForCausalLM(", "def cema_chunked(",
                       "def use_triton(op: str, *tensors: Tensor) -> bool:"):
        assert definition in model
    assert "class MegalodonHFConfig(" in remote_code["configuration_megalodon.py"]
    assert "def save_pretrained" not in model.split("class MegalodonForCausalLM(")[1]  # package_only
