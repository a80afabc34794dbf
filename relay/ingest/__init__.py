"""``/ingest``: where agents and pushing relays publish."""
