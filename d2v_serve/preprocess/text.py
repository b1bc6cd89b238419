"""Text: RoBERTa-style byte-level BPE through the `tokenizers` library; ids with <s> ... </s>, optional truncation."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .errors import InputTooLong, PreprocessError, check_config_keys, one_line

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
# Characters allowed per model token before tokenizing: English averages ~4 per BPE token and even long runs of
# punctuation or spaces stay below this, so a text cut here still fills the model (see max_text_chars).
CHARS_PER_TOKEN = 32


@dataclass
class TextPreprocessing:
    tokenizer_json: str = field(repr=False)
    max_length: int = 512
    pad_id: int = 1
    bos_id: int = 0
    eos_id: int = 2
    mask_id: int = 50264

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer_json, str) or not self.tokenizer_json:
            raise ValueError("text preprocessing needs the tokenizer JSON text")
        if int(self.max_length) < 2:
            raise ValueError(f"text max_length must be >= 2 (room for <s> and </s>), got {self.max_length}")
        self.max_length = int(self.max_length)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "mask_id": self.mask_id,
            "tokenizer": self.tokenizer_json,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextPreprocessing:
        check_config_keys("text", d, ("max_length", "pad_id", "bos_id", "eos_id", "mask_id", "tokenizer"))
        if "tokenizer" not in d:
            raise ValueError("text preprocessing has no 'tokenizer'")
        rest = {k: v for k, v in d.items() if k != "tokenizer"}
        return cls(tokenizer_json=d["tokenizer"], **rest)

    @classmethod
    def from_tokenizer(cls, tokenizer_json: str, max_length: int = 512) -> TextPreprocessing:
        """Ids of <s>, <pad>, </s>, <mask> looked up in the tokenizer itself."""
        tok = Tokenizer.from_str(tokenizer_json)
        ids = {}
        for name, token in (("bos_id", BOS), ("pad_id", PAD), ("eos_id", EOS), ("mask_id", MASK)):
            ids[name] = tok.token_to_id(token)
            if ids[name] is None:
                raise ValueError(f"tokenizer has no {token} token")
        return cls(tokenizer_json=tokenizer_json, max_length=max_length, **ids)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer`, built once; its own truncation and padding are off (prepare/collate do them)."""
        try:
            tok = Tokenizer.from_str(self.tokenizer_json)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception for bad JSON
            raise ValueError(f"invalid tokenizer JSON: {one_line(exc)}") from None
        tok.no_truncation()
        tok.no_padding()
        return tok

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def prepare(self, text: str, truncate: bool = True) -> np.ndarray:
        """Text -> int64 ids including <s> and </s>; longer than max_length: cut (keeping </s>) or InputTooLong."""
        result = self.prepare_batch([text], truncate)[0]
        if isinstance(result, PreprocessError):
            raise result
        return result[0]

    def prepare_batch(self, texts: Sequence[str], truncate: bool = True, max_length: int = 0
                      ) -> list[tuple[np.ndarray, bool] | PreprocessError]:
        """Texts -> (ids, truncated) each, as `prepare` gives them, tokenized in one `encode_batch` call (the
        tokenizers library's own threads, without the GIL). An input that cannot be prepared gets its
        PreprocessError (InputTooLong: too long without `truncate`) in its place. `max_length`: another limit than
        the tokenizer's (a model with fewer positions; a long input to be cut into windows)."""
        limit = max_length if max_length > 0 else self.max_length
        results: list[tuple[np.ndarray, bool] | PreprocessError | None] = [None] * len(texts)
        todo = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                results[i] = PreprocessError(f"text must be a string, got {type(text).__name__}")
            elif not text:
                results[i] = PreprocessError("text is empty")
            else:
                todo.append(i)
        for i, ids in zip(todo, self._encode([texts[i] for i in todo]), strict=True):
            results[i] = ids if isinstance(ids, PreprocessError) else self._fit(ids, limit, truncate)
        return results  # type: ignore[return-value] - every slot is filled

    def _encode(self, texts: list[str]) -> list[list[int] | PreprocessError]:
        if len(texts) > 1:
            # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which nothing here reads. A single
            # text goes to `encode` below: the batch calls hand even one text to their thread pool and back.
            encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
            try:
                return [e.ids for e in encode_batch(texts)]
            except Exception:  # noqa: BLE001 - one bad text fails the call: find it below, one by one
                pass
        out: list[list[int] | PreprocessError] = []
        for text in texts:
            try:
                out.append(self.tokenizer.encode(text).ids)
            except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates in the string
                out.append(PreprocessError(f"cannot tokenize text: {one_line(exc)}"))
        return out

    def _fit(self, ids: list[int], limit: int, truncate: bool) -> tuple[np.ndarray, bool] | PreprocessError:
        if len(ids) <= limit:
            return np.asarray(ids, dtype=np.int64), False
        if not truncate:
            return InputTooLong(f"text is {len(ids)} tokens, it may have at most {limit}")
        ids = ids[: limit - 1] + [self.eos_id] if ids[-1] == self.eos_id else ids[:limit]
        return np.asarray(ids, dtype=np.int64), True


def max_text_chars(max_tokens: int) -> int:
    """The default character limit for a model taking `max_tokens` tokens."""
    return CHARS_PER_TOKEN * max_tokens


def clip_text(text: str, max_chars: int, truncate: bool) -> tuple[str, bool]:
    """Check a text's length in characters before it is tokenized (tokenizing costs time in proportion to length):
    longer than `max_chars` is InputTooLong (limit "max_text_chars"), or with `truncate` cut to `max_chars`.
    Returns the text and whether it was cut."""
    if not isinstance(text, str):
        raise PreprocessError(f"text must be a string, got {type(text).__name__}")
    if len(text) <= max_chars:
        return text, False
    if not truncate:
        raise InputTooLong(f"text is {len(text)} characters, the limit is {max_chars}", "max_text_chars")
    return text[:max_chars], True


def _roberta_post_processor(tok: Tokenizer) -> processors.RobertaProcessing:
    return processors.RobertaProcessing(
        (EOS, tok.token_to_id(EOS)), (BOS, tok.token_to_id(BOS)), trim_offsets=True, add_prefix_space=False
    )


def _add_roberta_specials(tok: Tokenizer) -> None:
    """Mark the specials as special (never split); <mask> swallows the space before it, as in RoBERTa."""
    tok.add_special_tokens([AddedToken(t, special=True) for t in (BOS, PAD, EOS, UNK)])
    tok.add_special_tokens([AddedToken(MASK, lstrip=True, special=True)])


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, max_length: int = 512
) -> TextPreprocessing:
    """Train a RoBERTa-style byte-level BPE on `texts`: <s>=0 <pad>=1 </s>=2 <unk>=3, merges, then <mask> last.

    `vocab_size` counts every id including the specials (a small corpus may give fewer merges than asked).
    """
    min_size = 256 + 5  # every byte plus the five specials
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + 5 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <mask> is appended after training
        min_frequency=min_frequency,
        special_tokens=[BOS, PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # <mask> goes into the BPE vocabulary itself (last id), so vocab.json written from it has the RoBERTa layout
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"][MASK] = len(spec["model"]["vocab"])
    tok = Tokenizer.from_str(json.dumps(spec))
    _add_roberta_specials(tok)
    tok.post_processor = _roberta_post_processor(tok)
    return TextPreprocessing.from_tokenizer(tok.to_str(), max_length=max_length)


def tokenizer_from_hf_files(directory: str | Path) -> str:
    """Tokenizer JSON from a transformers directory: tokenizer.json, or vocab.json + merges.txt (RoBERTa style).

    The result has the RoBERTa post-processor (<s> ... </s>) and no truncation or padding configured.
    """
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        if tok.post_processor is None:
            tok.post_processor = _roberta_post_processor(tok)
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        tok = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        missing = [t for t in (BOS, PAD, EOS, UNK, MASK) if t not in vocab]
        if missing:
            raise ValueError(f"{directory / 'vocab.json'} lacks special tokens: {', '.join(missing)}")
        _add_roberta_specials(tok)
        tok.post_processor = _roberta_post_processor(tok)
    else:
        raise FileNotFoundError(f"{directory} has neither tokenizer.json nor vocab.json + merges.txt")
    tok.no_truncation()
    tok.no_padding()
    return tok.to_str()
