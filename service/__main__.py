"""Run the service: `python -m service` is `cnn-serve`."""

import sys

from service.cli import main

sys.exit(main())
