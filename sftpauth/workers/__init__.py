"""``[server] workers = N``: N reactor processes sharing the listening sockets of one sftpauth.

The parent (the ``twistd`` process) binds the FTP, FTPS and SFTP sockets,
generates the SSH host keys when needed, and starts N worker processes
(``python -m sftpauth.workers``) that inherit those sockets and accept on
them; the kernel hands each connection to one of them. The parent runs the
services that must exist once (the Web Manager, the embedded demo
directory), writes the audit file, and keeps the ``state = memory`` bans and
used TOTP codes for every worker. docs/workers.rst tells the whole design.

- :mod:`.channel`: the AMP connection between the parent and each worker
  (audit events, readiness; the state commands are in :mod:`sftpauth.state`);
- :mod:`.pool`: the parent's side: shared sockets, starting, restarting,
  stopping and signalling the workers, relaying their log lines;
- :mod:`.worker`: a worker process's ``main``.
"""

CHANNEL_FD = 3  # the worker's end of its channel to the parent
FIRST_SOCKET_FD = 4  # the inherited listening sockets follow, one per service
