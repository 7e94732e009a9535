"""Exported search bundles: the self-describing folder the search service loads."""
