"""
Wire formats without I/O that are not tim's client protocol: the peer
protocol between timtx nodes (L{timtx.protocols.wire.peer}).
"""
