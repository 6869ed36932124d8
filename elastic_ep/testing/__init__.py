"""Utilities for testing elastic jobs on one machine (like ``torch.testing``).

- :mod:`elastic_ep.testing.netns`: test hosts made of Linux network namespaces, with link
  partitions, delay and loss.
- :mod:`elastic_ep.testing.toy_engine`: a toy elastic engine whose ranks check their expert
  weights bit for bit after every event, with fault hooks.
- :mod:`elastic_ep.testing.host_launcher`: a launcher that forks ranks from one server per host.
- :mod:`elastic_ep.testing.fault_trial`: one fault trial (scale, fault, classified end), and
  the fault sweep's seeded trials.
"""
