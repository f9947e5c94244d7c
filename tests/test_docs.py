"""The documentation: every cited doc exists, every cited section of docs/method.md is one of
its headings."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked(*suffixes: str) -> list[Path]:
    """Tracked files (git ls-files) with one of these suffixes, that exist in the work tree."""
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return [ROOT / p for p in out if p.endswith(suffixes) and (ROOT / p).is_file()]


def headings(path: Path) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def test_cited_docs_exist():
    missing = []
    for f in [*tracked(".py", ".md", ".ipynb"), ROOT / "README.md"]:
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for doc in re.findall(r"\b(docs/[\w./-]+\.(?:md|png))", line):
                if not (ROOT / doc).is_file():
                    missing.append(f"{f.relative_to(ROOT)}:{i}: {doc}")
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)


def test_method_sections_cited_exist():
    sections = headings(ROOT / "docs" / "method.md")
    bad = []
    for f in [*tracked(".py", ".md", ".ipynb")]:
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for name in re.findall(r'docs/method\.md,? \\?"([^"\\]+)\\?"', line):
                if name not in sections:
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {name!r}")
    assert not bad, f"sections of docs/method.md cited but absent ({sorted(sections)}):\n" + \
        "\n".join(bad)
