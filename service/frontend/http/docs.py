"""GET /openapi.json and GET /docs: the API's OpenAPI document, and Swagger UI rendering it.

Swagger UI's files come from the flask-swagger-ui wheel and are served from here, so the page
loads nothing from another host.
"""

from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from flask import Blueprint, Response, current_app, render_template_string, send_from_directory

from service.frontend.http import openapi
from service.frontend.http.base import json_response
from service.frontend.http.page import assets as page_assets

blueprint = Blueprint("docs", __name__)

ASSETS = Path(flask_swagger_ui.__file__).parent / "dist"
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>cnn-serving API</title>
  <link rel="stylesheet" href="{{ url_for('docs.asset', asset='swagger-ui.css') }}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{{ url_for('docs.asset', asset='swagger-ui-bundle.js') }}"></script>
  <script>
    // validatorUrl null: Swagger UI would otherwise send the document to a public validator.
    window.ui = SwaggerUIBundle({
      url: "{{ url_for('docs.document') }}", dom_id: "#swagger-ui", validatorUrl: null
    });
  </script>
</body>
</html>
"""


def assets() -> list[str]:
    """Return the names of the page's files."""
    return sorted(path.name for path in ASSETS.iterdir() if path.is_file())


@blueprint.get("/openapi.json")
def document() -> Response:
    """Answer the OpenAPI document, naming the models served now."""
    metrics = any(rule.rule == "/metrics" for rule in current_app.url_map.iter_rules())
    models = current_app.extensions["models"]
    return json_response(openapi.document(models, metrics, assets(), page_assets()))


@blueprint.get("/docs")
def page() -> str:
    """Render the document with Swagger UI."""
    return render_template_string(_PAGE)


@blueprint.get("/docs/<asset>")
def asset(asset: str) -> Response:
    """Serve one of Swagger UI's files."""
    return send_from_directory(ASSETS, asset)
