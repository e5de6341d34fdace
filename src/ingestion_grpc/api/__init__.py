"""gRPC servicers: translate proto <-> domain calls, nothing more."""
