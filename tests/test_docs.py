"""The user documentation: short README, no development history, the CLI reference current, links that
resolve, and the project files a user looks for."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Words that speak of how the project was developed rather than of what it does.
HISTORY = re.compile(
    r"\bstop [0-9]+\b|this stop|last stop|earlier stop|previous release|this release|release before"
    r"|scratch (run|measure)|REFERENCE\.md",
    re.IGNORECASE,
)

#: Documents other work adds; links to them may not resolve yet.
PENDING = {"docs/deployment.md", "benchmarks/results/robustness.md"}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_at_most_200_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move details to docs/"


def test_no_development_history_in_docs_or_code():
    files = _docs() + sorted((ROOT / "ftddm_trt").rglob("*.py"))
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in files for i, line in enumerate(p.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, "development history in user-facing text (say what the software does; history goes in " \
                     "CHANGELOG.md):\n" + "\n".join(hits)


def test_project_files_exist():
    for name in ("LICENSE", "CHANGELOG.md", "CITATION.cff"):
        assert (ROOT / name).is_file(), name
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_relative_links_resolve():
    broken = []
    for doc in _docs():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.exists() and rel not in PENDING:
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("make_cli_reference", ROOT / "docs" / "make_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.render()
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == expected, "docs/cli.md is out of date: run python docs/make_cli_reference.py"
