"""What the gateway and the client agree on, and the only code they share: the wire protocol,
tokens, the placement rule, the names a share's processes get, servers.conf, small helpers."""
