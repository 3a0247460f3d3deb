"""Server reflection, both v1alpha and v1.

grpcio-reflection 1.85 implements only `grpc.reflection.v1alpha`, while current clients
(grpcurl, Postman, grpc_cli) ask for `grpc.reflection.v1` first. The two protocols are the
same messages under another package name, so v1 is served by the same servicer with the
v1alpha serializers, and a renamed copy of the v1alpha file descriptor lets reflection
describe the v1 service too.

The protocol lets `file_containing_symbol` name a method (`package.Service.Method`, as grpcurl's
`describe` and ghz ask), answered with the file that defines the service; protobuf's upb
descriptor pool finds every other kind of symbol (messages, nested ones, fields, oneofs, enums,
enum values, extensions, services) but raises KeyError for methods, so the servicer here looks
methods up itself.
"""

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"
V1ALPHA_PACKAGE = "." + reflection_pb2.DESCRIPTOR.package + "."


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> tuple[str, ...]:
    """Serve reflection for `service_names` and both reflection services; returns all listed."""
    names = (*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME)
    register_v1_descriptor()
    servicer = ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    handler = grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": info})
    server.add_generic_rpc_handlers((handler,))
    return names


class ReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's aio servicer, with method names answered as symbols."""

    def _file_containing_symbol(self, request, fully_qualified_name):
        # Overrides grpcio-reflection's (1.85) helper; tests/server/test_reflection_clients.py
        # would see a version that no longer calls it.
        return super()._file_containing_symbol(
            request, symbol_for_lookup(self._pool, fully_qualified_name)
        )


def symbol_for_lookup(pool: descriptor_pool.DescriptorPool, name: str) -> str:
    """`name`, or for a method its service's name: the pool finds the file of the latter only."""
    try:
        return pool.FindMethodByName(name).containing_service.full_name
    except KeyError:
        return name


def register_v1_descriptor() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default pool, once."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE_NAME)
    except KeyError:
        pool.Add(v1_file_descriptor())


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The v1alpha file descriptor renamed to v1 (as upstream's v1 reflection.proto is)."""
    file = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    file.name, file.package = V1_FILE_NAME, "grpc.reflection.v1"
    file.options.Clear()
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.java_multiple_files = True
    file.options.java_outer_classname = "ServerReflectionProto"
    renamed = V1ALPHA_PACKAGE.replace("v1alpha", "v1")
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # proto2: assigning "" would set it
                field.type_name = field.type_name.replace(V1ALPHA_PACKAGE, renamed)
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(V1ALPHA_PACKAGE, renamed)
        method.output_type = method.output_type.replace(V1ALPHA_PACKAGE, renamed)
    return file
