"""What each cached token is. The tag travels with the token through compaction and the bin."""

from enum import IntEnum


class Modality(IntEnum):
    TEXT = 0  # prompt text, chat and special tokens
    IMAGE = 1  # a visual feature token (image_id says which image)
    SEPARATOR = 2  # an image's tokens that get no feature: row ends, view markers (image_id says which image)
    GENERATED = 3  # tokens produced during decoding


MODALITY_NAMES = {m: m.name.lower() for m in Modality}
