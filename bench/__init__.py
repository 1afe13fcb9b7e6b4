"""Benchmarks of ``/status``: throughput, Consul load, propagation, memory.

Run from the repository root against a real Consul dev agent on loopback
(found or fetched the way the tests get one, see ``tests/consul_agent.py``)::

    python -m bench            # the full run, a few minutes
    python -m bench --smoke    # a tiny run that checks it produces its table

It prints a markdown table and writes ``bench/results.png`` (with matplotlib,
the ``bench`` extra) and ``bench/results.json``. The parts:

* :mod:`bench.run`: the orchestration, the measurements and the report;
* :mod:`bench.backends`: the backend processes (plain, seed-style and the
  library's handler);
* :mod:`bench.proxy`: the counting HTTP proxy in front of the agent;
* :mod:`bench.loadgen`: a keep-alive HTTP client, the Python load generator
  used when ``wrk`` is not installed, and the poller of the propagation test.
"""
