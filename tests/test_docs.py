"""The docs describe the current code: links resolve, every adapter option is documented, no work history."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import peft
import pytest

from hydralora import HydraLoraConfig

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = sorted([REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("results/**/*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Text that speaks of the project's own work history rather than of the code.
PROCESS = re.compile(r"\bissue\s*#?\d|\bsessions?\b|\bthe lead\b|DESIGN\.md|\.\./shared|\bseeds/", re.IGNORECASE)
PROSE = [REPO / "README.md", *(REPO / "docs" / n for n in ("getting-started.md", "method.md", "reference.md",
                                                            "auto-n.md", "distributed.md"))]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(path.read_text()):
        target = target.split("#")[0]
        if target and not re.match(r"^[a-z]+:", target) and not (path.parent / target).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)} links to missing files: {broken}"


def test_every_adapter_option_is_documented():
    own = {f.name for f in dataclasses.fields(HydraLoraConfig)} - {f.name for f in dataclasses.fields(peft.PeftConfig)}
    text = (REPO / "docs" / "method.md").read_text()
    missing = sorted(name for name in own if f"`{name}`" not in text)
    assert not missing, f"docs/method.md does not describe HydraLoraConfig fields {missing}"


def test_code_and_current_docs_speak_of_the_code_not_its_history():
    files = [*PROSE, *(REPO / "src").rglob("*.py"), *(REPO / "configs").rglob("*.yaml")]
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()[:100]}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if PROCESS.search(line)]
    assert not hits, "\n".join(hits)
