"""Tokenization that reproduces llama.cpp's token ids and text, from GGUF metadata.

from lmap.gguf import GGUFFile
from lmap.tokenizer import Tokenizer

tok = Tokenizer.from_metadata(GGUFFile(path).metadata)
ids = tok.encode("Hello", parse_special=True)
text = tok.decode(ids).decode("utf-8", "replace")
"""

from .tokenizer import IncrementalDecoder, Tokenizer
from .vocab import TokenAttr, TokenType

__all__ = ["IncrementalDecoder", "TokenAttr", "TokenType", "Tokenizer"]
