"""What the server answers, recorded from outside the process, to keep outputs bit-identical across refactors.

`record(target, http_url)` sends every output kind (representation last/target x pooling mean/cls/none x normalize
x float32/float16, plus chunked audio and text with the per-window breakdown) to every served model, once over gRPC
and once over HTTP (`/v1/embed`, base64 data; `/v1/embeddings`, float and base64), and returns the arrays by name.
The inputs are made here, deterministically, and kept small so the recorded file stays small.

`python -m tests.golden_outputs` records against the bundled demo models and the committed tiny model files in
tests/data/golden/ and writes tests/data/golden/outputs.npz (run it only when an output change is intended).
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request
from itertools import product
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
from d2v_serve._proto.d2v.v1 import embedder_pb2_grpc as pb_grpc
from tests.serve_fixtures import encode_audio, encode_image, picture, tone

GOLDEN = Path(__file__).parent / "data" / "golden"
OUTPUTS = GOLDEN / "outputs.npz"
ENVIRONMENT = "_environment"  # where the recording was made (see `environment`)
TINY_MODELS = GOLDEN / "models"  # tiny random models written by the exporter of main at 2dbf5b9
DEMO_NAMES = ("demo-audio", "demo-image", "demo-text")
TINY_NAMES = ("tiny-audio", "tiny-image", "tiny-text")

_OPTIONS = list(product(("last", "target"), ("mean", "cls", "none"), (False, True), ("float32", "float16")))
_PROTO_POOLING = {"mean": pb.POOLING_MEAN, "cls": pb.POOLING_CLS, "none": pb.POOLING_NONE}
_PROTO_REPRESENTATION = {"last": pb.REPRESENTATION_LAST_LAYER, "target": pb.REPRESENTATION_TARGET}
_PROTO_DTYPE = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}
_NUMPY_DTYPE = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT16: "<f2", "float32": "<f4", "float16": "<f2"}
_LONG_TEXT = " ".join(["The ferry leaves the harbour at dawn, and the gulls follow it out past the lighthouse."] * 4)


def _pcm(seconds: float, seed: int) -> dict[str, Any]:
    samples = tone(seconds, 22050, 330.0, seed)
    return {"pcm": {"data": samples.astype("<f4").tobytes(), "encoding": "float32", "sample_rate": 22050,
                    "channels": 1}}


def inputs(modality: str) -> list[dict[str, Any]]:
    """Each input as {kind: value}: two or three of different lengths, so a request's inputs share a padded batch."""
    if modality == "audio":
        return [{"audio": encode_audio(tone(0.4, 16000, 440.0, 1), 16000, "WAV")},
                {"audio": encode_audio(tone(0.8, 16000, 220.0, 2), 16000, "FLAC")}, _pcm(0.3, 3)]
    if modality == "image":
        return [{"image": encode_image(picture(80, 60, 1), "PNG")}, {"image": encode_image(picture(50, 70, 2), "JPEG")}]
    return [{"text": "A short one."}, {"text": "A violin is tuned before the concert in the old hall."}]


def long_input(modality: str) -> dict[str, Any]:
    if modality == "audio":
        return {"audio": encode_audio(tone(3.0, 16000, 300.0, 4), 16000, "WAV")}
    return {"text": _LONG_TEXT}


def _chunking(modality: str) -> dict[str, Any]:
    return {"enabled": True, "window": 1.5 if modality == "audio" else 24.0,
            "overlap": 0.25 if modality == "audio" else 6.0, "windows": True}


# ---- gRPC -------------------------------------------------------------------------------------------------------


def _proto_input(item: dict[str, Any]) -> pb.Input:
    (kind, value), = item.items()
    if kind == "pcm":
        return pb.Input(pcm=pb.Pcm(data=value["data"], encoding=pb.Pcm.ENCODING_FLOAT32,
                                   sample_rate=value["sample_rate"], channels=value["channels"]))
    return pb.Input(**{kind: value})


def _array(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, _NUMPY_DTYPE[tensor.dtype]).reshape(tuple(tensor.shape)).copy()


def _grpc(stub: pb_grpc.EmbedderStub, model: str, items: list[dict[str, Any]], options: pb.EmbedOptions,
          prefix: str, out: dict[str, np.ndarray]) -> None:
    try:
        response = stub.Embed(pb.EmbedRequest(model=model, inputs=[_proto_input(i) for i in items],
                                              options=options), timeout=60)
    except grpc.RpcError as exc:  # a refused option set is an output too
        out[f"{prefix}/error"] = np.array(f"{exc.code().name}: {exc.details()}")
        return
    for i, e in enumerate(response.embeddings):
        out[f"{prefix}/{i}"] = _array(e.tensor)
        out[f"{prefix}/{i}/positions"] = np.array(e.positions)
        for j, w in enumerate(e.windows):
            out[f"{prefix}/{i}/window{j}"] = _array(w.tensor)
            out[f"{prefix}/{i}/window{j}/span"] = np.array([w.start, w.end, w.positions, w.kept_start, w.kept_end])


# ---- HTTP -------------------------------------------------------------------------------------------------------


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _json_input(item: dict[str, Any]) -> dict[str, Any]:
    (kind, value), = item.items()
    if kind == "pcm":
        return {"pcm": {**value, "data": base64.b64encode(value["data"]).decode()}}
    return {kind: value if kind == "text" else base64.b64encode(value).decode()}


def _http_array(tensor: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(tensor["data"]), _NUMPY_DTYPE[tensor["dtype"]]).reshape(
        tensor["shape"]).copy()


def _http(url: str, model: str, items: list[dict[str, Any]], options: dict[str, Any], prefix: str,
          out: dict[str, np.ndarray]) -> None:
    try:
        body = _post(f"{url}/v1/embed", {"model": model, "inputs": [_json_input(i) for i in items],
                                          "options": options, "data_format": "base64"})
    except urllib.error.HTTPError as exc:
        error = json.loads(exc.read())["error"]
        out[f"{prefix}/error"] = np.array(f"{exc.code} {error['code']}: {error['message']}")
        return
    for i, e in enumerate(body["embeddings"]):
        out[f"{prefix}/{i}"] = _http_array(e["tensor"])
        out[f"{prefix}/{i}/positions"] = np.array(e["positions"])
        for j, w in enumerate(e.get("windows") or ()):
            out[f"{prefix}/{i}/window{j}"] = _http_array(w["tensor"])
            out[f"{prefix}/{i}/window{j}/span"] = np.array([w["start"], w["end"], w["positions"], w["kept_start"],
                                                            w["kept_end"]])


def _openai_input(item: dict[str, Any], modality: str) -> str:
    (kind, value), = item.items()
    if kind == "text":
        return value
    return f"data:{modality}/x;base64,{base64.b64encode(value).decode()}"


def _openai(url: str, model: str, modality: str, items: list[dict[str, Any]], out: dict[str, np.ndarray]) -> None:
    encoded = [_openai_input(i, modality) for i in items if "pcm" not in i]
    for encoding in ("float", "base64"):
        body = _post(f"{url}/v1/embeddings", {"model": model, "input": encoded, "encoding_format": encoding})
        for d in body["data"]:
            value = d["embedding"]
            array = (np.frombuffer(base64.b64decode(value), "<f4") if encoding == "base64"
                     else np.asarray(value, np.float64).astype("<f4"))
            out[f"{model}/http/openai-{encoding}/{d['index']}"] = array.copy()
        out[f"{model}/http/openai-{encoding}/tokens"] = np.array(body["usage"]["prompt_tokens"])


# ---- everything -------------------------------------------------------------------------------------------------


def record(target: str, http_url: str, models: dict[str, str]) -> dict[str, np.ndarray]:
    """Every output kind of every model in `models` (name -> modality) over gRPC and HTTP, by name:
    `{model}/{transport}/{representation}-{pooling}-{norm|raw}-{dtype}/{input}[/window{j}]`."""
    out: dict[str, np.ndarray] = {}
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 * 2**20)]) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        for model, modality in models.items():
            info = stub.DescribeModel(pb.DescribeModelRequest(model=model), timeout=60)
            info.ClearField("loaded_at")  # when this server loaded it
            info.ClearField("file_sha256")  # the file's identity, checked in tests/test_reload.py
            out[f"{model}/grpc/describe"] = np.array(json_format.MessageToJson(info, sort_keys=True))
            card = json.loads(urllib.request.urlopen(f"{http_url}/v1/models/{model}", timeout=60).read())
            card.pop("created")  # the file's mtime
            card["d2v"].pop("loaded_at")
            card["d2v"].pop("file_sha256")
            out[f"{model}/http/describe"] = np.array(json.dumps(card, sort_keys=True))
            items = inputs(modality)
            for representation, pooling, normalize, dtype in _OPTIONS:
                kind = f"{representation}-{pooling}-{'norm' if normalize else 'raw'}-{dtype}"
                _grpc(stub, model, items, pb.EmbedOptions(
                    representation=_PROTO_REPRESENTATION[representation], pooling=_PROTO_POOLING[pooling],
                    normalize=normalize, dtype=_PROTO_DTYPE[dtype]), f"{model}/grpc/{kind}", out)
                _http(http_url, model, items, {"representation": representation, "pooling": pooling,
                                               "normalize": normalize, "dtype": dtype}, f"{model}/http/{kind}", out)
            _openai(http_url, model, modality, items, out)
            if modality == "image":
                continue
            chunking = _chunking(modality)
            for pooling in ("mean", "none"):
                kind = f"chunked-{pooling}"
                _grpc(stub, model, [long_input(modality)], pb.EmbedOptions(
                    pooling=_PROTO_POOLING[pooling], chunking=pb.Chunking(**chunking)), f"{model}/grpc/{kind}", out)
                _http(http_url, model, [long_input(modality)], {"pooling": pooling, "chunking": chunking},
                      f"{model}/http/{kind}", out)
    return out


def fold(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` without the HTTP entries equal (bit for bit, same dtype) to their gRPC twins: the recorded file holds
    one copy, and an HTTP answer that parts from gRPC's shows up as an extra entry."""
    def same(a: np.ndarray, b: np.ndarray | None) -> bool:
        return b is not None and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

    return {k: v for k, v in arrays.items()
            if "/http/" not in k or not same(v, arrays.get(k.replace("/http/", "/grpc/")))}


def environment() -> str:
    """What decides the last bits of a float result besides our code: the runtime, numpy and the CPU's vector units
    (ONNX Runtime picks its kernels by them)."""
    import platform

    import onnxruntime

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        flags = set()
    units = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, {platform.machine()} {' '.join(units)}"


def served_models() -> dict[str, str]:
    return {name: name.split("-", 1)[1] for name in (*DEMO_NAMES, *TINY_NAMES)}


def models_dir(directory: Path) -> Path:
    """A folder holding the demo models and the committed tiny ones (as links), for one server to serve them all."""
    from d2v_serve.cli import DEMO_MODELS

    directory.mkdir(parents=True, exist_ok=True)
    for name in DEMO_NAMES:
        (directory / f"{name}.onnx").symlink_to((DEMO_MODELS / f"{name}.onnx").resolve())
    for name in TINY_NAMES:
        (directory / f"{name}.onnx").symlink_to((TINY_MODELS / f"{name}.onnx").resolve())
    return directory


def main() -> None:
    import tempfile

    from tests.factories import make_model_file
    from tests.serve_fixtures import ServerThread, free_port

    TINY_MODELS.mkdir(parents=True, exist_ok=True)
    if "--export" in sys.argv:  # a fresh tiny export of each modality by today's exporter
        for modality in ("audio", "image", "text"):
            with tempfile.TemporaryDirectory() as tmp:
                path = make_model_file(modality, Path(tmp))
                (TINY_MODELS / f"tiny-{modality}.onnx").write_bytes(path.read_bytes())
    with tempfile.TemporaryDirectory() as tmp, ServerThread(models_dir(Path(tmp) / "models"),
                                                            http_port=free_port()) as server:
        arrays = record(server.target, server.http_url, served_models())
    arrays = fold(arrays)
    arrays[ENVIRONMENT] = np.array(environment())
    np.savez_compressed(OUTPUTS, **arrays)
    print(f"{len(arrays)} arrays -> {OUTPUTS} ({OUTPUTS.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
