"""The LDAP authentication method, on ldaptor.

client.py    connections to the configured servers (LDAPServerPool)
dn.py        how a username becomes a BIND (one BindStrategy per bind_dn_type)
filters.py   filters as ldaptor objects, never string formatting
home.py      home folder from an entry attribute and template
method.py    LDAPMethod: the steps of one login, traced
"""
