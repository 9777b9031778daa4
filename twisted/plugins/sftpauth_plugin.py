from twisted.application.service import ServiceMaker

sftpauth = ServiceMaker(
    "sftpauth",
    "sftpauth.tap",
    "FTP/FTPS, SFTP and Web Manager server authenticating against LDAP",
    "sftpauth",
)
