"""``python -m neurovision.cli``: the ``neurovision`` command."""

from neurovision.cli import cli_entry

cli_entry()
