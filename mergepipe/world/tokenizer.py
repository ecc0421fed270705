"""The world's tokenizer: one token per character, plus the GSM8K answer marker.

A character-level vocabulary keeps every arithmetic step a handful of tokens, so
"writes its steps" costs visibly more generated tokens than "answers directly".
It is built with the `tokenizers` library and saved as a fast tokenizer, so
`AutoTokenizer.from_pretrained` loads it like any Hugging Face model's.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ANSWER_MARK = "####"
CHARS = list("0123456789+-*=?:.,;()# \nQAabcdefghijklmnopqrstuvwxyz")


def vocabulary() -> dict[str, int]:
    """Fixed token ids: specials first, then the marker, then characters."""
    tokens = [PAD, BOS, EOS, UNK, ANSWER_MARK] + CHARS
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer that splits text into the marker and single characters."""
    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"####|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Every sequence starts with BOS, in training and at inference alike.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocabulary()[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        unk_token=UNK, padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=512)
