"""The `ferry` command-line tool (see `ferry.cli.main`).

gRPC's C core logs each failed TLS handshake on stderr at INFO level, which would come
before the one line the CLI prints about it (`ferry: error: the broker's certificate ...`).
So unless the environment says otherwise, the command keeps gRPC's own log to errors; this
has to happen before gRPC is first imported, hence here.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
