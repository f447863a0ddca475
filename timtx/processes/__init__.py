"""
Many node processes on one host (C{[node] processes}, C{twist tim
--processes N}): a parent binds the listening sockets once and hands them
to N child processes, each a whole node, that together form one cluster.

  - L{timtx.processes.plan}: what each child is (its config, its argv) and
    which sockets the parent binds; no I/O but the cluster secret file.
  - L{timtx.processes.sockets}: binding those sockets in the parent, and
    listening on an inherited one in a child.
  - L{timtx.processes.child}: the node of a child process.
  - L{timtx.processes.supervisor}: the parent: starts, restarts and stops
    the children, and logs what they log.

Why a parent that binds and children that adopt, and not C{SO_REUSEPORT}:
see docs/cluster.md, "Many processes per host".
"""
