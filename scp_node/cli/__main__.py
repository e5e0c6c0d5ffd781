"""``python -m scp_node.cli``."""

from scp_node.cli import app

app()
