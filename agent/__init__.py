"""The storage-node agent: inotify → typed events → the relay, losing nothing."""
