"""``python -m sftpauth.workers``: one worker process (see :mod:`sftpauth.workers.worker`)."""

import signal
import sys

# First thing, before the imports that take most of a worker's start: a SIGHUP to the process
# group (a closed terminal) would end a worker by its default action; the parent reloads the
# FTPS certificates and sends them. SIGINT (Ctrl-C in a terminal) reaches the parent, which
# stops the workers in order.
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)

from sftpauth.workers.worker import main  # noqa: E402

sys.exit(main())
