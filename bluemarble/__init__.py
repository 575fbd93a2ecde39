"""BlueMarble: shared runtime pieces (ids, validation, gRPC plumbing, logging) and the
generated API stubs under :mod:`bluemarble.v1`."""
