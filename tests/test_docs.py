"""The README stays short, its links and the docs' links reach real files, and docs/api.md is what
docs/make_api.py writes from the code now (so signatures and docstrings cannot drift)."""

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def make_api():
    spec = importlib.util.spec_from_file_location("make_api", REPO / "docs" / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_api_reference_is_generated_from_the_code():
    assert (REPO / "docs" / "api.md").read_text() == make_api().render(), \
        "docs/api.md is out of date: run .venv/bin/python docs/make_api.py"


def test_api_reference_covers_every_public_name():
    import rconv_core as rc
    text = (REPO / "docs" / "api.md").read_text()
    missing = [name for name in rc.__all__ if f"### `{name}`" not in text]
    assert not missing, f"docs/api.md lacks {missing}"


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move the detail to docs/"
    # the Colab badges are long by nature (tests/test_notebooks.py wants their full address)
    long = [i for i, line in enumerate(lines, 1) if len(line) > 120 and COLAB_BADGE not in line]
    assert not long, f"README.md lines over 120 characters: {long}"


def test_every_relative_link_reaches_a_file():
    broken = []
    for page in [README, *DOCS]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            if not destination.exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                broken.append(f"{page.relative_to(REPO)} -> {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    text = README.read_text()
    unlinked = [page.name for page in DOCS if f"docs/{page.name}" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"
