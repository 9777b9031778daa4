"""``python -m sftpauth.workers``: one worker process (see :mod:`sftpauth.workers.worker`)."""

import sys

from sftpauth.workers.worker import main

sys.exit(main())
