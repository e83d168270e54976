"""Reading the folder's text and JSON files, every fault one ModelFolderError naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model_folder.errors import ModelFolderError


def read_text(path: Path) -> str:
    """Return the UTF-8 text of `path`."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: cannot be read ({exc})") from None


def read_json(path: Path) -> Any:
    """Return the parsed JSON document of `path`."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None
