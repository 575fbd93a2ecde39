"""Generated protobuf and gRPC stubs of the bluemarble.v1 API (scripts/gen_protos.py)."""
