"""The lab: a live Textual TUI over a running Session.

Only this package (screens/ included) imports Textual; everything below the UI
runs headless. The lab polls telemetry on a timer (see `model.LabModel`) and
never takes one message per request.
"""
