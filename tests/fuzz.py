"""Coverage-guided fuzzing (atheris, i.e. libFuzzer over Python) of everything untrusted bytes reach: encoded audio,
encoded images, raw PCM, text (character limit + tokenizer) and whole request frames (wire.parse -> the core's
request -> options and every input's preprocessing against the demo models).

    python -m tests.fuzz --seconds 600            # the long run: each target for 600 s (docs/reliability.md)
    python -m tests.fuzz --seconds 10 --targets audio,pcm

Seeds: the hostile corpus (tests/hostile.py) and a few good files. A finding is any exception other than the
refusals a client may get (PreprocessError; ServeError INVALID_ARGUMENT, FAILED_PRECONDITION or NOT_FOUND), an input
slower than 10 s, or RSS over 2 GiB: libFuzzer stops and writes the input to <work>/<target>-crash-* (turn each into
a regression test in tests/test_hostile.py). The summary line per target gives its executions and findings.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("audio", "image", "pcm", "text", "request")
FUZZ_MAX_PIXELS = 4_000_000  # smaller limits than the server's defaults (same code) keep each execution short
FUZZ_MAX_AUDIO_SECONDS = 10.0
MAX_SEED_BYTES = 256 * 1024


@dataclass
class FuzzRun:
    target: str
    executions: int
    findings: list[Path]
    returncode: int
    output: str


# ---- the targets (run in a child process under atheris) ----------------------------------------------------------


def _targets() -> dict:
    """Import the code under test (instrumented by the caller) and build one callable per target."""
    import grpc
    from atheris import FuzzedDataProvider

    from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
    from d2v_serve.cli import DEMO_MODELS
    from d2v_serve.config import ServerConfig
    from d2v_serve.core.postprocess import output_options
    from d2v_serve.core.preparation import check_modality, input_modality, prepare
    from d2v_serve.errors import ServeError
    from d2v_serve.models.registry import load_models
    from d2v_serve.preprocess import (
        AudioPreprocessing,
        ImagePreprocessing,
        PreprocessError,
        clip_text,
        decode_audio,
        decode_image,
        pcm_to_waveform,
    )
    from d2v_serve.transport.grpc_service import embed_request
    from d2v_serve.transport.wire import parse

    refusals = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
    config = ServerConfig(max_image_pixels=FUZZ_MAX_PIXELS, max_audio_seconds=FUZZ_MAX_AUDIO_SECONDS,
                          intra_op_threads=1)
    models = load_models(DEMO_MODELS, config)
    by_modality = {m.modality: m for m in models.values()}
    text_model = by_modality["text"]
    audio_pre, image_pre = AudioPreprocessing(), ImagePreprocessing(image_size=64, resize_size=64)

    def refused(fn) -> None:  # noqa: ANN001
        try:
            fn()
        except PreprocessError:
            pass
        except ServeError as exc:
            if exc.code not in refusals or "\n" in exc.message:
                raise

    def audio(data: bytes) -> None:
        truncate, payload = bool(data[:1] and data[0] & 1), data[1:]
        refused(lambda: audio_pre.prepare(*decode_audio(payload, FUZZ_MAX_AUDIO_SECONDS, truncate)))

    def image(data: bytes) -> None:
        refused(lambda: image_pre.prepare(decode_image(data, FUZZ_MAX_PIXELS)))

    def pcm(data: bytes) -> None:
        fdp = FuzzedDataProvider(data)
        encoding = ("float32", "int16", "int8")[fdp.ConsumeIntInRange(0, 2)]
        rate, channels = fdp.ConsumeIntInRange(0, 500_000), fdp.ConsumeIntInRange(0, 80)
        truncate, raw = fdp.ConsumeBool(), fdp.ConsumeBytes(fdp.remaining_bytes())
        refused(lambda: audio_pre.prepare(pcm_to_waveform(raw, encoding, channels, rate, FUZZ_MAX_AUDIO_SECONDS,
                                                                  truncate), rate))

    def text(data: bytes) -> None:
        fdp = FuzzedDataProvider(data)
        truncate, value = fdp.ConsumeBool(), fdp.ConsumeUnicode(fdp.remaining_bytes())
        refused(lambda: text_model.preprocessing.prepare(clip_text(value, 2048, truncate)[0], truncate=truncate))

    def request(data: bytes) -> None:
        def run() -> None:
            message = embed_request(parse(data, pb.EmbedRequest))
            for inp in message.inputs[:4]:
                model = by_modality.get(input_modality(inp), text_model)
                output_options(model, message.options)
                check_modality(model, inp)
                prepare(model, inp, message.options.truncate)
        refused(run)

    return {"audio": audio, "image": image, "pcm": pcm, "text": text, "request": request}


def _child(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["d2v_serve"]):
        targets = _targets()
    atheris.Setup([sys.argv[0], *libfuzzer_args], targets[target])
    atheris.Fuzz()


# ---- seeds and the driver ----------------------------------------------------------------------------------------


def write_seeds(directory: Path) -> dict[str, Path]:
    """The hostile corpus plus good files, one folder per target."""
    from d2v_serve._proto.d2v.v1 import embedder_pb2 as pb
    from tests import hostile

    dirs = {t: directory / t for t in TARGETS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    good = [
        hostile.Hostile("good-wav", "audio", hostile.encode(hostile.tone(0.5), 16000, "WAV", "PCM_16"), "ok"),
        hostile.Hostile("good-flac", "audio", hostile.encode(hostile.tone(0.5, 44100, 2), 44100, "FLAC"), "ok"),
        hostile.Hostile("good-ogg", "audio", hostile.encode(hostile.tone(0.5), 16000, "OGG", "VORBIS"), "ok"),
        hostile.Hostile("good-png", "image", hostile.image_bytes(hostile.picture(40, 30), "PNG"), "ok"),
        hostile.Hostile("good-jpeg", "image", hostile.image_bytes(hostile.picture(40, 30), "JPEG"), "ok"),
        hostile.Hostile("good-webp", "image", hostile.image_bytes(hostile.picture(40, 30), "WEBP"), "ok"),
        hostile.Hostile("good-text", "text", "The quick brown fox. Ünïcödé ✓", "ok"),
        hostile.Hostile("good-pcm", "pcm", hostile.Pcm(hostile.tone(0.2).tobytes(), "float32", 16000), "ok"),
    ]
    for case in [*hostile.corpus(), *good]:
        value = case.value
        if case.kind == "pcm":
            raw = bytes([0, 0, 0, 1]) + value.data  # provider bytes, roughly: encoding, rate, channels, truncate
            proto = pb.Input(pcm=pb.Pcm(data=value.data, encoding={"float32": 1, "int16": 2}[value.encoding],
                                        sample_rate=value.sample_rate, channels=value.channels))
        elif case.kind == "text":
            raw = b"\x00" + value.encode("utf-8", "surrogatepass")
            proto = pb.Input(text=value) if "\ud800" not in value else None
        else:
            raw = b"\x00" + value if case.kind == "audio" else value
            proto = pb.Input(**{case.kind: value})
        if len(raw) <= MAX_SEED_BYTES:
            (dirs[case.kind] / case.name).write_bytes(raw)
            if proto is not None:
                request = pb.EmbedRequest(inputs=[proto], options=pb.EmbedOptions(truncate=True))
                (dirs["request"] / case.name).write_bytes(request.SerializeToString())
    return dirs


def run_target(target: str, seconds: int, work: Path, seeds: Path) -> FuzzRun:
    corpus = work / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    args = [f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048", "-max_len=262144",
            f"-artifact_prefix={work}/{target}-", "-print_final_stats=1", str(corpus), str(seeds)]
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz", "--child", target, "--", *args],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    output = proc.stdout + proc.stderr
    executions = sum(int(n) for n in re.findall(r"stat::number_of_executed_units:\s*(\d+)", output))
    findings = sorted(work.glob(f"{target}-*"))
    return FuzzRun(target, executions, findings, proc.returncode, output)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=600, help="per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--work", type=Path, help="corpus and findings (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="d2v-fuzz-"))
    seeds = write_seeds(work / "seeds")
    failed = False
    for target in args.targets.split(","):
        run = run_target(target, args.seconds, work, seeds[target])
        failed |= bool(run.findings) or run.returncode != 0
        print(f"{target}: {run.executions} executions in {args.seconds} s, {len(run.findings)} findings"
              + "".join(f"\n  {p}" for p in run.findings), flush=True)
        if run.returncode != 0:
            print(run.output[-3000:], flush=True)
    print(f"work folder: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
