"""Linux layer: syscalls, namespaces, mounts, cgroups and the capability probe (stdlib only)."""
