"""`make bench`: session-watcher against the tools an operator would pick instead.

Run as `python -m bench` (full, writes bench/results.md) or `python -m bench --quick`
(smoke test of the harness; its figures mean nothing).
"""
