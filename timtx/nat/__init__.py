"""
STUN, UDP hole punching and relay for nodes behind NAT.  Not built yet.
"""
