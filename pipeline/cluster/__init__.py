"""Ray: the actor pool, connecting to a cluster or starting a local one, job submission.

The only subpackage that imports Ray.
"""
