"""The relay's namespace view: every file and directory its events say exist, kept in step
with the log, and served as ``GET /state``, as dCache's namespace listing, and as the snapshot
that ``GET /events?since=snapshot`` starts with."""
