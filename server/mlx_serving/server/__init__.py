"""The wire layer: gRPC servicers, validation, error mapping and the server process.

The only code that imports grpc, protobuf or the generated `mlx_serving.v1` stubs.
"""
