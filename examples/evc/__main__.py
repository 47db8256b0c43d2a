"""``python -m maskdecay_examples.evc``: the ``evc`` command."""
import sys

from .cli.main import main

sys.exit(main())
