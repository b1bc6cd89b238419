"""Torch-free preprocessing shared by training and serving: decode, resample/resize, tokenize, normalise, collate."""

from .audio import (
    AudioPreprocessing,
    audio_frames,
    decode_audio,
    min_audio_samples,
    normalize_waveform,
    pcm_to_waveform,
)
from .batch import MODALITIES, Preprocessing, collate, preprocessing_from_dict
from .errors import InputTooLong, PreprocessError
from .image import ImagePreprocessing, decode_image
from .text import TextPreprocessing, tokenizer_from_hf_files, train_bpe_tokenizer

__all__ = [
    "MODALITIES",
    "AudioPreprocessing",
    "ImagePreprocessing",
    "InputTooLong",
    "PreprocessError",
    "Preprocessing",
    "TextPreprocessing",
    "audio_frames",
    "min_audio_samples",
    "collate",
    "decode_audio",
    "decode_image",
    "normalize_waveform",
    "pcm_to_waveform",
    "preprocessing_from_dict",
    "tokenizer_from_hf_files",
    "train_bpe_tokenizer",
]
