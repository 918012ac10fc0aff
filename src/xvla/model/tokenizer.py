"""Tokenizers: load one from a checkpoint folder or hub id, or train a small byte-level BPE offline.

The released checkpoints use BART's tokenizer (`facebook/bart-large`): `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3.
`build_tokenizer` reproduces those special ids so a locally trained tokenizer drops into the same pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0, 1, 2, 3 as in BART

# A small built-in corpus so the demo and tests need no data: typical manipulation instructions.
_DEFAULT_TEXTS = (
    "pick up the red block and place it in the bowl",
    "put the blue cube on the green plate",
    "open the top drawer of the cabinet",
    "close the microwave door",
    "push the button on the left",
    "stack the yellow block on top of the red block",
    "move the cup to the right side of the table",
    "turn on the stove and put the pot on it",
    "lift the lid and put it on the counter",
    "pick the black bowl next to the cookie box and place it on the plate",
    "reach the target position",
    "slide the puck to the goal",
    "insert the peg into the hole",
    "grasp the handle and pull the door open",
    "put both the alphabet soup and the tomato sauce in the basket",
)


def load_tokenizer(path_or_hub_id: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a checkpoint folder (tokenizer files saved next to the weights) or a hub id; a
    path-like name that does not exist is "not found", never looked up on the hub."""
    from xvla.model.checkpoint import local_reason

    path = Path(path_or_hub_id).expanduser()
    if not path.exists() and (reason := local_reason(path_or_hub_id)) is not None:
        raise FileNotFoundError(
            f"not found: {path_or_hub_id} (no such tokenizer folder; not a hub id: {reason})"
        )
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else str(path_or_hub_id))


def build_tokenizer(
    out_dir: str | Path | None = None, texts: Iterable[str] | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with BART's special ids and wrap it as a PreTrainedTokenizerFast.

    `vocab_size` is an upper bound: the result never exceeds it, so it fits a model whose
    `config.text.vocab_size` is at least this value. Saved to `out_dir` when given.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"build_tokenizer: vocab_size must be >= {len(alphabet) + len(SPECIAL_TOKENS)} (byte alphabet + specials), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) if texts is not None else list(_DEFAULT_TEXTS), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    for expected, token in enumerate(SPECIAL_TOKENS):
        if wrapped.convert_tokens_to_ids(token) != expected:
            raise RuntimeError(
                f"build_tokenizer: {token} got id {wrapped.convert_tokens_to_ids(token)}, expected {expected}"
            )
    if len(wrapped) > vocab_size:
        raise RuntimeError(
            f"build_tokenizer: trained vocabulary {len(wrapped)} exceeds vocab_size {vocab_size}"
        )
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def check_fits(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Raise if the tokenizer can emit ids >= the model's `config.text.vocab_size`."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's text.vocab_size is {vocab_size}"
        )
