"""Private implementation; nothing here is public API."""
