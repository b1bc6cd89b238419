"""`python -m d2v_serve.bulk` = `d2v-bulk`."""

import sys

from .cli import main

sys.exit(main())
