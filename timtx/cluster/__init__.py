"""
The mesh between nodes: SWIM membership without I/O (L{timtx.cluster.swim}),
rendezvous ownership of keys (L{timtx.cluster.ownership}), the Twisted
service that runs them over authenticated peer links and carries messages
between nodes (L{timtx.cluster.membership}), and a seeded simulated network
to test and measure them (L{timtx.cluster.simulation}).  See
C{docs/cluster.md}.
"""
