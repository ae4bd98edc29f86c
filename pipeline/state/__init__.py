"""The node's state: the database tables, the job queue, the deliveries, and the leases a
worker or sender holds them by.

Every state change goes through the functions here; nothing else updates these rows.
"""
