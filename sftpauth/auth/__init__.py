"""Authentication: one chain of methods behind Twisted's cred portal."""
