"""Safe recipes over `cryptography`: the only place in Veil that touches primitives directly."""
