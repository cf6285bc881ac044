"""Triton's interpreter, which runs the GPU's kernels on CPU tensors in the tests, made faster without changing
what it computes. tests/conftest.py applies it; a test's subprocess gets it through helpers.interpreted_script."""

import runpy
import sys


def patch_language_once_per_launch() -> None:
    """Triton's interpreter patches triton.language (an inspect.getmembers sweep of its modules) at each kernel
    launch, and again at every call of a @triton.jit helper inside the kernel, where the launch's patch is already
    in force and the sweep changes nothing. The language's own helpers (tl.sum, tl.zeros) are such calls, hundreds
    per launch: the sweeps took 30-40% of an interpreted test's time. The repeat is skipped when the helper sees no
    language module that the launch has not patched; the launch patches and restores as before. Where triton's
    internals differ, nothing is changed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        patch_lang, executor_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
        nothing_patched = interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    launches = []  # per kernel launch in progress: the language modules patched during it

    def patch_once(fn):
        languages = {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}
        if launches and launches[-1] and languages <= launches[-1]:
            return nothing_patched()
        scope = patch_lang(fn)
        if launches:
            launches[-1] |= languages
        return scope

    def launch(self, *args, **kwargs):
        launches.append(set())
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_once, launch


def run_script(path: str, *args: str) -> None:
    """Run a script as __main__ with the interpreter sped up (TRITON_INTERPRET=1 must be set already)."""
    patch_language_once_per_launch()
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")
