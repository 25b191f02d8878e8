"""A tiny random-weight Llama with a locally trained BPE tokenizer, for tests and benchmarks.

Nothing is downloaded: the weights come from a fixed seed and the tokenizer is trained with
``tokenizers`` on generated text. The same call gives the same files on every machine::

    from lmshare.testing.tiny_model import build_tiny_model
    folder = build_tiny_model("/tmp/tiny-llama")   # then vllm.LLM(model=str(folder), ...)

Needs torch, transformers and tokenizers (installed with vLLM).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

SEED = 1234
VOCAB_SIZE = 2048
HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 4096
MARKER = "lmshare-tiny-model.json"

_WORDS = (
    "the a of to and in is it that for on with as was by at be this from or which an are "
    "cache memory token chunk prefix worker peer cluster model layer head block key value "
    "request answer document question share fetch store lookup hit miss local remote fast "
    "slow time river stone cloud window garden number letter city ocean forest light paper "
    "north south east west alpha beta gamma delta engine signal vector matrix kernel thread"
).split()


def corpus(lines: int = 4000, seed: int = SEED) -> list[str]:
    """Deterministic pseudo-English lines (tokenizer training text, and prompt material)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        out.append(" ".join(words) + rng.choice([".", ".", "?", "!", ","]))
    return out


def make_prompt(tokens_hint: int, seed: int = 0) -> str:
    """Text of roughly ``tokens_hint`` tokens (about one token a word with this tokenizer)."""
    rng = random.Random(seed)
    words = [rng.choice(_WORDS) for _ in range(tokens_hint)]
    return " ".join(words)


def _train_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.model_max_length = MAX_POSITIONS
    fast.save_pretrained(directory)
    return fast


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def build_tiny_tokenizer(directory: str | Path, chat_template: bool = True) -> Path:
    """The tiny model's tokenizer alone (no torch needed), with a simple chat template."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    fast = _train_tokenizer(folder)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(folder)
    return folder


def build_tiny_model(directory: str | Path, *, seed: int = SEED, num_layers: int = NUM_LAYERS,
                     hidden_size: int = HIDDEN_SIZE, num_heads: int = NUM_HEADS,
                     num_kv_heads: int = NUM_KV_HEADS, force: bool = False) -> Path:
    """Create (once) a tiny bf16 Llama and its tokenizer in ``directory``; returns the folder.

    A folder that already holds a model built with the same settings is reused unless
    ``force``. Different ``seed`` values give different weights (a different model).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(directory)
    settings = {"seed": seed, "num_layers": num_layers, "vocab": VOCAB_SIZE,
                "hidden": hidden_size, "heads": num_heads, "kv_heads": num_kv_heads, "v": 1}
    marker = folder / MARKER
    if not force and marker.exists():
        try:
            if json.loads(marker.read_text()) == settings:
                return folder
        except (OSError, ValueError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    fast = _train_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=None, tie_word_embeddings=False, torch_dtype="bfloat16")
    previous = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # A wider spread than the default init keeps greedy outputs varied (not one token).
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.08)
    finally:
        torch.random.set_rng_state(previous)
    model = model.to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps(settings, sort_keys=True))
    log.info("built tiny model in %s", folder)
    return folder
