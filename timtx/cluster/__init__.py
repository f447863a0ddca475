"""
The mesh between nodes: SWIM membership without I/O (L{timtx.cluster.swim}),
rendezvous ownership of keys (L{timtx.cluster.ownership}), the Twisted
service that runs them over authenticated peer links and carries messages
between nodes (L{timtx.cluster.membership}), a seeded simulated network
to test and measure them (L{timtx.cluster.simulation}), and the routing of
client operations between nodes: the user directory
(L{timtx.cluster.directory}), the router (L{timtx.cluster.router}),
conversations stored and routed by their owner
(L{timtx.cluster.messaging}), groups stored by their owner and sent once
to each node holding members (L{timtx.cluster.groups}), the mirrored caches
(L{timtx.cluster.caches}) and their payloads (L{timtx.cluster.wire}).  See
C{docs/cluster.md}.
"""
