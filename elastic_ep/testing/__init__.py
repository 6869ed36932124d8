"""Utilities for testing elastic jobs on one machine (like ``torch.testing``).

- :mod:`elastic_ep.testing.netns`: test hosts made of Linux network namespaces, with link
  partitions, delay and loss.
"""
