"""The repository's own rules, held on every change (issue #16, "Architecture re-layout").

* every "docs/model.md section N" / "docs/llamacpp.md section N" citation names a section that exists, and no
  citation points outside the repository (the old "spec section N" / "llamacpp_notes section N" forms);
* no source file outside tests/ grows past 450 lines;
* the floors hold: native_bridge imports nothing of ours above it, the runtime never imports torch, training or
  export, bench/ uses public names only and never tests/;
* the README's layout map names only paths that exist, and names every package and sub-package.

Files are the ones git knows (tracked, plus new files not ignored), so build outputs and the virtualenv are
never scanned. Everything is parsed, nothing is imported: the whole module runs in about a second.
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"docs/model.md": ROOT / "docs" / "model.md", "docs/llamacpp.md": ROOT / "docs" / "llamacpp.md"}
#: First-party top-level packages.
FIRST_PARTY = ("mullama_sdk", "native_bridge", "training", "export", "testkit", "bench", "examples", "tests")
MAX_LINES = 450
CITING_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".c", ".h")

NUMBER = r"\d+(?:\.\d+)*"
#: "2", "2-4", "2 and 3", "2, 4", "4.1-4.3": one or more numbers joined by ranges or lists.
NUMBERS = rf"{NUMBER}(?:\s*(?:-|–|,|and|to)\s*{NUMBER})*"
CITATION = re.compile(rf"(docs/model\.md|docs/llamacpp\.md)\s+sections?\s+({NUMBERS})")
#: Citations of the design notes outside the repository (the form before the re-layout).
OUTSIDE_CITATION = re.compile(
    rf"(?:\bspec(?:'s|,)?\s+sections?|\bllamacpp_notes\b(?:\s+sections?)?)\s*(?:{NUMBERS})?"
)
HEADING = re.compile(rf"^#{{2,4}}\s+({NUMBER})\.?\s", re.MULTILINE)


@cache
def repo_files() -> tuple[str, ...]:
    """Paths (POSIX, relative to the root) of the files git tracks or would track, that exist now."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(sorted(p for p in set(out.split("\0")) if p and (ROOT / p).is_file()))


def python_files(under: str) -> list[str]:
    return [p for p in repo_files() if p.startswith(under + "/") and p.endswith(".py")]


def section_numbers(doc: Path) -> set[str]:
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def expand(numbers: str) -> list[str]:
    """Section numbers of a citation: "2-4" -> 2, 3, 4; "2, 5" -> 2, 5; "4.1-4.3" -> 4.1, 4.3 (its ends)."""
    out: list[str] = []
    for part in re.split(r"\s*(?:,|and)\s*", numbers):
        ends = re.split(r"\s*(?:-|–|to)\s*", part)
        if len(ends) == 2 and all(e.isdigit() for e in ends):
            out += [str(n) for n in range(int(ends[0]), int(ends[1]) + 1)]
        else:
            out += ends
    return out


def line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def citing_files() -> list[str]:
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()
    return [p for p in repo_files() if p.endswith(CITING_SUFFIXES) and p != me]


def test_docs_have_numbered_sections():
    """The pages citations point into exist and are numbered as the code cites them."""
    assert {str(n) for n in range(1, 8)} <= section_numbers(DOCS["docs/model.md"])
    assert {str(n) for n in range(1, 9)} | {"4.1", "4.7", "5.1", "5.4"} <= section_numbers(
        DOCS["docs/llamacpp.md"]
    )


def test_every_section_citation_resolves_inside_the_repository():
    sections = {name: section_numbers(path) for name, path in DOCS.items()}
    bad = []
    for rel in citing_files():
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        for m in CITATION.finditer(text):
            missing = [n for n in expand(m.group(2)) if n not in sections[m.group(1)]]
            if missing:
                bad.append(
                    f"{rel}:{line_of(text, m.start())}: {m.group(0)!r} (no section {', '.join(missing)})"
                )
        for m in OUTSIDE_CITATION.finditer(text):
            bad.append(
                f"{rel}:{line_of(text, m.start())}: {m.group(0).strip()!r} points outside the repository; "
                "cite docs/model.md or docs/llamacpp.md section N"
            )
    assert not bad, "citations that do not resolve:\n" + "\n".join(bad)


def test_no_source_file_outside_tests_is_too_long():
    long = []
    for rel in repo_files():
        if rel.endswith(".py") and not rel.startswith("tests/"):
            n = len((ROOT / rel).read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES:
                long.append(f"{rel}: {n} lines")
    assert not long, f"files over {MAX_LINES} lines (split them by concern):\n" + "\n".join(long)


@cache
def parse(rel: str) -> ast.Module:
    return ast.parse((ROOT / rel).read_text(encoding="utf-8"), filename=rel)


def imported_modules(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """Every import anywhere in the file (module level, functions, try blocks): (line, module, names).

    Relative imports are reported as "." + module and never count as another package's.
    """
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            out.append((node.lineno, module, [a.name for a in node.names]))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
        ):
            out.append((node.lineno, node.args[0].value, []))
    return out


def root_of(module: str) -> str:
    return "" if module.startswith(".") else module.split(".")[0]


def forbidden_imports(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{rel}:{line}: imports {module}"
        for rel in python_files(package)
        for line, module, _ in imported_modules(parse(rel))
        if root_of(module) in forbidden
    ]


def test_native_bridge_is_the_lowest_floor():
    """native_bridge (the C hook and its mirrors) stands on nothing of ours, so anything may use it."""
    bad = forbidden_imports("native_bridge", tuple(p for p in FIRST_PARTY if p != "native_bridge"))
    assert not bad, "\n".join(bad)


def test_runtime_never_imports_torch_training_or_export():
    """``pip install 'mullama-sdk[cpu]'`` has no torch: not at import time, not in any function either."""
    bad = forbidden_imports(
        "mullama_sdk", ("torch", "torchaudio", "training", "export", "testkit", "tests", "bench", "examples")
    )
    assert not bad, "\n".join(bad)


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_bench_uses_public_names_and_never_tests():
    """Benchmarks build on testkit/ and public APIs only, so a private rename never breaks them silently."""
    others = tuple(p for p in FIRST_PARTY if p not in ("bench", "tests"))
    bad = []
    for rel in python_files("bench"):
        tree = parse(rel)
        bound: set[str] = set()  # local names bound to something imported from another first-party package
        for line, module, names in imported_modules(tree):
            root = root_of(module)
            if root == "tests":
                bad.append(f"{rel}:{line}: imports {module} (move what bench needs into testkit/)")
            elif root in others:
                bad += [f"{rel}:{line}: imports private {module}.{n}" for n in names if private(n)]
                bad += [
                    f"{rel}:{line}: imports private module {module}"
                    for part in module.split(".")
                    if private(part)
                ]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names if root_of(a.name) in others}
            elif (
                isinstance(node, ast.ImportFrom) and root_of("." * node.level + (node.module or "")) in others
            ):
                bound |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in bound:
                    bad.append(f"{rel}:{node.lineno}: uses private {ast.unparse(node)}")
    assert not bad, "bench/ reaches into private names or tests/:\n" + "\n".join(bad)


# --- the README's layout map -------------------------------------------------------------------------------
#
# Format: under a heading "Layout", the first fenced block. A line starting in column 0 opens an entry whose
# first word is a top-level path (`mullama_sdk/`, `pyproject.toml`); indented lines continue the entry. Every
# other word of the entry that looks like a path (ends with "/" or a known file suffix) names a path inside that
# top-level folder, at any depth (`captioner.py`, `reference/`, `demo_model/lm.py`) or from the repository root
# (`testkit/make_assets.py`).

PATH_WORD = re.compile(
    r"(?<![\w./-])([A-Za-z0-9_][\w.-]*(?:/[\w.-]+)*(?:/|\.(?:py|c|h|md|json|yaml|yml|toml|cfg|txt|onnx|gguf|wav)))"
    r"(?![\w/-])"
)


def layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^#+\s*Layout\s*$.*?^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL | re.IGNORECASE)
    assert m, "README.md needs a fenced block under a 'Layout' heading"
    return m.group(1).splitlines()


def layout_entries() -> dict[str, list[str]]:
    """Top-level path -> the path-like words of its entry."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in layout_block():
        if not line.strip():
            continue
        if not line[0].isspace():
            current, _, rest = line.partition(" ")
            entries[current] = []
        else:
            assert current is not None, f"README layout: continuation line before any entry: {line!r}"
            rest = line
        entries[current] += PATH_WORD.findall(rest)
    return entries


def known_paths() -> set[str]:
    """Every repository file and folder ("folder/"), relative to the root."""
    paths = set(repo_files())
    for p in repo_files():
        parts = p.split("/")[:-1]
        paths |= {"/".join(parts[: i + 1]) + "/" for i in range(len(parts))}
    return paths


def resolve(top: str, word: str, paths: set[str]) -> str | None:
    """Where ``word`` of the entry for ``top`` points: inside ``top`` at any depth, or from the root."""
    if top.endswith("/"):
        if top + word in paths:
            return top + word
        inside = sorted(p for p in paths if p.startswith(top) and p.endswith("/" + word))
        if inside:
            return inside[0]
    return word if "/" in word and word in paths else None


def test_readme_layout_names_only_existing_paths():
    paths = known_paths()
    bad = []
    for top, words in layout_entries().items():
        if top not in paths:
            bad.append(f"{top} (entry)")
        bad += [f"{word} (in the {top} entry)" for word in words if resolve(top, word, paths) is None]
    assert not bad, "README layout names paths that do not exist:\n" + "\n".join(bad)


def test_readme_layout_names_every_package():
    paths = known_paths()
    entries = layout_entries()
    named = set(entries)
    for top, words in entries.items():
        named |= {r for w in words if (r := resolve(top, w, paths))}
    packages = {p[: -len("__init__.py")] for p in repo_files() if p.endswith("/__init__.py")}
    top_folders = {p.split("/")[0] + "/" for p in repo_files() if "/" in p and not p.startswith(".")}
    missing = sorted((packages | top_folders) - named)
    assert not missing, "README layout does not name:\n" + "\n".join(missing)


#: The shipped floors whose every module the README map names (a newcomer reads the map to find the module
#: that owns a job; the training sub-packages and the kits are named as folders with their main modules).
FULLY_MAPPED = ("native_bridge/", "mullama_sdk/", "export/")


def test_readme_layout_names_every_module_of_the_shipped_floors():
    paths = known_paths()
    entries = layout_entries()
    named = {r for top, words in entries.items() for w in words if (r := resolve(top, w, paths))}
    modules = {p for p in repo_files() if p.startswith(FULLY_MAPPED) and p.endswith((".py", ".c"))
               and p.count("/") == 1 and not p.rsplit("/", 1)[1].startswith("__")}
    missing = sorted(modules - named)
    assert not missing, "README layout does not name these modules:\n" + "\n".join(missing)
