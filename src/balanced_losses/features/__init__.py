"""Feature-level methods: act on each task's gradient at the shared features, in one backward.

The classes are imported from :mod:`balanced_losses` (one import path per class); the modules
here are private, one per method, with the autograd node they share in ``_branch``.
"""
