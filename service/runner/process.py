"""A runner: the process (or, in tests, the thread) that holds the models of one device.

It loads and warms every model version, keeps them in step with the model folder, batches
the images of every worker and runs the forward passes. `python -m service.runner` is one
runner of a server, started and restarted by the master's supervisor (service.supervisor);
`Runner` alone, in a thread, serves an app built in-process (tests, `flask run`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from service import logs
from service.channel.client import runner_address
from service.channel.server import RunnerServer
from service.channel.slots import (
    FIRST_START_ENV,
    RUNNER_INDEX_ENV,
    SERVER_ENV,
    SlotTable,
)
from service.registry import Models, Phase
from service.runner.core import RunnerCore
from service.runner.explainer import Explainer
from service.runner.inference import Classifier, ModelVersion
from service.runner.reloader import ModelManager
from service.settings import Settings
from service.supervisor import exit_with_parent

log = logging.getLogger(__name__)


class Runner:
    """One runner's models, batchers and channel server."""

    def __init__(
        self,
        settings: Settings,
        slots: SlotTable,
        index: int,
        server_id: str,
        classifier: Classifier | None = None,
    ) -> None:
        """Serve as runner `index` of server `server_id`: `classifier` alone if given, else
        the model folder of `settings`."""
        self.settings = settings
        self.slots = slots
        self.index = index
        self.models: Models[ModelVersion] = Models(
            settings.threads, on_change=lambda: slots.changed(index)
        )
        self.manager = ModelManager(settings, self.models, classifier, runner=str(index))
        self.explainer = Explainer(settings.explain_concurrency)
        self.core = RunnerCore(self.models, self.manager, slots, index, self.explainer)
        self.server = RunnerServer(runner_address(server_id, index), self.core)
        self._given = classifier is not None
        self._serving = threading.Thread(target=self.server.serve, name="channel", daemon=True)

    def start(self) -> None:
        """Answer on the channel from a thread, and load the models (a given classifier at
        once, a folder's in the background)."""
        self._serving.start()
        self.manager.start(background=not self._given)

    def close(self, timeout: float | None = None) -> None:
        """Finish the work queued, answer it, and stop."""
        self.manager.close(timeout)
        self.explainer.close()
        self.server.stop()
        self._serving.join(timeout)
        self.slots.stopped(self.index)

    def watch_inference(self) -> None:
        """Tell the workers (a new catalogue) once an inference thread has died."""
        self.manager.wait_inference_died()
        self.slots.changed(self.index)


def main() -> int:
    """Run one runner of a server until SIGTERM; exit 1 if its models fail or it breaks.

    On its first start (the master waits for it before it binds the port), nothing but one
    line saying why reaches stderr if the models cannot be loaded.
    """
    from service.cli import skip_plotting_imports

    skip_plotting_imports()
    settings = Settings.from_env()
    logs.configure(settings.log_level)
    quiet = logs.QuietStart() if os.environ.get(FIRST_START_ENV) else None
    index = int(os.environ[RUNNER_INDEX_ENV])
    slots = SlotTable.inherited()
    exit_with_parent()
    runner = Runner(settings, slots, index, os.environ[SERVER_ENV])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGHUP, lambda signum, frame: runner.manager.reload())
    runner.start()
    runner.manager.wait_started(timeout=None)  # type: ignore[arg-type]
    if runner.manager.phase is Phase.FAILED:
        if quiet is not None:
            quiet.failed(f"cnn-serve: error: {runner.manager.failure}")
        slots.judged(index, loaded=False)
        runner.server.stop()
        return 1
    if quiet is not None:
        quiet.succeeded()
    slots.judged(index, loaded=True)
    died: list[bool] = []

    def stop_when_inference_dies() -> None:
        runner.watch_inference()
        died.append(True)
        stop.set()

    threading.Thread(target=stop_when_inference_dies, name="runner-watch", daemon=True).start()
    while not stop.wait(1.0):
        pass
    if died:
        log.error("runner %d stops: an inference thread died", index, extra={"runner": index})
        runner.server.stop()
        return 1
    # The master stops the runners once its workers have exited, which they do only once
    # every request they accepted is answered: what is left here has no one waiting for it,
    # so a batch still running is given a moment, not a request's lifetime.
    log.info("runner %d: SIGTERM, stopping", index, extra={"runner": index})
    runner.close(timeout=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
