"""cnn-serving: a Keras CNN classifier behind HTTP, in three kinds of process.

- The launcher (cli.py) becomes gunicorn's master (gunicorn_conf.py), which starts, watches
  and restarts the runners (supervisor.py) and forks the front-end workers.
- frontend/: what runs in a worker: the Flask app and its protocols (http/), the event loop
  that reads requests whole (worker.py), the worker's view of what the runners serve
  (catalogue.py) and the versions it decodes uploads for and sends tensors to (versions.py).
  No model runtime is ever imported there.
- runner/: what runs in a runner, one per device: the model folder kept in step (reloader.py),
  each version's batcher (inference.py, batching.py), Keras (runtime.py), and the handler of
  the workers' requests (core.py) in its process (process.py).
- channel/: the one seam between the two: the wire format, the slot table every process
  maps, and each side's end of the ZeroMQ sockets.

Both sides also use the settings, the typed errors, the metrics, the logs and the registry of
models and versions (registry.py), which a runner fills from its folder and a worker from the
runners' catalogue.
"""
