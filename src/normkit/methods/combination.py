"""Placeholder replaced by the combination family (issue 7); registers nothing yet."""
