"""What runs in a front-end worker besides the HTTP layer: its view of the runners, and the
versions it sends work to. Nothing here imports a model runtime."""
