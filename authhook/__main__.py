"""``python -m authhook`` is the ``authhook`` command."""

from authhook.cli import main

main()
