"""Run the Python samples of the documentation pages and the README, and check their output.

Each page's ```python blocks run in order in one namespace, in a temporary working
directory, so a later block can use the names an earlier one defined. When a ```text block
follows a Python block (only blank lines between them), what the block writes must equal
that text, line by line, ignoring trailing spaces. As on a terminal, that is stdout and
stderr together, with warnings and log lines, and each block runs as if saved as
``example.py`` and started with ``python example.py``.

Two HTML comments, invisible on the site, change that for the block right after them:

- ``<!-- docs-test: skip (reason) -->`` before a Python block: the block does not run.
  Keep it for samples that need the network, a GPU or a long training run.
- ``<!-- docs-test: ellipsis -->`` before a text block: ``...`` in the expected output
  matches any text, as doctest's ELLIPSIS option does, for values that vary between runs
  such as timings.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import linecache
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").rglob("*.md")) + ["README.md"]

# TODO: pages whose samples fail at present; their owners are changing them. Each is a strict
# expected failure, so the test fails as soon as the page passes: delete its entry then.
KNOWN_FAILURES = {}

SAMPLE_FILE = "example.py"
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<mark>skip|ellipsis)\b(?P<reason>.*?)-->\s*$")


@dataclass
class Block:
    """One fenced code block of a page."""

    language: str
    code: str
    line: int  # 1-based line of the opening fence
    mark: str | None  # "skip" or "ellipsis" from a docs-test comment right before the fence
    follows_previous: bool  # only blank lines between this block and the one before it


@dataclass
class Sample:
    """A Python block to run, with the output it must print when a text block follows it."""

    code: str
    line: int
    skip: bool
    expected: str | None
    ellipsis: bool


def read_blocks(text: str) -> list[Block]:
    """Return the fenced code blocks of a Markdown text in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    mark = None
    blank_since_block = True  # no previous block yet
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence is None:
            found = _MARK.match(line)
            if found:
                mark = found.group("mark")
            elif line.strip():
                mark = None
                blank_since_block = False
            index += 1
            continue

        indent = fence.group("indent")
        start = index
        index += 1
        body = []
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index].removeprefix(indent))
            index += 1
        if index == len(lines):
            raise ValueError(f"The code block opened on line {start + 1} is never closed.")
        index += 1
        blocks.append(Block(fence.group("lang"), "\n".join(body) + "\n", start + 1, mark, blank_since_block))
        mark = None
        blank_since_block = True
    return blocks


def read_samples(text: str) -> list[Sample]:
    """Return the Python samples of a Markdown text, each paired with the text block after it."""
    blocks = read_blocks(text)
    samples = []
    for position, block in enumerate(blocks):
        if block.language not in ("python", "py"):
            continue
        after = blocks[position + 1] if position + 1 < len(blocks) else None
        has_output = after is not None and after.language == "text" and after.follows_previous
        samples.append(
            Sample(
                code=block.code,
                line=block.line,
                skip=block.mark == "skip",
                expected=after.code if has_output else None,
                ellipsis=has_output and after.mark == "ellipsis",
            )
        )
    return samples


def _normalize(output: str) -> str:
    return "\n".join(line.rstrip() for line in output.strip("\n").splitlines()) + "\n"


def outputs_match(expected: str, actual: str, ellipsis: bool) -> bool:
    """Compare printed output with the text block, ignoring trailing spaces on each line."""
    expected, actual = _normalize(expected), _normalize(actual)
    if not ellipsis:
        return expected == actual
    return doctest.OutputChecker().check_output(expected, actual, doctest.ELLIPSIS)


def test_reader_pairs_samples_with_output():
    text = (
        "<!-- docs-test: skip (needs a GPU) -->\n"
        "```python\nx = 1\n```\n\n"
        "```python\nprint(2)\n```\n\n"
        "<!-- docs-test: ellipsis -->\n"
        "```text\n2 ...\n```\n\n"
        "```python\nprint(3)\n```\n\nSome prose.\n\n```text\nnot output\n```\n"
    )
    samples = read_samples(text)
    assert [sample.skip for sample in samples] == [True, False, False]
    assert samples[0].expected is None
    assert samples[1].expected == "2 ...\n"
    assert samples[1].ellipsis
    assert samples[2].expected is None


def test_api_reference_covers_all():
    import finetunekit

    documented = set()
    for path in (ROOT / "docs" / "api").glob("*.md"):
        documented.update(re.findall(r"^::: finetunekit\.(\w+)\s*$", path.read_text(encoding="utf-8"), re.MULTILINE))
    missing = sorted(set(finetunekit.__all__) - documented)
    assert not missing, f"Names in finetunekit.__all__ without a '::: finetunekit.NAME' entry under docs/api: {missing}"


def test_ellipsis_is_opt_in():
    assert outputs_match("took ... s\n", "took 1.5 s\n", ellipsis=True)
    assert not outputs_match("took ... s\n", "took 1.5 s\n", ellipsis=False)
    assert outputs_match("a  \nb\n\n", "a\nb", ellipsis=False)


def _print_warning(message, category, filename, lineno, file=None, line=None):
    # pytest records warnings in place of printing them; print them to the current stderr.
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def reader_terminal(stream: io.StringIO):
    """Send stdout, stderr, warnings and root log handlers to ``stream``, as a terminal would show them.

    The suite's filters turn finetunekit's warnings into errors, and pytest's own log
    handlers on the root logger would make ``logging.basicConfig`` in a sample do nothing, so
    both are reset inside and restored afterwards.
    """
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    loggers = [root] + [item for item in logging.root.manager.loggerDict.values() if isinstance(item, logging.Logger)]
    saved_levels = {logger: logger.level for logger in loggers}
    root.handlers = []
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.showwarning = _print_warning
            yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = saved_handlers
        for item in logging.root.manager.loggerDict.values():
            if isinstance(item, logging.Logger):
                item.setLevel(saved_levels.get(item, logging.NOTSET))
        root.setLevel(saved_levels[root])


def _page_param(page: str):
    if page in KNOWN_FAILURES:
        return pytest.param(page, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[page], strict=True))
    return page


@pytest.mark.parametrize("page", [_page_param(page) for page in PAGES])
def test_page_samples(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    samples = read_samples((ROOT / page).read_text(encoding="utf-8"))
    if not any(not sample.skip for sample in samples):
        pytest.skip(f"{page} has no Python sample to run")

    namespace: dict = {"__name__": "__main__"}
    terminal = io.StringIO()
    # Blocks share one namespace, as in one notebook, but logging and warning settings reset
    # between blocks, as when each block runs as its own script.
    for sample in samples:
        if sample.skip:
            continue
        with reader_terminal(terminal):
            where = f"{page}:{sample.line}"
            # Each block runs as if saved as example.py and run with `python example.py`, which
            # is the file name that warnings and tracebacks show.
            linecache.cache[SAMPLE_FILE] = (len(sample.code), None, sample.code.splitlines(True), SAMPLE_FILE)
            start = len(terminal.getvalue())
            try:
                exec(compile(sample.code, SAMPLE_FILE, "exec"), namespace)  # noqa: S102 (runs the repository's own docs)
            except Exception as error:
                raise AssertionError(f"The sample at {where} raised {type(error).__name__}: {error}") from error
            actual = terminal.getvalue()[start:]
            if sample.expected is not None:
                assert outputs_match(sample.expected, actual, sample.ellipsis), (
                    f"The sample at {where} printed other output than the text block after it.\n"
                    f"--- expected\n{sample.expected}--- printed\n{actual}"
                )
