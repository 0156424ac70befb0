"""The documentation: one API entry per public name, runnable prose examples, the Sphinx set-up.

The full build with warnings as errors runs in ``.ci/run``; the test that repeats it here is
marked ``slow``.
"""

import doctest
import inspect
import re
import runpy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import torch_secorder

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.rst"))
PROSE_PAGES = sorted(DOCS.glob("*.rst"))
EXAMPLES = sorted((ROOT / "examples").glob("example_*.py"))

_DIRECTIVE = re.compile(r"^(\s*)\.\. (autosummary|autofunction|autoclass|autodata)::\s*(\S*)")


def api_entries(text: str) -> list[str]:
    """Names documented by an API page: autosummary entries and direct autodoc directives.

    Names are returned without a leading ``~`` and without the ``torch_secorder.`` prefix.
    """
    entries = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        i += 1
        if match is None:
            continue
        indent, kind, argument = match.groups()
        if kind != "autosummary":
            entries.append(argument)
            continue
        while i < len(lines):
            line = lines[i]
            body = line.strip()
            if body and len(line) - len(line.lstrip()) <= len(indent):
                break  # the directive's body ended
            if body and not body.startswith(":"):
                entries.append(body)
            i += 1
    return [re.sub(r"^torch_secorder\.", "", name.lstrip("~")) for name in entries]


def documented_names() -> list[str]:
    return [name for page in API_PAGES for name in api_entries(page.read_text())]


def public_names() -> set[str]:
    return set(torch_secorder.__all__) - {"__version__"}


def test_api_entries_parser_reads_autosummary_and_autodoc():
    text = """
Title
=====

.. currentmodule:: torch_secorder

.. autosummary::
   :toctree: generated
   :nosignatures:

   hvp
   ~torch_secorder.batched_hvp

Text after the list.

.. autofunction:: torch_secorder.flatten
"""
    assert api_entries(text) == ["hvp", "batched_hvp", "flatten"]


def test_api_pages_exist():
    assert {page.name for page in API_PAGES} >= {"core.rst", "index.rst"}


@pytest.mark.parametrize("name", sorted(public_names()))
def test_every_public_name_has_exactly_one_api_entry(name):
    count = Counter(documented_names())[name]
    assert count == 1, f"{name} has {count} entries in docs/api/*.rst; expected exactly 1"


def _described_arguments(doc: str) -> set[str]:
    """Names of the arguments in a Google-style docstring's ``Args:`` section."""
    section = re.search(r"^( *)Args:\n(.*?)(?=^\1\S|\Z)", doc, re.M | re.S)
    return set(re.findall(r"^ +(\w+): ", section.group(2), re.M)) if section else set()


@pytest.mark.parametrize("name", sorted(public_names()))
def test_every_public_function_describes_every_argument(name):
    """The docstrings as users read them (shared descriptions filled in), for every argument."""
    obj = getattr(torch_secorder, name)
    if not inspect.isfunction(obj):
        pytest.skip("not a function")
    arguments = set(inspect.signature(obj).parameters)
    missing = arguments - _described_arguments(obj.__doc__)
    assert not missing, f"{name}'s docstring does not describe {sorted(missing)}"
    assert "{" + "model_data}" not in obj.__doc__  # no placeholder left unfilled


def test_every_api_entry_is_public():
    extra = sorted(set(documented_names()) - public_names())
    assert not extra, f"docs/api/*.rst document names not in torch_secorder.__all__: {extra}"


def test_api_pages_document_top_level_names():
    for page in API_PAGES:
        text = page.read_text()
        if ".. autosummary::" in text:
            assert ".. currentmodule:: torch_secorder\n" in text, page.name


@pytest.mark.parametrize(
    "page", [p for p in PROSE_PAGES if ">>>" in p.read_text()], ids=lambda p: p.name
)
def test_prose_examples_run(page, capsys):
    result = doctest.testfile(str(page), module_relative=False, globs={}, report=True)
    log = capsys.readouterr().out
    assert result.attempted > 0
    assert result.failed == 0, log


def test_examples_page_lists_every_example():
    text = (DOCS / "examples.rst").read_text()
    assert EXAMPLES
    for script in EXAMPLES:
        assert f"examples/{script.name}" in text, script.name


def test_every_page_is_in_a_toctree():
    tree = "\n".join(p.read_text() for p in [DOCS / "index.rst", *API_PAGES])
    for page in PROSE_PAGES:
        if page.stem != "index":
            assert re.search(rf"^\s+{page.stem}$", tree, re.MULTILINE), page.name


def test_conf_is_offline_google_only_and_versioned(monkeypatch):
    monkeypatch.delenv("TORCH_SECORDER_INTERSPHINX", raising=False)
    conf = runpy.run_path(str(DOCS / "conf.py"))
    assert conf["release"] == torch_secorder.__version__
    assert conf["html_theme"] == "sphinx_rtd_theme"
    assert conf["napoleon_numpy_docstring"] is False
    assert conf["autosummary_generate"] is True
    assert conf["autodoc_typehints"] == "description"
    assert conf["nitpicky"] is False
    assert "sphinx.ext.intersphinx" not in conf["extensions"]
    for extension in ("autodoc", "autosummary", "napoleon", "mathjax", "viewcode"):
        assert f"sphinx.ext.{extension}" in conf["extensions"]


def test_conf_enables_intersphinx_on_request(monkeypatch):
    monkeypatch.setenv("TORCH_SECORDER_INTERSPHINX", "1")
    conf = runpy.run_path(str(DOCS / "conf.py"))
    assert "sphinx.ext.intersphinx" in conf["extensions"]
    assert "torch" in conf["intersphinx_mapping"]


def test_conf_removes_stale_generated_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    generated = tmp_path / "docs" / "api" / "generated"
    generated.mkdir(parents=True)
    (tmp_path / "docs" / "conf.py").write_text((DOCS / "conf.py").read_text())
    kept = generated / "torch_secorder.hvp.rst"
    stale = generated / "torch_secorder.no_longer_public.rst"
    kept.write_text("kept")
    stale.write_text("stale")
    runpy.run_path(str(tmp_path / "docs" / "conf.py"))
    assert kept.read_text() == "kept"
    assert not stale.exists()


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("sphinx_rtd_theme")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    generated = tmp_path / "html" / "api" / "generated"
    for name in public_names():
        assert (generated / f"torch_secorder.{name}.html").is_file(), name
    # Classes document their methods and attributes, not only their docstring.
    operator = (generated / "torch_secorder.HessianOperator.html").read_text()
    for member in ("from_model", "matvec", "matmat", "release", "to_scipy", "num_matvecs"):
        assert f'id="torch_secorder.HessianOperator.{member}"' in operator, member
