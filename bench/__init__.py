"""Benchmarks of ``/status``: throughput, Consul load, propagation, memory, fleet.

Run from the repository root against real Consul agents on loopback (the
binary from ``$CONSUL_BINARY``, ``PATH``, else ``scripts/get-consul``)::

    python -m bench            # all of them
    python -m bench fleet      # one of them
    python -m bench --smoke    # a tiny run that checks it produces its tables

It prints markdown tables and writes ``bench/results.png`` and
``bench/fleet.png`` (with matplotlib, the ``bench`` extra) and
``bench/results.json``. The parts:

* :mod:`bench.__main__`: the command line, the report, the plot;
* :mod:`bench.common`: what the benchmarks share: processes, agents,
  backends, load generators, tables;
* one module per benchmark: :mod:`bench.throughput`,
  :mod:`bench.consul_load`, :mod:`bench.propagation`, :mod:`bench.memory`,
  :mod:`bench.fleet`;
* :mod:`bench.backends`: the backend processes (plain, seed-style and the
  library's handler, which can report when its answer changes);
* :mod:`bench.proxy`: the counting HTTP proxy in front of the agent;
* :mod:`bench.loadgen`: a keep-alive HTTP client, and the Python load
  generator used when ``wrk`` is not installed.
"""
