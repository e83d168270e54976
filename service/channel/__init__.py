"""The channel between front-end workers and runners: the only code both sides import for it.

wire: the format of what crosses; slots: the table every process maps; client: the
workers' side; server: the runners' side.
"""
