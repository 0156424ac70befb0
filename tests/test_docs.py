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


def test_conf_loads_mathjax_from_the_build_not_a_cdn(monkeypatch):
    """Formulas render offline: MathJax is copied into the output, the pages load it from there."""
    monkeypatch.delenv("TORCH_SECORDER_INTERSPHINX", raising=False)
    conf = runpy.run_path(str(DOCS / "conf.py"))
    assert "sphinx-mathjax-offline" in conf["extensions"]
    assert "mathjax_path" not in conf  # the extension sets it to its local copy
    extension = pytest.importorskip("sphinx-mathjax-offline")  # the docs extra

    class App:
        def __init__(self):
            self.config = type("Config", (), {})()
            self.events = []

        def connect(self, event, callback):
            self.events.append(event)

    app = App()
    extension.setup(app)
    path = app.config.mathjax_path
    assert "://" not in path, path  # a path relative to _static, not a URL
    assert not path.startswith("/"), path
    assert (Path(extension.__file__).parent / "static" / path).is_file(), path
    assert "build-finished" in app.events  # where it copies MathJax into _static


def test_read_the_docs_config_matches_ci():
    """.readthedocs.yaml builds what .ci/run builds: the same torch (a CPU wheel), -W."""
    config = (ROOT / ".readthedocs.yaml").read_text()
    assert re.search(r"^version: 2$", config, re.M)
    assert re.search(r'^    python: "3\.11"$', config, re.M)
    assert re.search(r"^  configuration: docs/conf\.py$", config, re.M)
    assert re.search(r"^  fail_on_warning: true$", config, re.M)
    assert re.search(r"^      extra_requirements:\n        - docs$", config, re.M)
    pins = re.findall(r"pip install (?:--quiet )?torch==(\S+)", config)
    assert pins
    assert pins == re.findall(
        r"pip install (?:--quiet )?torch==(\S+)", (ROOT / ".ci/run").read_text()
    )
    assert "--index-url https://download.pytorch.org/whl/cpu" in config


def test_figures_exist_are_small_and_name_their_example():
    pattern = re.compile(r"^\.\. (?:figure|image):: (\S+)\n((?:[ \t]+.*\n|\n)*)", re.M)
    figures = [
        (page, *m.groups()) for page in PROSE_PAGES for m in pattern.finditer(page.read_text())
    ]
    assert any(page.name == "examples.rst" for page, _, _ in figures)
    for page, path, body in figures:
        image = DOCS / path
        assert image.is_file(), f"{page.name}: {path}"
        assert image.stat().st_size < 150_000, f"{path}: {image.stat().st_size} bytes"
        if page.name == "examples.rst":  # the caption names the command that drew it
            scripts = re.findall(r"python (examples/example_\w+\.py)", body)
            assert scripts, path
            for script in scripts:
                assert (ROOT / script).is_file(), f"{path}: {script}"


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
    # Math is rendered by the MathJax copied into the site, found by a relative path.
    algorithms = (tmp_path / "html" / "algorithms.html").read_text()
    assert 'src="_static/mathjax/tex-chtml.js"' in algorithms
    assert (tmp_path / "html" / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in (tmp_path / "html").rglob("*.html"):
        assert not re.search(r"<script[^>]*src=\"(https?:)?//", page.read_text()), page.name


def test_every_public_example_runs_as_written_in_a_fresh_session():
    # a user copies an example into a new session: it imports what it uses
    finder = doctest.DocTestFinder(recurse=True)
    checked = 0
    for name in [n for n in torch_secorder.__all__ if n != "__version__"]:
        obj = getattr(torch_secorder, name)
        for test in finder.find(obj, name, globs={}, module=inspect.getmodule(obj)):
            if test.examples:
                runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
                assert runner.run(test, out=lambda _: None).failed == 0, test.name
                checked += 1
    assert checked >= 30
