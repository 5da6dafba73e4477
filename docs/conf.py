"""Sphinx configuration of the nnx-trainer documentation (Sphinx + MyST, as the JAX projects).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (warnings are
errors; ``tests/test_docs.py`` runs the same build).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
# Autodoc imports the engine, its plugins and the example task. JAX must not grab an
# accelerator or print its platform warnings for that.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "nnx-trainer"
author = "nnx-trainer contributors"
copyright = "nnx-trainer contributors"  # noqa: A001 - Sphinx's name

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "hookspec_reference",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "sphinx_book_theme"
html_title = "nnx-trainer"
html_theme_options = {"show_toc_level": 2}


def _nnx_module_signature(app, what, name, obj, options, signature, return_annotation):
    """Flax NNX classes are built through a metaclass ``__call__(*args, **kwargs)``: show
    their ``__init__`` signature instead, as for any other class."""
    from flax import nnx
    from sphinx.util.inspect import signature as sphinx_signature
    from sphinx.util.inspect import stringify_signature

    if what != "class" or not (isinstance(obj, type) and issubclass(obj, nnx.Pytree)):
        return None
    init = sphinx_signature(obj.__init__, bound_method=True)
    return stringify_signature(init, show_return_annotation=False), return_annotation


def setup(app):
    app.connect("autodoc-process-signature", _nnx_module_signature)
