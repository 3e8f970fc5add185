"""The control channel: a Unix-socket server in the daemon and the `walacorctl` client.

`protocol` defines the wire format, `registry` the method table that capabilities
register on, `server` and `connection` the daemon side, `client` and `cli` the
`walacorctl` side, and `interfaces` what the probes and mode machine provide.
"""
