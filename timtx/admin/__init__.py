"""
Operating a node: the admin API (timtx's REST API with its OpenAPI
document, and tim 2.0's server API), admin accounts and their roles, the
audit log, Prometheus metrics, the dashboard and the C{python -m timtx
admin} command line.

This floor sits above the node: it is handed a L{timtx.node.Node} and reads
its parts, and serves on a listener of its own (C{[admin] listen}); nothing
below imports it.  See C{docs/admin.md} and C{docs/monitoring.md}.
"""
