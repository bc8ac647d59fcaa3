"""The backends buselab ships: ram, file (BUSE's lo), null, plugin and cow.

`storage.registry` makes them from names; each module's docstring says what it keeps.
"""
