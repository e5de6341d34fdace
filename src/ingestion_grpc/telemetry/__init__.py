"""What operators watch: Prometheus metrics (`metrics.py`, served by `exposition.py`)
and log lines that say which request, source, run and mailbox they are about
(`context.py`, `logs.py`)."""
