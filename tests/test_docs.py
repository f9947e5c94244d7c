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



# What a product's text never says: the project's working history (sessions, issue numbers,
# acceptance bars) lives in the git log, not in the docs, docstrings, notebooks or tests.
NARRATION = re.compile(
    r"\bsessions? [0-9]"
    r"|\bissues? [0-9#]"
    r"|\b(method|foundation) issue"
    r"|\bacceptance\b"
    r"|\b(identity|fidelity|diversity|spread|three|relative|all|its|the) bars?\b"
    r"|\bbars? (is |are )?(met|missed)\b"
    r"|HISTORY\.md",
    re.IGNORECASE)
TEXT_SUFFIXES = (".md", ".py", ".ipynb", ".txt", ".toml", ".sh", ".json")
THIS_TEST = "tests/test_docs.py"


def test_no_development_narration_in_tracked_text():
    hits = []
    for f in tracked(*TEXT_SUFFIXES):
        rel = f.relative_to(ROOT).as_posix()
        if rel == THIS_TEST:
            continue
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            m = NARRATION.search(line)
            if m:
                hits.append(f"{rel}:{i}: {m.group(0)!r}: {line.strip()[:100]}")
    assert not hits, "development narration (history belongs in the git log):\n" + \
        "\n".join(hits)


def test_narration_pattern_catches_what_it_should():
    s, n = " ", "3"  # the examples are assembled, so this file itself reads clean to a plain grep
    for text in (f"measured in session{s}2{n}", f"Sessions{s}1{n}-19", f"issue{s}{n}",
                 f"the method{s}issue's",
                 "meets the three bars", "under the identity bar", "see bench/HISTORY.md",
                 "the acceptance row"):
        assert NARRATION.search(text), text
    for text in ("a progress bar", "ax.bar(x, y)", r"$\bar\alpha_t$", "error bars of the plot",
                 "jupyter sessionContext"):
        assert not NARRATION.search(text), text


def test_each_equation_is_one_function_of_at_most_40_lines_as_docs_method_lists():
    """docs/method.md lists the function of each equation with its length; the lengths are the
    code's, and none is over 40 lines."""
    import ast
    text = (ROOT / "docs" / "method.md").read_text()
    table = text.split("<!-- equations -->")[1].split("<!-- /equations -->")[0]
    rows = re.findall(r"^\| (.+?) \| `(lr_tutorial/\w+\.py)` `([\w.]+)` \| (\d+) \|$", table, re.M)
    assert len(rows) >= 10, table
    for what, path, qualname, lines in rows:
        node = ast.parse((ROOT / path).read_text())
        for part in qualname.split("."):
            node = next((n for n in ast.iter_child_nodes(node)
                         if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part),
                        None)
            assert node is not None, f"{path} has no {qualname} ({what})"
        length = node.end_lineno - node.lineno + 1
        assert length == int(lines), f"{path} {qualname}: {length} lines, docs say {lines}"
        assert length <= 40, f"{path} {qualname} ({what}): {length} lines"
