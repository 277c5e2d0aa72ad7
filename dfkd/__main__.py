"""``python -m dfkd`` and ``accelerate launch -m dfkd``: the same CLI as the ``dfkd`` command."""

import sys

from dfkd.cli import main

sys.exit(main())
