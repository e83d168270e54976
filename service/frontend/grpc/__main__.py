"""`python -m service.frontend.grpc`: the gRPC front end of a server (started by its master)."""

import sys

from service.frontend.grpc.process import main

sys.exit(main())
