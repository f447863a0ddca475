"""
timtx benchmarks: a load generator speaking tim's client protocol, the
scenarios it runs, and the results they write.  See docs/benchmarks.md.

Layout:

  - L{bench.nodeproc}: the node under test, a child process.
  - L{bench.wire}: the lean WebSocket tim client the generator uses.
  - L{bench.worker}: a generator process and the L{bench.worker.Role} base
    of each scenario's client side.
  - L{bench.runner}: the parent: workers, scenarios, results.
  - L{bench.scenarios}: one module per scenario.
"""
