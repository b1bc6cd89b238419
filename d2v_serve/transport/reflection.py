"""gRPC server reflection, both protocol versions: v1 (what current grpcurl, Postman and grpc_cli ask for first)
and v1alpha (older tools). grpcio-reflection implements v1alpha only; v1 differs in the package name alone, so the
v1 service hands each message, re-read as its v1alpha twin, to grpcio-reflection's servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from .._proto.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from .._proto.grpc.reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc

V1_SERVICE_NAME = v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name  # grpc.reflection.v1...
V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME


class ReflectionV1(v1_pb2_grpc.ServerReflectionServicer):
    def __init__(self, service_names: Iterable[str]) -> None:
        self._v1alpha = v1alpha.aio.ReflectionServicer(list(service_names))

    async def ServerReflectionInfo(  # noqa: N802 - the generated servicer's method name
        self, request_iterator: AsyncIterator[v1_pb2.ServerReflectionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[v1_pb2.ServerReflectionResponse]:
        async def as_v1alpha() -> AsyncIterator[v1alpha_pb2.ServerReflectionRequest]:
            async for request in request_iterator:
                yield v1alpha_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self._v1alpha.ServerReflectionInfo(as_v1alpha(), context):
            yield v1_pb2.ServerReflectionResponse.FromString(response.SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) for `service_names` and for the two reflection services themselves."""
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    v1alpha.enable_server_reflection(names, server)
    v1_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionV1(names), server)
