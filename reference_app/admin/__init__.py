"""The admin and self-service API: keys, plans and quota requests.

Each resource is one router module; a new one (usage, error logs) is one more
module added to :data:`reference_app.admin.routers.ROUTERS`.
"""
