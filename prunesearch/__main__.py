"""``python -m prunesearch`` is the same as the ``prunesearch`` command."""

import sys

from prunesearch.cli import main

sys.exit(main())
