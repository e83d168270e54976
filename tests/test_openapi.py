"""GET /openapi.json and /docs: a valid OpenAPI 3.1 document of every route, fuzzed live."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from tests.conftest import start_server

# Examples per operation: enough for hypothesis to vary every body field and parameter, few
# enough that the 30-odd operations run in about two minutes on two cores.
MAX_EXAMPLES = 100


def test_document_validates_as_openapi_3_1(client):
    document = client.get("/openapi.json").get_json()
    OpenAPIV31SpecValidator(document).validate()
    assert document["openapi"] == "3.1.0"


def test_every_flask_rule_is_documented(app, client):
    documented = set(client.get("/openapi.json").get_json()["paths"])
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        if rule.endpoint == "tfserving.dispatch":
            # One catch-all rule serves TF Serving's routes; each one served is documented.
            for suffix in ("", "/metadata", ":predict", ":classify"):
                assert "/v1/models/{name}" + suffix in documented
                assert "/v1/models/{name}/versions/{version}" + suffix in documented
        else:
            assert path in documented, f"{rule.rule} is not in /openapi.json"


def test_every_documented_path_is_served(client):
    for path, item in client.get("/openapi.json").get_json()["paths"].items():
        concrete = path.format(name="shapes", version="2", asset="swagger-ui.css", file="page.js")
        for method in item:
            if method == "get":
                with client.get(concrete) as response:
                    assert response.status_code == 200, path


def test_path_parameters_name_the_served_model(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    operation = paths["/v2/models/{name}/versions/{version}"]
    schemas = {p["name"]: p["schema"] for p in operation["get"]["parameters"]}
    assert schemas["name"]["enum"] == ["shapes"]
    assert schemas["version"]["enum"] == ["2"]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value or "" for key, value in attrs if key in ("src", "href")]


@pytest.mark.parametrize("page", ["/docs", "/"])
def test_pages_link_nothing_on_another_host(client, page):
    with client.get(page) as response:
        assert response.status_code == 200 and response.mimetype == "text/html"
        links = _Links()
        links.feed(response.get_data(as_text=True))
    assert links.urls, "the page links its scripts and styles"
    for url in links.urls:
        assert not urlsplit(url).netloc, f"{url} is on another host"
        with client.get(urljoin(page, url)) as asset:
            assert asset.status_code == 200, url


# About 90 s on the 2-core development machine: room for one 7 times slower, and bounded.
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzzing_finds_no_server_error_and_every_answer_matches_its_schema(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path)
    report = tmp_path / "schemathesis.json"
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "st"),
                "run",
                server.url + "/openapi.json",
                "--checks=not_a_server_error,response_schema_conformance",
                f"--max-examples={MAX_EXAMPLES}",
                "--seed=1",
                "--suppress-health-check=all",
                "--report=json",
                f"--report-json-path={report}",
            ],
            capture_output=True,
            text=True,
            timeout=1500,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-2000:]
    figures = json.loads(report.read_text())
    assert figures["operations"]["tested"] == figures["operations"]["total"] >= 20
    assert figures["test_cases"]["with_failures"] == 0 and not figures["failures"]
    assert not figures["errors"]
