"""Warm starts for the process backend: flow runs forked from an engine that imported Prefect.

`engine_helper.py` is the helper itself (run by path with Prefect's interpreter, never imported
by flowhand); `pool.py` starts helpers and asks them for runs; `identity.py` keeps the records
that let a restarted worker re-attach forked runs; `settings.py` holds the `[process]` keys;
`proven.py` the one list of Prefect series proven warm; `memory.py` what a new helper could have.
"""
