"""The bottom layer: errors, host facts, expectations and gates, timing, the artifact cache.

Nothing here imports any other part of the package: every layer above may use it.
"""
