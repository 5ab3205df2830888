"""The command-line entry points, the top layer: each parses its arguments and calls the library.

`train` (train.py, flip-train), `evaluate` (eval/*.py), `query` (flip-query), `export`
(flip-export) and `data` (flip-data). Nothing in the library imports them.
"""
