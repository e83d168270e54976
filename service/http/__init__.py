"""The HTTP layer: one module per protocol, over the data plane in service/inference.py."""
