"""
NAT traversal for nodes behind NAT (docs/nat.md).

 - L{timtx.nat.stun}: STUN messages (RFC 8489, RFC 5780), sans-IO.
 - L{timtx.nat.server}: the STUN server reachable nodes run for members.
 - L{timtx.nat.client}: STUN client transactions and L{timtx.nat.client.NatSocket}, the UDP
   socket shared by discovery, punching and the QUIC channel.
 - L{timtx.nat.discovery}: mapped address, mapping and filtering behaviour,
   reachability.
 - L{timtx.nat.coordination}: DCUtR-style coordination messages, sans-IO.
 - L{timtx.nat.punch}: hole punching on a socket.
 - L{timtx.nat.quic}: a Protocol over a QUIC stream on the punched path.

The relay and the wiring into membership belong to the mesh.
"""
