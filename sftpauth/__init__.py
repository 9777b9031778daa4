"""sftpauth: FTP/FTPS, SFTP and an HTTPS Web Manager authenticating against LDAP."""

__version__ = "0.1.0"
