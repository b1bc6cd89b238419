"""Torch-free preprocessing shared by training and serving: decode, resample/resize, tokenize, normalise, collate."""

from .audio import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioPreprocessing,
    audio_frames,
    check_sample_rate,
    conv_stride,
    decode_audio,
    frame_limit,
    min_audio_samples,
    normalize_waveform,
    pcm_to_waveform,
)
from .batch import MODALITIES, Preprocessing, collate, masked_mean, preprocessing_from_dict
from .errors import InputTooLarge, InputTooLong, PreprocessError
from .image import IMAGE_FORMATS, ImagePreprocessing, decode_image
from .text import TextPreprocessing, clip_text, max_text_chars, tokenizer_from_hf_files, train_bpe_tokenizer

__all__ = [
    "IMAGE_FORMATS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "MODALITIES",
    "AudioPreprocessing",
    "ImagePreprocessing",
    "InputTooLarge",
    "InputTooLong",
    "PreprocessError",
    "Preprocessing",
    "TextPreprocessing",
    "audio_frames",
    "check_sample_rate",
    "clip_text",
    "frame_limit",
    "masked_mean",
    "max_text_chars",
    "min_audio_samples",
    "collate",
    "conv_stride",
    "decode_audio",
    "decode_image",
    "normalize_waveform",
    "pcm_to_waveform",
    "preprocessing_from_dict",
    "tokenizer_from_hf_files",
    "train_bpe_tokenizer",
]
