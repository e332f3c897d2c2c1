"""Fast paths, kept apart from the papers' modules in ``crosslayer.models``.

Each fast path computes exactly what the modules it replaces compute, recognises exactly the
module types it implements, and steps aside (the model runs its plain modules) otherwise.
Which fast paths are on by default on which device kind is decided in :mod:`crosslayer.ops.defaults`.
"""
