"""Placeholder replaced by the online family (issue 7); registers nothing yet."""
