"""
Membership, ownership and routing between nodes.  Not built yet: a node runs
alone.  See docs/index.md for the roadmap.
"""
