"""Command-line tools. gRPC's C core prints its own log lines on stderr (a failed TLS
handshake is one, at info), before the command's one-line error: quiet below ERROR unless
``GRPC_VERBOSITY`` says otherwise. Set here, before anything imports grpc: the core reads
it once, when it loads."""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
