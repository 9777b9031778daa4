"""The Web Manager (SPEC §5): an HTTPS site on twisted.web.

- :mod:`.service`: ``[services/ID] type = manager``, the TLS listener (:mod:`.tls`);
- :mod:`.web`: routes, the request pipeline, pages and the ``/api/v1/`` JSON API;
- :mod:`.sessions`, :mod:`.csrf`, :mod:`.preauth`: who is logged in, and how;
- :mod:`.metrics`: ``/metrics`` (Prometheus) and the dashboard chart;
- :mod:`.events`, :mod:`.views`: audit events and what the pages show;
- ``templates/`` (Jinja2, autoescaped) and ``static/`` (our own CSS; no script, no CDN).

Logins go through the process's one authentication chain in manager mode
(``LoginRequest(manager=True)``), so bans, denied usernames and audit
events are those of FTP and SFTP logins.
"""
