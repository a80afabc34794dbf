"""The relay: ingest from agents, an event log, and the SSE feed users subscribe to."""
