"""Hypothesis settings for the whole suite: no per-example deadline.

Examples here run real collectives and planners on a shared 2-core machine, where one slow
example says nothing about correctness; every wait in the library has its own timeout instead.
"""

from hypothesis import settings

settings.register_profile("elastic_ep", deadline=None)
settings.load_profile("elastic_ep")
