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


def test_protocol_tables_are_written_from_the_presets():
    """docs/protocols.md's tables of preset values equal what the presets give now."""
    import difflib

    from crosslayer.train.protocol_doc import render

    text = (ROOT / "docs" / "protocols.md").read_text()
    diff = "\n".join(difflib.unified_diff(text.splitlines(), render(text).splitlines(), "committed", "presets",
                                          n=0, lineterm=""))
    assert not diff, ("docs/protocols.md's preset tables are stale; regenerate them with "
                      f"`python -m crosslayer.train.protocol_doc docs/protocols.md`:\n{diff}")


def test_every_preset_has_one_table_showing_every_field():
    import dataclasses

    from crosslayer.train.presets import PRESETS, Preset
    from crosslayer.train.protocol_doc import NOT_TABULATED, NOTES, ROWS, marked_presets

    assert sorted(marked_presets((ROOT / "docs" / "protocols.md").read_text())) == sorted(PRESETS)
    shown = {f for _, fields, _, _ in ROWS for f in fields} | {f for _, f in NOTES} | set(NOT_TABULATED)
    assert shown == {f.name for f in dataclasses.fields(Preset)}
