"""The command layer: the only place absl flags are defined.

One module per command (train, ingest, export, evaluate, recommend, serve,
catalog, synth); `main` dispatches `tt-mimic <command>`; `run_dir` tells
the Makefile the run directory a flagfile names.
"""
