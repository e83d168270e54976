"""`python -m service.runner`: one runner of a server (see service.runner.process)."""

import sys

from service.runner.process import main

sys.exit(main())
