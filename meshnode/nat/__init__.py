"""NAT traversal capabilities: reachability (AutoNAT v2 client and server)."""
