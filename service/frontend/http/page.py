"""GET /: a page to try the models in a browser, and its files.

The page is hand-written HTML, CSS and JavaScript (service/frontend/http/page/), and speaks only the
public API any client uses: /readyz, V2 model metadata, /predict and /metrics. Nothing here
is page-only but the files themselves.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

blueprint = Blueprint("page", __name__)

FILES = Path(__file__).parent / "page"


def assets() -> list[str]:
    """Return the names of the page's files."""
    return sorted(path.name for path in FILES.iterdir() if path.is_file())


@blueprint.get("/")
def index() -> Response:
    """Serve the page."""
    return send_from_directory(FILES, "index.html")


@blueprint.get("/page/<file>")
def asset(file: str) -> Response:
    """Serve one of the page's files (its script, its style sheet)."""
    return send_from_directory(FILES, file)
