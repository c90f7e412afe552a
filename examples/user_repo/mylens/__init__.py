"""A sample user project: its own lens model and training loop, checked by autohdr's pytest plugin."""
