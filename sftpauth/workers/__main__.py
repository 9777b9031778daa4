"""``python -m sftpauth.workers``: one worker process (see :mod:`sftpauth.workers.worker`)."""

import signal
import sys

# First thing, before the imports that take most of a worker's start: the parent passes SIGHUP on
# to its workers, and its default action would end one that is still starting. The worker's
# FTPS services add their certificate reload to it once they run; SIGINT (Ctrl-C in a terminal)
# reaches the parent, which stops the workers in order.
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)

from sftpauth.workers.worker import main  # noqa: E402

sys.exit(main())
