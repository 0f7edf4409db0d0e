"""A word-level tokenizer for the toy world that speaks Qwen2.5-VL's special tokens and chat format.

Qwen2.5-VL's real tokenizer is a 151k-entry byte-level BPE; a toy model cannot afford that
embedding table. This tokenizer keeps everything the model code relies on (the same special
tokens, the same chat template, EOS = `<|im_end|>`, pad = `<|endoftext|>`, all from
`lenslib.mllm`) and replaces only the vocabulary: one token per word, one token per integer
coordinate 0..S and one token per piece of the fixed answer scaffolding (`<think>`,
`"bbox_2d": `, ...). A target answer is then ~47 tokens.

Spaces are kept inside the tokens (a word carries its leading space: " circle"), and the decoder
concatenates tokens, so decoding gives back the exact text. That matters: the answer parser
(R_box, eq. 11) must be able to `json.loads` what the model writes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lenslib.mllm import EOS_TOKEN, PAD_TOKEN, QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS
from lenslib.prompts import SYSTEM_PROMPT, USER_TEMPLATE, format_answer

UNK_TOKEN = "<unk>"  # Qwen's byte-level BPE needs none; a word-level vocabulary does.

# Fixed pieces of the answer format (lenslib.prompts.format_answer), one token each.
SCAFFOLD_TOKENS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "[{",
    "}]",
    '"bbox_2d": ',
    '"label": ',
]

# How text is cut into words, tried left to right at each position:
#   scaffolding | integer | optional space + letters | ", " inside JSON | whitespace run | one symbol
_SCAFFOLD = "|".join(re.escape(token) for token in SCAFFOLD_TOKENS)
WORD_PATTERN = _SCAFFOLD + r'|\d+| ?\p{L}+|, (?=\d|")|\s+|[^\s\p{L}\p{N}]'


def word_splitter() -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer: cuts text into the pieces that become vocabulary entries."""
    return pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")


def fixed_texts(max_coordinate: int) -> list[str]:
    """Texts whose words every toy tokenizer must know: the chat template and the prompts."""
    chat = ["system\n", "user\n", "assistant\n", "Picture 1: ", "Video 1: "]
    answer = format_answer("", [0, 0, max_coordinate, max_coordinate], "")
    return [*chat, SYSTEM_PROMPT, USER_TEMPLATE.format(query=""), answer]


def build_vocab(
    corpus: Iterable[str], max_coordinate: int, min_frequency: int = 1
) -> dict[str, int]:
    """Word -> id. Specials first (Qwen's order), then <unk>, coordinates 0..S, scaffolding,
    the chat template's words, then corpus words by falling count (ties: alphabetical),
    each word followed by its twin with / without a leading space."""
    fixed = [*QWEN_SPECIAL_TOKENS, UNK_TOKEN]
    fixed += [str(i) for i in range(max_coordinate + 1)] + SCAFFOLD_TOKENS
    splitter = word_splitter()
    for text in fixed_texts(max_coordinate):
        fixed += [piece for piece, _ in splitter.pre_tokenize_str(text)]
    counts: Counter[str] = Counter()
    for text in corpus:
        if not isinstance(text, str):
            raise TypeError(f"tokenizer corpus must hold strings, got {type(text).__name__}")
        counts.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    words = sorted(
        (w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w)
    )
    vocab: dict[str, int] = {}
    for word in [*fixed, *words]:
        for form in (word, *word_twin(word)):
            vocab.setdefault(form, len(vocab))
    return vocab


def word_twin(piece: str) -> list[str]:
    """A word is known with and without its leading space ("red" <-> " red"), so a word seen
    only mid-sentence is still known at the start of a label or line."""
    if piece.isalpha():
        return [" " + piece]
    if piece.startswith(" ") and piece[1:].isalpha():
        return [piece[1:]]
    return []


def build_toy_tokenizer(
    corpus: Iterable[str], max_coordinate: int = 112, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train the toy world's word-level tokenizer on `corpus` and wrap it for transformers.

    `max_coordinate` S: every integer 0..S gets its own token (boxes are pixels of the
    MLLM's input image, so S = the image side). Words never seen in training map to `<unk>`.
    The result has Qwen's chat template, pads on the LEFT (for generation) and is
    deterministic: the same corpus always gives the same ids.
    """
    if max_coordinate < 1:
        raise ValueError(f"max_coordinate must be >= 1, got {max_coordinate}")
    vocab = build_vocab(corpus, max_coordinate, min_frequency)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = word_splitter()
    backend.decoder = decoders.Fuse()  # tokens carry their own spaces: just concatenate
    # Special tokens are cut out before the pre-tokenizer runs; they keep the ids above.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in [*QWEN_SPECIAL_TOKENS, UNK_TOKEN]]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=QWEN_SPECIAL_TOKENS,
        chat_template=QWEN_CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
