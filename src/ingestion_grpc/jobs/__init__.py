"""Background work: the queue the API sends to, and the Dramatiq actors."""
