"""The dCache-compatible events API (channels, subscriptions, SSE)."""
