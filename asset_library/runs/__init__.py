"""Running shards from a terminal: a client of Dagster's public API.

``orchestrate``: ``asset-library ingest``, the jobs' runs side by side with retries and Ctrl-C.
``worker``: a run worker, the process that executes those runs. ``instance``: the library's own
Dagster instance and the runs whose process died. ``progress_view``: the ingest on a terminal.
``processes``: who a run's process is, and stop signals held over a write.
"""
