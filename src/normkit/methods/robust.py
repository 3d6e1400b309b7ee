"""Placeholder replaced by the robust family (issue 7); registers nothing yet."""
