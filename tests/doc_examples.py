"""The code blocks of the README and the docs, as tests/test_examples.py runs them.

Every fenced block names its language. Shell (`sh`, `bash`, `shell`, `console`) and `python`
blocks are examples to run; `json`, `yaml`, `promql` and `text` blocks are output, config or
pictures. The previous non-blank line before a block may annotate it, as an HTML comment that
neither GitHub nor the site shows:

- `<!-- not-run: REASON -->`: an example that cannot run here (a cluster, a GPU, Docker's
  base images, the network, minutes of training); the reason is required.
- `<!-- output-of: COMMAND -->`: a `json` block showing what the shell COMMAND answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL = {"sh", "bash", "shell", "console"}
PYTHON = {"python", "py"}
RUNNABLE = SHELL | PYTHON
NOT_RUN = {"json", "yaml", "promql", "text"}

FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
COMMENT = re.compile(r"^<!--\s*(?P<kind>[\w-]+):(?P<value>.*?)-->\s*$")
ANNOTATIONS = {"not-run", "output-of"}

# The ports the examples use, and the repository-relative paths they may rely on.
HTTP_PORT, GRPC_PORT = 8080, 8081
LOCAL = re.compile(r"\b(?P<host>localhost|127\.0\.0\.1):(?P<port>\d+)\b")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None = None  # the reason, for an example marked not to run
    output_of: str | None = None  # the command whose answer a json block shows

    @property
    def where(self) -> str:
        """Return `page:line`, the page relative to the repository."""
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def runnable(self) -> bool:
        """Return whether the block is an example to run here."""
        return self.language in RUNNABLE and self.not_run is None


def blocks(page: Path) -> list[Block]:
    """Return the page's fenced code blocks with their annotations; raise ValueError on an
    unterminated block or an annotation that is not directly before a block."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    pending: tuple[int, str, str] | None = None  # (line, kind, value) of an annotation
    index = 0
    while index < len(lines):
        text = lines[index]
        comment = COMMENT.match(text.strip())
        opening = FENCE.match(text)
        if comment and comment["kind"] in ANNOTATIONS:
            if pending:
                raise ValueError(f"{page.name}:{pending[0]}: annotation not before a block")
            pending = (index + 1, comment["kind"], comment["value"].strip())
        elif opening:
            fence = opening["fence"]
            end = index + 1
            while end < len(lines) and lines[end].rstrip() != fence:
                end += 1
            if end == len(lines):
                raise ValueError(f"{page.name}:{index + 1}: the block is never closed")
            annotation = {pending[1]: pending[2]} if pending else {}
            pending = None
            found.append(
                Block(
                    page,
                    index + 1,
                    opening["info"].strip().split(" ")[0].lower(),
                    "\n".join(lines[index + 1 : end]) + "\n",
                    annotation.get("not-run"),
                    annotation.get("output-of"),
                )
            )
            index = end
        elif text.strip() and pending:
            raise ValueError(f"{page.name}:{pending[0]}: annotation not directly before a block")
        index += 1
    if pending:
        raise ValueError(f"{page.name}:{pending[0]}: annotation after the last block")
    return found


def all_blocks() -> list[Block]:
    """Return the blocks of the README and of every page of the docs."""
    return [block for page in PAGES for block in blocks(page)]


def shell_script(block: Block) -> str:
    """Return a shell block as a script: a `console` block's commands without their prompts
    and output; other shell blocks as they are."""
    if block.language != "console":
        return block.code
    commands, continued = [], False
    for text in block.code.splitlines():
        if text.startswith("$ ") or continued:
            command = text[2:] if text.startswith("$ ") and not continued else text
            commands.append(command)
            continued = command.endswith("\\")
    return "\n".join(commands) + "\n"


def local_ports(code: str, http: int, grpc: int) -> str:
    """Return the example with the service's documented ports (8080, 8081) on loopback
    replaced by the test server's; raise ValueError for another loopback port."""
    ports = {HTTP_PORT: http, GRPC_PORT: grpc}

    def replace(match: re.Match) -> str:
        port = int(match["port"])
        if port not in ports:
            raise ValueError(f"an example calls {match[0]}, not the service's 8080 or 8081")
        return f"{match['host']}:{ports[port]}"

    return LOCAL.sub(replace, code)


# A shell function that makes every curl of an example fail on an HTTP error status: curl
# exits 22 on a 4xx or 5xx (after writing the body, so the test shows it), unless the example
# already asks for --fail itself (curl refuses both). Pipes are run with pipefail, so a failed
# curl fails its pipeline.
CURL_FAILS_ON_ERROR = r"""
curl() {
  local arg
  for arg in "$@"; do
    case $arg in
      --fail | --fail-with-body) command curl "$@"; return ;;
      --*) ;;
      -*f*) command curl "$@"; return ;;
    esac
  done
  command curl --fail-with-body "$@"
}
"""


def structure_differences(shown: object, real: object, labels: set[str], at: str = "") -> list:
    """Return where an example's JSON differs from a real answer in form: a key present in
    one and not the other, a list of another length, a value of another type, or another
    string (a class label may differ: the tests' model is untrained). Numbers may differ."""
    where = at or "the answer"
    if isinstance(shown, dict) and isinstance(real, dict):
        if set(shown) != set(real):
            return [f"{where}: keys {sorted(shown)} shown, {sorted(real)} answered"]
        return [
            difference
            for key in shown
            for difference in structure_differences(shown[key], real[key], labels, f"{at}.{key}")
        ]
    if isinstance(shown, list) and isinstance(real, list):
        if len(shown) != len(real):
            return [f"{where}: {len(shown)} items shown, {len(real)} answered"]
        return [
            difference
            for index, (item, answered) in enumerate(zip(shown, real, strict=True))
            for difference in structure_differences(item, answered, labels, f"{at}[{index}]")
        ]
    numbers = (int, float)
    both_numbers = isinstance(shown, numbers) and isinstance(real, numbers)
    if both_numbers and isinstance(shown, bool) == isinstance(real, bool):  # True is an int
        return []
    if isinstance(shown, str) and isinstance(real, str):
        if shown == real or {shown, real} <= labels:
            return []
        return [f"{where}: {shown!r} shown, {real!r} answered"]
    if type(shown) is type(real) and shown == real:
        return []
    return [f"{where}: {shown!r} shown, {real!r} answered"]
