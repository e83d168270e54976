"""The Flask application factory: wiring, the error table, health and metrics endpoints."""

from __future__ import annotations

import math
import os
import time
import uuid
from typing import TYPE_CHECKING

from flask import Flask, Response, current_app, g, request

from service import logs, metrics
from service.channel.client import RunnerClient
from service.channel.slots import SERVER_ENV, SlotTable
from service.errors import (
    InvalidRequest,
)
from service.frontend.body_deadline import BodyWithDeadline
from service.frontend.catalogue import Catalogue
from service.frontend.http import docs, page, predict, tfserving, v2
from service.frontend.http.base import (
    answer_errors,
    json_response,
    number_parameter,
    release_leases,
)
from service.frontend.protocol_rules import request_id
from service.frontend.raw_errors import error_document
from service.frontend.versions import RemoteVersion
from service.registry import Models
from service.settings import Settings

if TYPE_CHECKING:
    from service.runner.inference import Classifier

# Set by the gunicorn worker (service.frontend.worker): the monotonic time the request's first byte
# arrived, where its one deadline starts, and whether its whole body is already in memory.
ARRIVED_AT = "cnn_serving.arrived_at"
BODY_BUFFERED = "cnn_serving.body_buffered"


def create_app(settings: Settings | None = None, classifier: Classifier | None = None) -> Flask:
    """Build the app around the runners of the server it runs in (gunicorn's master names
    them); with none, around a runner in this process (tests, `flask run`), serving
    `classifier` if given, else the models of settings.model_path.

    A given classifier is warmed up before this returns; models from a folder load and warm
    in the background while /healthz answers and /readyz says 503 "starting".
    """
    settings = settings or Settings.from_env()
    logs.configure(settings.log_level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_body_bytes
    app.config["MAX_FORM_PARTS"] = settings.max_images_per_request * 2 + 8
    app.config["SETTINGS"] = settings
    app.config["API_TOKEN"] = settings.bearer_token

    server_id = os.environ.get(SERVER_ENV)
    if server_id and classifier is None:
        client = RunnerClient(server_id, SlotTable.inherited())
    else:
        client = _runner_in_process(app, settings, classifier)
    models: Models[RemoteVersion] = Models(settings.threads)
    catalogue = Catalogue(settings, client, models)
    catalogue.refresh(retry=True)
    catalogue.start()
    app.extensions["models"] = models
    app.extensions["catalogue"] = catalogue

    app.before_request(_begin_request)
    app.after_request(_end_request)
    app.teardown_request(release_leases)
    answer_errors(app, _error_body)
    app.add_url_rule("/healthz", view_func=_healthz)
    app.add_url_rule("/readyz", view_func=_readyz)
    if not settings.metrics_port:
        app.add_url_rule("/metrics", view_func=_metrics)
    app.register_blueprint(predict.blueprint)
    app.register_blueprint(tfserving.blueprint)
    app.register_blueprint(v2.blueprint)
    app.register_blueprint(docs.blueprint)
    app.register_blueprint(page.blueprint)
    return app


def _runner_in_process(
    app: Flask, settings: Settings, classifier: Classifier | None
) -> RunnerClient:
    """Start a runner in a thread of this process; return a client of it."""
    from service.runner.process import Runner  # imports Keras only to load a folder

    slots = SlotTable.create(1)
    slots.started(0)
    server_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    runner = Runner(settings, slots, 0, server_id, classifier)
    runner.start()
    app.extensions["runner"] = runner
    return RunnerClient(server_id, slots)


def catalogue() -> Catalogue:
    """Return the current app's view of its runners."""
    return current_app.extensions["catalogue"]


def _healthz() -> Response:
    if catalogue().alive:
        return json_response({"status": "alive"})
    return json_response(catalogue().readiness(), 503)


def _readyz() -> Response:
    view = catalogue()
    return json_response(view.readiness(), 200 if view.ready else 503)


def _metrics() -> Response:
    payload, content_type = metrics.exposition()
    return Response(payload, mimetype=None, content_type=content_type)


def _begin_request() -> None:
    g.started = time.perf_counter()
    # Before any lookup: a version published by a runner is seen by every request after.
    catalogue().refresh()
    g.request_id = request_id(request.headers.get("X-Request-ID", ""))
    if request.method != "POST":
        return
    settings: Settings = current_app.config["SETTINGS"]
    # The request's one deadline, from its first byte: its arrival, queue admission and the
    # wait for a batch all measure against it.
    arrived_at = request.environ.get(ARRIVED_AT, time.monotonic())
    g.deadline = arrived_at + _timeout_s(settings.request_timeout_s)
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        # A body already buffered needs no watch on its socket, only the framing checks.
        watched = None if request.environ.get(BODY_BUFFERED) else sock
        request.environ["wsgi.input"] = BodyWithDeadline(
            request.environ["wsgi.input"], watched, g.deadline
        )


def _timeout_s(limit_s: float) -> float:
    """Return the request's timeout: the client's (`timeout` or X-Request-Timeout), capped."""
    requested = request.args.get("timeout") or request.headers.get("X-Request-Timeout")
    timeout_s = number_parameter(requested, "timeout", float, limit_s)
    if not 0 < timeout_s < math.inf:
        raise InvalidRequest(f"timeout must be a positive number of seconds, got {requested}")
    return min(timeout_s, limit_s)


def _end_request(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "")
    # The route, or the one a view says its path stands for (TF Serving routes by hand).
    rule = g.get("metrics_endpoint") or (
        request.url_rule.rule if request.url_rule is not None else "unmatched"
    )
    started = g.get("started")
    if started is not None:
        elapsed = time.perf_counter() - started
        status = str(response.status_code)
        metrics.REQUEST_LATENCY.labels(metrics.HTTP, rule, status).observe(elapsed)
        for served in g.get("leases", ()):
            served.metrics.request.observe(elapsed)
    return response


def _error_body(code: str, message: str) -> object:
    """Return an error in the shape of the protocol whose path the request is under.

    By the path, not by the route: an unknown path or a wrong method is refused by the
    routing, before any protocol's code has run.
    """
    for protocol in (v2, tfserving):
        prefix = protocol.PATH_PREFIX
        if request.path == prefix or request.path.startswith(prefix + "/"):
            return protocol.error_body(code, message)
    return error_document(code, message)
