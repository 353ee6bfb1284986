"""A word-level tokenizer for the world grammar, built in code so it needs no files or hub access.

Shared by the world CLIP and the world generator's text encoders. Ids are fixed by `VOCABULARY`'s
order, so tokenizers built at different times agree.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from rlfew.world.prompts import VOCABULARY

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """Tokenizer for world captions: <|startoftext|> words <|endoftext|>, padded with <pad> to max_length.

    Words outside the grammar map to <unk>. CLIP text models pool at the first <|endoftext|>, so set their
    config's `eos_token_id` to `tokenizer.eos_token_id` (and `pad_token_id`/`bos_token_id` likewise).
    """
    specials = [PAD, UNK, BOS, EOS]
    vocab = {token: index for index, token in enumerate(specials + list(VOCABULARY))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(".", "")])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, model_max_length=max_length, pad_token=PAD, unk_token=UNK, bos_token=BOS,
        eos_token=EOS, padding_side="right", truncation_side="right",
    )
