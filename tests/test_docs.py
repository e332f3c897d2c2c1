"""The Python snippets of README.md and docs/*.md run as written, and the links between docs resolve."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets():
    for doc in DOCS:
        for i, code in enumerate(FENCE.findall(doc.read_text())):
            yield pytest.param(code, id=f"{doc.name}-{i}")


@pytest.mark.parametrize("code", list(snippets()))
def test_snippet_runs_as_written(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write to runs/...: keep it out of the checkout
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def test_readme_has_python_snippets():
    assert len(FENCE.findall((ROOT / "README.md").read_text())) >= 2


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
