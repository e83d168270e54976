"""The configuration reference, generated from `Settings`: one row per field, in field order.

    python -m service.settings_docs                                 # print the Markdown table
    python -m service.settings_docs --write docs/configuration.md   # put it between the markers
    python -m service.settings_docs --check docs/configuration.md   # fail if that table is stale

Each row shows the field's environment variable, its default (the field's `default_doc` where
it has one, else the literal default), and its meaning (the field's `doc`); see
`service.settings.doc`. A field without documentation is an error, not an empty cell.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from service.settings import Settings

START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"

# Variables the service reads outside Settings, as (variable, default, meaning): prometheus
# client's, which service/gunicorn_conf.py sets when it is unset.
OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    (
        "PROMETHEUS_MULTIPROC_DIR",
        "a new temp folder",
        "where workers and runners share metric files; wiped at start",
    ),
)


def undocumented(settings_type: type = Settings) -> list[str]:
    """Return the names of the fields whose `doc` is missing or blank."""
    return [f.name for f in fields(settings_type) if not str(f.metadata.get("doc", "")).strip()]


def shown_default(f: Field[Any]) -> str:
    """Return a field's default column: its `default_doc`, else the literal default."""
    if "default_doc" in f.metadata:
        return str(f.metadata["default_doc"])
    return "(empty)" if f.default == "" else f"`{f.default}`"


def rows(settings_type: type = Settings) -> list[tuple[str, str, str]]:
    """Return the reference's rows, as (variable, default, meaning), fields first."""
    missing = undocumented(settings_type)
    if missing:
        raise LookupError(f"settings without documentation: {', '.join(missing)}")
    documented = [
        (f.name.upper(), shown_default(f), str(f.metadata["doc"])) for f in fields(settings_type)
    ]
    return documented + list(OTHER_VARIABLES)


def table(settings_type: type = Settings) -> str:
    """Return the reference as a Markdown table (no trailing newline)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for variable, default, meaning in rows(settings_type):
        cells = (f"`{variable}`", default, meaning)
        lines.append("| " + " | ".join(_cell(text) for text in cells) + " |")
    return "\n".join(lines)


def between_markers(text: str) -> str:
    """Return what lies between the markers of `text`, stripped; ValueError if they are not
    there, once each and in order."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} before one {END}")
    return text[text.index(START) + len(START) : text.index(END)].strip()


def with_table(text: str, reference: str) -> str:
    """Return `text` with what lies between its markers replaced by `reference`."""
    between_markers(text)
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{reference}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print the reference, or write it into (or check it against) a Markdown file."""
    parser = argparse.ArgumentParser(prog="python -m service.settings_docs", description=__doc__)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="FILE", help="replace FILE's table")
    action.add_argument("--check", type=Path, metavar="FILE", help="fail if FILE's is stale")
    args = parser.parse_args(argv)
    reference = table()
    path: Path | None = args.write or args.check
    if path is None:
        print(reference)
        return 0
    try:
        text = path.read_text(encoding="utf-8")
        current = between_markers(text)
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if current == reference:
        return 0
    if args.check:
        print(f"{path}: stale; run python -m service.settings_docs --write {path}", file=sys.stderr)
        return 1
    path.write_text(with_table(text, reference), encoding="utf-8")
    print(f"{path}: written")
    return 0


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
