"""Placeholder replaced by the multimode family (issue 7); registers nothing yet."""
