curl -s localhost:8080/v1/embeddings -H 'Content-Type: application/json' \
     -d '{"model": "demo-text", "input": ["hello world", "another one"]}'
