"""Model formats: each turns a model folder into networks plus their pre- and post-steps.

A format knows nothing of how windows are laid out or stitched; the runtimes in
:mod:`scp_node.inference.runtime` know nothing of folders.
"""
