"""What operators read: health, metrics, per-site status."""
