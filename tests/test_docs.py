"""Every Python block of README.md and docs/*.md runs as written, or is an excerpt of a file that
does; every name the docs and examples/ take from elastic_ep is part of its public API; every
command the docs give a repository script (or ``elastic-ep``) uses flags that script defines; and
docs/architecture.md's module map has one row for every module of elastic_ep/.

A block marked with ``<!-- excerpt: path -->`` on the line just before it is not run: the file
must exist and hold the block's lines, in order (compared without indentation; a line ``...``
stands for lines left out). Every other ``python`` block runs in a fresh process, from a temporary
directory, with the repository on the path.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import elastic_ep

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLES = sorted((REPO / "examples").rglob("*.py"))
EXCERPT = re.compile(r"^<!-- excerpt: (\S+) -->$")
ELISION = "..."
BLOCK_TIMEOUT_S = 60


@dataclass(frozen=True)
class Block:
    """One fenced ``python`` block of a Markdown file."""

    doc: Path
    line: int  # 1-based line of the opening fence
    code: str
    excerpt_of: str | None  # the file named by an excerpt marker just before the fence

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def python_blocks(doc: Path) -> list[Block]:
    """The ``python`` blocks of ``doc``, with the excerpt marker on the line before each, if any.

    Raises ``ValueError`` for a marker that no python block follows, or an unclosed fence."""
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    fence: tuple[int, str | None] | None = None  # (opening line, language) inside a block
    body: list[str] = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, body = (index, stripped[3:].strip() or None), []
            elif EXCERPT.match(stripped):
                following = lines[index + 1].strip() if index + 1 < len(lines) else ""
                if following != "```python":
                    raise ValueError(f"{doc}:{index + 1}: excerpt marker not followed by ```python")
            continue
        if stripped == "```":
            start, language = fence
            if language == "python":
                marker = EXCERPT.match(lines[start - 1].strip()) if start > 0 else None
                blocks.append(
                    Block(doc, start + 1, "\n".join(body) + "\n", marker and marker.group(1))
                )
            fence = None
        else:
            body.append(line)
    if fence is not None:
        raise ValueError(f"{doc}:{fence[0] + 1}: unclosed code fence")
    return blocks


def missing_lines(excerpt: str, source: str) -> list[str]:
    """The excerpt's lines not found in ``source`` in order (indentation ignored; ``...`` lines
    and blank lines skip). Empty when the excerpt is faithful."""
    have = [line.strip() for line in source.splitlines()]
    missing: list[str] = []
    position = 0
    for line in (raw.strip() for raw in excerpt.splitlines()):
        if not line or line == ELISION:
            continue
        try:
            position = have.index(line, position) + 1
        except ValueError:
            missing.append(line)
    return missing


ALL_BLOCKS = [block for doc in DOCS for block in python_blocks(doc)]
RUNNABLE = [block for block in ALL_BLOCKS if block.excerpt_of is None]
EXCERPTS = [block for block in ALL_BLOCKS if block.excerpt_of is not None]


@pytest.mark.timeout(BLOCK_TIMEOUT_S + 30)
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{block.name} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("block", EXCERPTS, ids=[b.name for b in EXCERPTS])
def test_excerpt_matches_its_file(block: Block) -> None:
    assert block.excerpt_of is not None
    source = REPO / block.excerpt_of
    assert source.is_file(), f"{block.name}: no file {block.excerpt_of}"
    assert not missing_lines(block.code, source.read_text()), (
        f"{block.name}: lines not in {block.excerpt_of} (in order): "
        f"{missing_lines(block.code, source.read_text())}"
    )


def test_docs_have_python_blocks_and_excerpts_name_files_that_run() -> None:
    assert len(RUNNABLE) >= 4 and len(EXCERPTS) >= 3
    # an example (run by test_examples.py) or a test file
    assert all(b.excerpt_of.startswith(("examples/", "tests/")) for b in EXCERPTS if b.excerpt_of)


def test_parser_and_matcher_catch_bad_docs(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- excerpt: a.py -->\n```python\nx = 1\n```\n```bash\nls\n```\n")
    (block,) = python_blocks(doc)
    assert (block.line, block.code, block.excerpt_of) == (3, "x = 1\n", "a.py")
    doc.write_text("<!-- excerpt: a.py -->\n\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="not followed"):
        python_blocks(doc)
    doc.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="unclosed"):
        python_blocks(doc)
    source = "def f():\n    a = 1\n    b = 2\n    return a + b\n"
    assert missing_lines("def f():\n    ...\n    return a + b\n", source) == []
    assert missing_lines("b = 2\na = 1\n", source) == ["a = 1"]  # out of order
    assert missing_lines("c = 3\n", source) == ["c = 3"]


# ---- the public API -----------------------------------------------------------------------------

REQUIRED_TOP_LEVEL = {
    "Action",
    "ControlServer",
    "ElasticCoordinator",
    "ElasticRank",
    "LocalProcessLauncher",
    "PlacementBuffers",
    "RankRole",
    "RankSpec",
    "RebalanceRequest",
    "ScaleLimits",
    "ScaleRequest",
    "plan",
    "plan_with_report",
}


def _elastic_ep_names(code: str) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from elastic_ep... import name`` and ``elastic_ep.name``."""
    used: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "elastic_ep":
            used += [(node.module or "", alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "elastic_ep"
        ):
            used.append(("elastic_ep", node.attr))
    return used


def _sources() -> list[tuple[str, str]]:
    sources = [(str(path.relative_to(REPO)), path.read_text()) for path in EXAMPLES]
    for block in ALL_BLOCKS:
        try:
            ast.parse(block.code)
        except SyntaxError:
            assert block.excerpt_of, f"{block.name} is not valid Python"
            continue  # an excerpt with elisions; its file is checked itself
        sources.append((block.name, block.code))
    return sources


def test_names_used_by_docs_and_examples_are_exported() -> None:
    assert set(elastic_ep.__all__) >= REQUIRED_TOP_LEVEL
    for name in elastic_ep.__all__:
        assert hasattr(elastic_ep, name), name
    unexported = []
    for where, code in _sources():
        for module_name, name in _elastic_ep_names(code):
            module = importlib.import_module(module_name)
            public = getattr(module, "__all__", None)
            value = getattr(module, name, None)
            if value is None and importlib.util.find_spec(f"{module_name}.{name}") is not None:
                value = importlib.import_module(f"{module_name}.{name}")  # a submodule
            if public is not None:
                ok = name in public
            else:  # a module without __all__: a public name it defines, or a submodule
                defined_here = getattr(value, "__module__", module_name) == module_name
                ok = value is not None and not name.startswith("_")
                ok = ok and (inspect.ismodule(value) or defined_here)
            if not ok:
                unexported.append(f"{where}: {module_name}.{name}")
    assert not unexported, "names used but not exported:\n" + "\n".join(unexported)
    assert EXAMPLES, "no examples found"


# ---- the commands the docs give -----------------------------------------------------------------

SHELL_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")
SCRIPT_RUN = re.compile(r"python3?\s+(\S+\.py)\b([^;|&]*)")
CLI_RUN = re.compile(r"elastic-ep\s+([a-z]+)\b([^;|&]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def shell_commands(text: str) -> list[str]:
    """Candidate command lines of a Markdown text: the lines of its shell blocks (continuations
    joined) and its inline code spans (a span may wrap onto the next line)."""
    lines: list[str] = []

    def keep_shell(match: re.Match[str]) -> str:
        if match.group(1) in ("", "bash", "sh", "shell", "console"):
            lines.extend(match.group(2).replace("\\\n", " ").splitlines())
        return "\n" * match.group(0).count("\n")

    prose = SHELL_FENCE.sub(keep_shell, text)
    return lines + [span.replace("\n", " ") for span in INLINE_CODE.findall(prose)]


def unknown_flags(text: str, repo: Path) -> list[str]:
    """``script: --flag`` for each flag a command in ``text`` gives a repository script (or the
    ``elastic-ep`` command) that its source does not define, and each such script that is gone."""
    cli = "\n".join(p.read_text() for p in (repo / "elastic_ep").rglob("*.py"))
    bad = []
    for command in shell_commands(text):
        for script, args in SCRIPT_RUN.findall(command):
            path = repo / script
            if not path.is_file():
                if script.startswith(("benchmarks/", "examples/", "tests/")):
                    bad.append(f"{script}: no such file")
                continue
            source = path.read_text()
            bad += [f"{script}: {f}" for f in FLAG.findall(args) if f'"{f}"' not in source]
        for sub, args in CLI_RUN.findall(command):
            bad += [f"elastic-ep {sub}: {f}" for f in FLAG.findall(args) if f'"{f}"' not in cli]
    return bad


def test_commands_in_docs_use_flags_their_scripts_define() -> None:
    bad = [f"{doc.name}: {b}" for doc in DOCS for b in unknown_flags(doc.read_text(), REPO)]
    assert not bad, "flags or scripts the docs name that do not exist:\n" + "\n".join(bad)


def test_unknown_flags_catches_a_renamed_flag_and_a_missing_script() -> None:
    text = (
        "Run `python benchmarks/bench_executor.py --backend gloo --modes all`, then\n"
        "```bash\npython benchmarks/gone.py --x\nelastic-ep scale \\\n  --no-such-flag 3\n```\n"
    )
    assert unknown_flags(text, REPO) == [
        "benchmarks/gone.py: no such file",
        "elastic-ep scale: --no-such-flag",
        "benchmarks/bench_executor.py: --modes",
    ]


# ---- the module map of docs/architecture.md ----------------------------------------------------

ARCHITECTURE = REPO / "docs" / "architecture.md"
MAP_ROW = re.compile(r"^\| `([\w/]+\.py)` \|", re.M)


def module_map_problems(doc_text: str, package: Path) -> list[str]:
    """What the module map in ``doc_text`` (table rows ``| `path` | what it is |``, ``path``
    relative to ``package``) gets wrong: each module of ``package`` (a ``.py`` file other than
    ``__init__.py`` and ``__main__.py``) that no row names, each row whose module is not there,
    and each module named by more than one row."""
    modules = {
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    rows = MAP_ROW.findall(doc_text)
    named = set(rows)
    problems = [
        f"{package.name}/{m}: no row; add '| `{m}` | what it is |' under its package"
        for m in sorted(modules - named)
    ]
    problems += [
        f"{package.name}/{m}: a row, but no such module (renamed or removed?)"
        for m in sorted(named - modules)
    ]
    problems += [
        f"{package.name}/{m}: {rows.count(m)} rows, one wanted"
        for m in sorted(named)
        if rows.count(m) > 1
    ]
    return problems


def test_architecture_names_every_module_once() -> None:
    problems = module_map_problems(ARCHITECTURE.read_text(), REPO / "elastic_ep")
    assert not problems, "docs/architecture.md's module map is out of date:\n" + "\n".join(problems)


def test_module_map_problems_catches_a_missing_a_stale_and_a_repeated_row(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    for name in ("__init__.py", "__main__.py", "a.py", "sub/__init__.py", "sub/b.py", "sub/c.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("")
    doc = "| `a.py` | one |\n| `sub/b.py` | two |\n| `sub/b.py` | again |\n| `gone.py` | old |\n"
    assert module_map_problems(doc, package) == [
        "pkg/sub/c.py: no row; add '| `sub/c.py` | what it is |' under its package",
        "pkg/gone.py: a row, but no such module (renamed or removed?)",
        "pkg/sub/b.py: 2 rows, one wanted",
    ]
    assert module_map_problems(
        doc.replace("gone.py", "sub/c.py").replace("again", ""), package
    ) == ["pkg/sub/b.py: 2 rows, one wanted"]
