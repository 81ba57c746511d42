"""Feature-level methods: act on each task's gradient at the shared features inside the one backward."""
