"""Loss-level weightings: each combines the task losses' values into one total.

The classes are imported from :mod:`balanced_losses` (one import path per class); the modules
here are private, one per method.
"""
