"""The relay's event log: one interface, its backends, and the admission rule they share."""
