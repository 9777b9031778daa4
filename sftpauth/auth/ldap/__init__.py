"""The LDAP authentication method, on ldaptor.

client.py    connections to the configured servers: failover, health, probes (LDAPServerPool)
dn.py        how a username becomes a BIND (one BindStrategy per bind_dn_type)
filters.py   filters as ldaptor objects, never string formatting
groups.py    group_mapping / roles_mapping, group search, nested groups, external associations
home.py      home folder from an entry attribute and template
method.py    LDAPMethod: the steps of one login, traced
tls.py       LDAPS and StartTLS: trust, host name checks, why a certificate is refused
verify.py    sftpauth verify-ldap: every server checked step by step, with hints
wire.py      LDAP messages from a byte stream; what is not LDAP refused on its first byte
"""
