from pathlib import Path

from d2v_serve.client import Client

with Client("localhost:50051") as client:
    client.list_models()                              # demo-audio, demo-image, demo-text: modality, hidden size, ...
    v = client.embed("a sentence", model="demo-text")  # np.ndarray [64], mean-pooled
    vs = client.embed(["one", "two"], model="demo-text", normalize=True)   # list of arrays, in order
    frames = client.embed(Path("speech.wav"), pooling="none")              # [frames, 64]: one vector per 20 ms
    target = client.embed(Path("cat.png"), representation="target")       # the data2vec target space
    print(v.shape, len(vs), frames.shape, target.shape)
