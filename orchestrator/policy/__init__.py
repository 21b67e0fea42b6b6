"""Policy: pure decisions (state + observation -> what to do), replayable in unit tests (below the controller).

Recovery, placement, the optimizer, pool planning, run environments, cloud features, limits, node credentials and
endpoints. No I/O of their own beyond reading the catalog and the clouds' declared capacity; never the controller or
the services.
"""
