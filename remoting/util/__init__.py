"""Small helpers both sides use: processes, tables."""
