"""Tickets served over NBD: protocol.py (pure: handshake options,
requests, replies), server.py (one connection on the connections
machinery)."""
