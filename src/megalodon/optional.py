"""Optional dependencies: the package's extras, and what happens when one is missing.

Plots are the only optional output of the core commands: without the `plot` extra a run still writes its
metrics, summaries and models, and each skipped figure is named with the install step.
"""

from __future__ import annotations

import logging

EXTRAS = {"transformers": "hf", "lm_eval": "eval", "matplotlib": "plot"}  # module -> the extra that installs it


def install_step(module: str) -> str:
    return f"pip install 'megalodon-torch[{EXTRAS[module]}]'"


def pyplot(figure: str):
    """matplotlib.pyplot with the file-only Agg backend, or None after a warning that `figure` is skipped."""
    try:
        import matplotlib
    except ImportError:
        logging.getLogger("megalodon").warning("skipped %s: plots need matplotlib (%s)", figure,
                                               install_step("matplotlib"))
        return None
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt
