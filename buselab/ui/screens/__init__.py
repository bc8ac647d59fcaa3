"""Screens pushed over the lab (help, and later the steering dialogs)."""
