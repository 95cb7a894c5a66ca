"""``python -m normsurgeon``: the command line (see ``normsurgeon.cli``)."""
import sys

from .cli import main

sys.exit(main())
