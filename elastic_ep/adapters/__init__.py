"""Adapters that plug elastic_ep into serving engines (imported lazily; no engine required)."""
