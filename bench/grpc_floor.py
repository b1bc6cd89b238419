"""gRPC's own CPU cost per call: a grpc.aio server with d2v-serve's options whose Embed parses the request and, after
`--delay-ms` (standing in for the queue and the model), returns a canned one-vector response. Run by bench/overhead.py
under the same load generator as d2v-serve; whatever d2v-serve's event loop spends beyond this is its own code.

    python -m bench.grpc_floor --port 50999 --delay-ms 200
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def serve(port: int, delay_s: float, hidden: int) -> None:
    import grpc
    import numpy as np

    from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
    from d2v_serve.config import ServerConfig
    from d2v_serve.server import grpc_options
    from d2v_serve.transport.grpc_service import SERVICE_NAME
    from d2v_serve.transport.tensors import to_tensor

    canned = pb.EmbedResponse(embeddings=[pb.Embedding(tensor=to_tensor(np.zeros(hidden, np.float32)))])

    async def embed(raw: bytes, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        request = pb.EmbedRequest.FromString(raw)
        await asyncio.sleep(delay_s)
        response = pb.EmbedResponse()
        response.CopyFrom(canned)
        response.model = request.model
        return response

    server = grpc.aio.server(options=grpc_options(ServerConfig()))
    handler = grpc.unary_unary_rpc_method_handler(embed, response_serializer=pb.EmbedResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Embed": handler}),))
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.grpc_floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="each call's wait before its answer")
    p.add_argument("--hidden", type=int, default=768, help="floats in the canned vector")
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.port, args.delay_ms / 1000, args.hidden))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
