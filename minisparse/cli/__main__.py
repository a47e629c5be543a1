"""``python -m minisparse.cli`` = the ``minisparse`` command."""
import sys

from .main import main

sys.exit(main())
