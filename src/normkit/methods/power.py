"""Placeholder replaced by PowerNorm (issue 7); registers nothing yet."""
