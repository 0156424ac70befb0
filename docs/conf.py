"""Sphinx configuration for the torch_secorder documentation.

Build with warnings as errors: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The build is offline-safe: intersphinx (which downloads inventories) is enabled only when the
environment variable ``TORCH_SECORDER_INTERSPHINX`` is set to a non-empty value.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch_secorder  # noqa: E402

# -- Project -------------------------------------------------------------------------------

project = "torch_secorder"
author = "torch_secorder developers"
copyright = "torch_secorder developers"  # noqa: A001
release = torch_secorder.__version__
version = ".".join(release.split(".")[:2])

# -- General -------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    # MathJax from the package into _static/mathjax, not from a CDN: formulas render offline.
    "sphinx-mathjax-offline",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
nitpicky = False

# autosummary writes one page per public name into api/generated (git-ignored). Pages left
# there by an earlier build for names that are no longer public would be read as orphan
# documents (a warning, so an error with -W): remove them first.
autosummary_generate = True
autosummary_imported_members = True
_GENERATED = Path(__file__).resolve().parent / "api" / "generated"
_PUBLIC = {f"torch_secorder.{name}.rst" for name in torch_secorder.__all__}
for _page in _GENERATED.glob("*.rst") if _GENERATED.is_dir() else ():
    if _page.name not in _PUBLIC:
        _page.unlink(missing_ok=True)

# autodoc: types go into the parameter descriptions, members in source order.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True

# napoleon: Google style only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False

# -- Optional intersphinx (needs the network) ----------------------------------------------

if os.environ.get("TORCH_SECORDER_INTERSPHINX"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
    }

# -- HTML ----------------------------------------------------------------------------------

html_theme = "sphinx_rtd_theme"
html_title = f"torch_secorder {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"navigation_depth": 3}
