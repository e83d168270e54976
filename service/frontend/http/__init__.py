"""The HTTP layer: one module per protocol, over the versions a worker sends work to
(service/frontend/versions.py)."""
