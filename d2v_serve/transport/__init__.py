"""Front ends over the embedding core: the gRPC service (wire parsing, tensors, auth, reflection) and the HTTP app
(schema, server). They translate requests and results and map errors to their statuses; no embedding logic."""
