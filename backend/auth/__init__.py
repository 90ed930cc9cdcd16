"""Token verification: pure functions and key caches, no web framework, no database."""
