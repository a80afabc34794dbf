"""Relays feeding relays: pulling upstream feeds, pushing to other relays."""
