"""The README, tried as a newcomer would (issue 15, item 3): every fenced ``bash``, ``python``
and ``toml`` block of README.md is run, or skipped for a reason written in the README next to
it, and every relative link resolves.

The convention (an HTML comment on the line right before a fence; invisible on GitHub):

    <!-- readme-test: ACTION[; FLAG]...[: REASON] -->

- no marker, or ``run``: run the block (``bash``: ``bash -eu -o pipefail``; ``python``: a
  fresh interpreter; ``toml``: parse it);
- ``skip: REASON``: do not run it (the reason is required);
- ``skip-commands CMD[, CMD]...: REASON`` (``bash``): split the block into commands (at line
  ends and ``&&``; ``#`` comments and ``\\`` continuations understood) and run all but those
  whose first words are one of the CMDs; every CMD must match a command;
- ``skip-section: REASON``, before a heading: skip every block under that heading, up to the
  next heading of the same or a higher level;
- ``file NAME`` (``toml``): parse it and write it as NAME into the working folder of the shell
  and Python blocks after it;
- ``excerpt PATH``: the block is a verbatim part of the repository file PATH (``toml`` is
  parsed too);
- ``output`` (``text``): an abbreviated excerpt of what the nearest shell block above prints;
  that block's test checks each line against its fresh output (``...`` lines are gaps; table
  rows are matched by solver, grid, budget and tolerance, errors within 2 %, times ignored;
  other lines with every number masked);
- flags: ``continues`` (``python``): run after the previous Python block, in the same
  interpreter (the blocks are concatenated); ``slow``: the test gets the ``slow`` mark;
  ``needs MODULE``: skipped where MODULE (an optional extra's) is not installed.

A fence with another language (or none), a malformed marker, a marker that is not followed by
a fence, or one whose action does not fit the block fails ``test_every_block_is_classified``,
so a new block cannot be silently ignored; ``text`` blocks need no marker (they are output).

Commands are typed from the repository root, so each block runs in a fresh temporary folder
that holds a symbolic link to every top-level entry of the repository (git-tracked, when the
repository is a git checkout): repository paths resolve as from the root, and everything the
commands write (``./solverlab-compare/<time>/``, checkpoints, EMS files) lands in the
temporary folder. ``python``, ``solverlab`` and ``pip`` are those of the interpreter running
the tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: Languages of fenced blocks: code that is run (or skipped with a reason), and output.
CODE = ("bash", "python", "toml")
OUTPUT = "text"
ACTIONS = {
    # action: (languages it applies to, needs an argument, needs a reason)
    "run": (CODE, False, False),
    "skip": (CODE, False, True),
    "skip-commands": (("bash",), True, True),
    "file": (("toml",), True, False),
    "excerpt": (CODE, True, False),
    "output": ((OUTPUT,), False, False),
}
FLAGS = {"continues", "slow"}
MARKER = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
HEADING = re.compile(r"^(?P<level>#{1,6})\s")
NEEDS = re.compile(r"needs (?P<module>[A-Za-z_][\w.]*)")
#: Entries of the repository root not linked into the working folder (outputs, caches).
NOT_LINKED = {".git", ".tox", ".venv", "venv", ".hypothesis", ".pytest_cache", ".ruff_cache",
              "__pycache__", "build", "dist", "site", "solverlab-compare", "solverlab-order",
              "solverlab-lipschitz"}
BLOCK_TIMEOUT = 600  # seconds; the slowest block takes about 20


@dataclass
class Block:
    """One fenced block of the README and what its marker says to do with it."""

    index: int
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    action: str = "run"
    arg: str = ""
    reason: str = ""
    flags: frozenset[str] = frozenset()
    error: str = ""  # why the block is unclassified or its marker malformed
    excerpt: Block | None = None  # an `output` block that shows this block's output
    previous: Block | None = None  # for `continues`: the Python block run before this one

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'none'}"


@dataclass
class _Marker:
    line: int
    action: str = "run"
    arg: str = ""
    reason: str = ""
    flags: frozenset[str] = field(default_factory=frozenset)
    error: str = ""


def _marker(line_no: int, body: str) -> _Marker:
    """Parse ``ACTION[ ARG][; FLAG]...[: REASON]``."""
    head, sep, reason = body.partition(":")
    reason = reason.strip()
    parts = [p.strip() for p in head.split(";")]
    action, _, arg = parts[0].partition(" ")
    flags = frozenset(parts[1:])
    m = _Marker(line_no, action, arg.strip(), reason, flags)
    where = f"README.md:{line_no}: marker <!-- readme-test: {body} -->"
    if action == "skip-section":
        if not reason or arg or flags:
            m.error = f"{where}: give 'skip-section: REASON' (a reason, nothing else)"
        return m
    if action not in ACTIONS:
        m.error = (f"{where}: unknown action {action!r}; allowed: "
                   f"{', '.join([*ACTIONS, 'skip-section'])}")
    elif ACTIONS[action][1] and not m.arg:
        m.error = f"{where}: action {action!r} needs an argument"
    elif not ACTIONS[action][1] and m.arg:
        m.error = f"{where}: action {action!r} takes no argument; got {m.arg!r}"
    elif ACTIONS[action][2] and not reason:
        m.error = f"{where}: action {action!r} needs a reason after ':'"
    elif sep and not reason:
        m.error = f"{where}: empty reason after ':'"
    elif bad := sorted(f for f in flags if f not in FLAGS and not NEEDS.fullmatch(f)):
        m.error = (f"{where}: unknown flag(s) {bad}; allowed: {sorted(FLAGS)} and "
                   "'needs MODULE'")
    return m


def parse(text: str) -> list[Block]:
    """The fenced blocks of ``text`` (Markdown) with their markers; problems go to
    ``Block.error`` (or raise ``ValueError`` for a marker that belongs to no block)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: _Marker | None = None
    section: tuple[int, str] | None = None  # (heading level, reason) of a skip-section
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang = line[3:].strip()
            start = i + 1
            i += 1
            while i < len(lines) and lines[i].rstrip() != "```":
                i += 1
            if i == len(lines):
                raise ValueError(f"README.md:{start}: the fence is never closed")
            block = Block(len(blocks), start, lang, "\n".join(lines[start:i]) + "\n")
            marker = pending if pending is not None and pending.line == start - 1 else None
            if pending is not None and marker is None:
                raise ValueError(f"README.md:{pending.line}: the marker is not on the line "
                                 "right before a fence")
            pending = None
            _classify(block, marker, section, blocks)
            blocks.append(block)
        elif (m := MARKER.match(line)) is not None:
            if pending is not None:
                raise ValueError(f"README.md:{pending.line}: the marker is not on the line "
                                 "right before a fence")
            pending = _marker(i + 1, m.group("body"))
            if pending.error:
                raise ValueError(pending.error)
        elif "readme-test" in line:
            raise ValueError(f"README.md:{i + 1}: malformed marker {line.strip()!r}; write "
                             "<!-- readme-test: ACTION[; FLAG]...[: REASON] -->")
        elif (h := HEADING.match(line)) is not None:
            level = len(h.group("level"))
            if section is not None and level <= section[0]:
                section = None
            if pending is not None:
                if pending.action != "skip-section":
                    raise ValueError(f"README.md:{pending.line}: the marker is not on the line "
                                     "right before a fence")
                section, pending = (level, pending.reason), None
        elif pending is not None and (pending.action != "skip-section" or line.strip()):
            raise ValueError(f"README.md:{pending.line}: the marker is not on the line right "
                             + ("before a heading" if pending.action == "skip-section"
                                else "before a fence"))
        i += 1
    if pending is not None:
        raise ValueError(f"README.md:{pending.line}: the marker belongs to no block")
    return blocks


def _classify(block: Block, marker: _Marker | None, section: tuple[int, str] | None,
              before: list[Block]) -> None:
    where = f"README.md:{block.line}: ```{block.lang} block"
    if block.lang not in (*CODE, OUTPUT):
        block.error = (f"{where}: unclassified language {block.lang!r}; the test knows "
                       f"{', '.join((*CODE, OUTPUT))}")
        return
    if section is not None:
        if marker is not None:
            block.error = f"{where}: a marker inside a skip-section"
        block.action, block.reason = "skip", f"skip-section: {section[1]}"
        return
    if marker is None:
        block.action = "run" if block.lang in CODE else "show"
        return
    block.action, block.arg, block.reason, block.flags = (
        marker.action, marker.arg, marker.reason, marker.flags)
    if block.lang not in ACTIONS[marker.action][0]:
        block.error = f"{where}: action {marker.action!r} does not apply to {block.lang}"
    elif "continues" in block.flags:
        prev = next((b for b in reversed(before) if b.lang == "python"), None)
        if block.lang != "python" or block.action != "run":
            block.error = f"{where}: only a run Python block continues"
        elif prev is None or prev.action != "run" or prev.error:
            block.error = f"{where}: continues, but the Python block before it is not run"
        else:
            block.previous = prev
    elif block.action == "output":
        shell = next((b for b in reversed(before) if b.lang == "bash"), None)
        if shell is None or shell.action not in ("run", "skip-commands"):
            block.error = f"{where}: an output excerpt, but the shell block above is not run"
        else:
            shell.excerpt = block


TEXT = README.read_text(encoding="utf-8")
BLOCKS = parse(TEXT)


def _param(block: Block):
    marks = [pytest.mark.slow] if "slow" in block.flags else []
    return pytest.param(block, id=block.id, marks=marks)


# ---------------------------------------------------------------------------------------------
# Running blocks


def _linked_entries() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True,
                             text=True, check=True).stdout
        names = {p.split("/", 1)[0] for p in out.splitlines() if p}
    except (OSError, subprocess.CalledProcessError):
        names = {p.name for p in ROOT.iterdir()}
    return [ROOT / n for n in sorted(names)
            if n not in NOT_LINKED and not n.endswith(".egg-info") and (ROOT / n).exists()]


def _workdir(tmp_path: Path, block: Block) -> Path:
    """A folder that looks like the repository root, and the files of earlier ``file``
    blocks."""
    root = tmp_path / "root"
    root.mkdir()
    for entry in _linked_entries():
        (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for b in BLOCKS[:block.index]:
        if b.action == "file" and not b.error:
            target = root / b.arg
            if target.is_symlink():
                target.unlink()
            target.write_text(b.code, encoding="utf-8")
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _run(argv: list[str], cwd: Path, what: str) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"{what} exited with {proc.returncode}; its output ends:\n{output[-4000:]}")
    return proc.stdout


def split_commands(code: str) -> list[str]:
    """The simple commands of a shell block: lines (``\\`` continuations joined) split at
    ``&&`` outside quotes, ``#`` comments dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        cur: list[str] = []
        quote = None
        i = 0
        while i < len(line):
            c = line[i]
            if quote:
                quote = None if c == quote else quote
            elif c in "'\"":
                quote = c
            elif c == "#" and (i == 0 or line[i - 1].isspace()):
                break
            elif line.startswith("&&", i):
                commands.append("".join(cur).strip())
                cur, i = [], i + 2
                continue
            cur.append(c)
            i += 1
        commands.append("".join(cur).strip())
    return [c for c in commands if c]


def kept_commands(block: Block) -> str:
    """``skip-commands``: the block without the named commands."""
    prefixes = [p.split() for p in block.arg.split(",")]
    commands = split_commands(block.code)
    kept, used = [], set()
    for c in commands:
        hit = [k for k, p in enumerate(prefixes) if c.split()[:len(p)] == p]
        used.update(hit)
        if not hit:
            kept.append(c)
    unused = [" ".join(p) for k, p in enumerate(prefixes) if k not in used]
    assert not unused, (f"README.md:{block.line}: skip-commands names {unused}, which no command "
                        f"of the block starts with; its commands: {commands}")
    assert kept, f"README.md:{block.line}: skip-commands leaves nothing to run: use skip"
    return "\n".join(kept) + "\n"


NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _masked(line: str) -> str:
    return " ".join(NUMBER.sub("#", line).split())


def _close(a: str, b: str, rtol: float = 0.02) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return abs(x - y) <= rtol * max(abs(x), abs(y))


def excerpt_problems(excerpt: str, output: str) -> list[str]:
    """The lines of an ``output`` excerpt that the fresh output does not bear out."""
    lines = output.splitlines()
    rule = next((k for k, ln in enumerate(lines) if ln.startswith("---")), len(lines))
    table = []  # the rows: from the rule under the header to the first blank line
    for ln in lines[rule + 1:]:
        if not ln.strip():
            break
        table.append(ln.split())
    rows = {tuple(r[:4]): r for r in table}
    if rule > 0:
        rows[tuple(lines[rule - 1].split()[:4])] = lines[rule - 1].split()  # the header
    out = [ln for ln in lines if ln.strip()]
    masked = {_masked(ln) for ln in out}
    problems = []
    for line in excerpt.splitlines():
        s = line.strip()
        if not s or s == "...":
            continue
        toks = s.split()
        if set(s) <= {"-", " "}:
            ok = any(set(ln.strip()) <= {"-", " "} for ln in out)
        elif tuple(toks[:4]) in rows and len(toks) >= 10:
            # solver grid budget tol steps nfe rms median time status...: time (8) varies
            row = rows[tuple(toks[:4])]
            ok = (len(row) == len(toks) and row[9:] == toks[9:] and row[4:6] == toks[4:6]
                  and all(_close(a, b) for a, b in zip(row[6:8], toks[6:8])))
        else:
            ok = _masked(s) in masked
        if not ok:
            problems.append(s)
    return problems


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if b.lang != OUTPUT or b.error])
def test_readme_block(block: Block, tmp_path: Path) -> None:
    if block.error:
        pytest.fail(block.error)
    if block.action == "skip":
        pytest.skip(f"README.md:{block.line}: {block.reason}")
    for flag in block.flags:
        if (m := NEEDS.fullmatch(flag)) is not None:
            pytest.importorskip(m.group("module"))
    if block.lang == "toml":
        data = tomllib.loads(block.code)
        assert data, f"README.md:{block.line}: an empty TOML block"
    if block.action == "excerpt":
        source = (ROOT / block.arg).read_text(encoding="utf-8")
        assert block.code.strip() in source, (
            f"README.md:{block.line}: the block is not a verbatim part of {block.arg}")
        return
    if block.lang == "toml":
        return
    cwd = _workdir(tmp_path, block)
    script = tmp_path / "script"
    script.mkdir()
    if block.lang == "python":
        chain, b = [], block
        while b is not None:
            chain.insert(0, b)
            b = b.previous
        path = script / "block.py"
        path.write_text("\n".join(b.code for b in chain), encoding="utf-8")
        # The script lies outside the working folder, so the working folder (with its link to
        # the source tree) is not on sys.path: imports are those of the test's interpreter.
        _run([sys.executable, str(path)], cwd,
             "the Python block(s) at README.md:" + ", ".join(str(b.line) for b in chain))
        return
    code = kept_commands(block) if block.action == "skip-commands" else block.code
    path = script / "block.sh"
    path.write_text("set -eu -o pipefail\n" + code, encoding="utf-8")
    output = _run(["bash", str(path)], cwd, f"the shell block at README.md:{block.line}")
    if block.excerpt is not None:
        problems = excerpt_problems(block.excerpt.code, output)
        assert not problems, (
            f"README.md:{block.excerpt.line}: the output excerpt is stale; these lines are not "
            "in a fresh run (regenerate the excerpt from the command's output):\n"
            + "\n".join(problems) + "\n--- the output:\n" + output[-6000:])


def test_every_block_is_classified() -> None:
    errors = [b.error for b in BLOCKS if b.error]
    assert not errors, "\n".join(errors)
    # Guard against a parser that silently finds nothing.
    run = [b for b in BLOCKS if b.action in ("run", "skip-commands")]
    assert len(run) >= 8 and {b.lang for b in run} == {"bash", "python"}
    assert any(b.excerpt is not None for b in BLOCKS)


# ---------------------------------------------------------------------------------------------
# The convention itself


def test_convention_unmarked_runs_and_bad_markers_fail() -> None:
    blocks = parse("```bash\necho hi\n```\n\n```sh\nls\n```\n\n```\nx\n```\n"
                   "<!-- readme-test: skip: installs -->\n```python\nimport os\n```\n")
    assert [b.action for b in blocks] == ["run", "run", "run", "skip"]
    assert [bool(b.error) for b in blocks] == [False, True, True, False]
    assert blocks[3].reason == "installs"
    for bad in ("<!-- readme-test: skip -->\n```bash\nls\n```\n",  # no reason
                "<!-- readme-test: ignore -->\n```bash\nls\n```\n",  # unknown action
                "<!-- readme-test: run; fast -->\n```bash\nls\n```\n",  # unknown flag
                "<!-- readme-test: run; needs -->\n```bash\nls\n```\n",  # needs what?
                "<!-- readme-test: run -->\n\n```bash\nls\n```\n",  # not right before
                "<!-- readme-test run -->\n```bash\nls\n```\n",  # no colon
                "<!-- readme-test: run -->\ntext\n"):  # no fence
        with pytest.raises(ValueError):
            parse(bad)
    # An action that does not fit the block, and a `continues` with nothing before it.
    assert parse("<!-- readme-test: skip-commands pip: x -->\n```python\n1\n```\n")[0].error
    assert parse("<!-- readme-test: run; continues -->\n```python\n1\n```\n")[0].error


def test_convention_sections_continues_and_commands() -> None:
    blocks = parse("```python\na = 1\n```\n<!-- readme-test: run; continues -->\n```python\n"
                   "print(a)\n```\n<!-- readme-test: skip-section: two machines -->\n\n## S\n\n"
                   "```bash\ntorchrun x\n```\n### sub\n```bash\ntorchrun y\n```\n## T\n"
                   "```bash\nls\n```\n")
    assert blocks[1].previous is blocks[0]
    assert [b.action for b in blocks[2:]] == ["skip", "skip", "run"]
    assert "two machines" in blocks[3].reason
    commands = split_commands("# c\npip install -e . && solverlab compare  # run\n"
                              "solverlab x --a 'p && q' \\\n    --b 1\n")
    assert [" ".join(c.split()) for c in commands] == [
        "pip install -e .", "solverlab compare", "solverlab x --a 'p && q' --b 1"]
    b = parse("<!-- readme-test: skip-commands pip install, tox: installs -->\n```bash\n"
              "pip install -c c.txt -e . && solverlab compare\npip install tox && tox\n```\n")[0]
    assert kept_commands(b) == "solverlab compare\n"
    b.arg = "pip install, conda"
    with pytest.raises(AssertionError, match="conda"):
        kept_commands(b)


def test_excerpt_check_catches_a_stale_row() -> None:
    out = ("solver  grid    budget  tol  steps  nfe  rms error  median error  time [ms]  status\n"
           "------  ------  ------  ---  -----  ---  ---------  ------------  ---------  ------\n"
           "ddim    logsnr  5       -    5      5    3.840e-01  2.461e-01     1.5        ok\n"
           "\n3 runs on 'g' (256 samples, seed 0) in 3.4 s: 3 ok\n")
    good = ("ddim    logsnr  5       -    5      5    3.841e-01  2.461e-01     9.9        ok\n"
            "...\n3 runs on 'g' (256 samples, seed 0) in 7.0 s: 3 ok\n")
    assert excerpt_problems(good, out) == []
    stale = good.replace("3.841e-01", "3.0e-01").replace("3 ok", "2 ok, 1 diverged")
    assert len(excerpt_problems(stale, out)) == 2


# ---------------------------------------------------------------------------------------------
# Links

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_relative_links_resolve() -> None:
    prose = re.sub(r"^```.*?^```", "", TEXT, flags=re.S | re.M)
    prose = re.sub(r"`[^`]*`", "", prose)  # code spans, also across lines
    anchors = {_slug(h) for h in re.findall(r"^#{1,6}\s+(.*)$", prose, flags=re.M)}
    targets = LINK.findall(prose)
    assert len(targets) >= 10  # the README links its docs, images and notebooks
    broken = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in anchors:
                broken.append(f"{target} (no heading has this anchor)")
        elif not (ROOT / path).exists():
            broken.append(f"{target} (no such file)")
    assert not broken, "README.md links to what is not there:\n" + "\n".join(broken)
