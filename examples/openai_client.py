from openai import OpenAI

client = OpenAI(base_url="http://localhost:8080/v1", api_key="unused")   # api_key: the --auth-token, when set
reply = client.embeddings.create(model="demo-text", input=["hello world", "another one"])
vectors = [item.embedding for item in reply.data]                      # mean pooled, L2-normalised, [64] each
print(len(vectors), len(vectors[0]))
