"""Causal LMs without downloads: a tokenizer trained here, tiny random models, and a load-once loader.

Tests and the demo build a model in seconds (config + byte-level BPE trained on project text +
seeded random weights, docs/sources.md#tiny-models); real runs load any Hugging Face model by name or path
through the same ``load_causal_lm``. Weights are read from safetensors only: a pickled
``pytorch_model.bin`` can run code when loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dataflywheel.errors import UserError
from dataflywheel.io import fs
from dataflywheel.models.cache import hub_offline, shared

BOS, EOS, PAD, TURN_START = "<|bos|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, TURN_START, EOS]  # ids 0..3 in this order

# ChatML turns. EOS is the end-of-turn token, so generation stops at the end of an assistant turn
# and SFT trains the model to emit it. The {% generation %} block lets
# apply_chat_template(..., return_assistant_tokens_mask=True) mark assistant tokens (EOS included).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# The built-in training text for the tokenizer when the caller gives none: plain sentences
# written for this project, covering common English words, digits and punctuation.
BUILTIN_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A data pipeline reads raw text, cleans it, and writes the rows that pass every check.",
    "Please summarize the following paragraph in two sentences.",
    "Sure! Here is a short summary of the main points.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a Python function that returns the sum of a list of numbers.",
    "def add(a, b):\n    return a + b",
    "The train left the station at 7:45 and arrived two hours later.",
    "Water boils at 100 degrees Celsius at sea level.",
    "She opened the window, and the cold morning air filled the room.",
    "Explain why the sky looks blue during the day.",
    "Sunlight is scattered by the air, and blue light is scattered the most.",
    "Translate the sentence into simple words a child could understand.",
    "The library closes at nine on weekdays and at five on Sundays.",
    "Count from one to ten: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "Good answers are correct, complete, and easy to follow.",
    "If a number is divisible by two, it is called an even number.",
    "He planted tomatoes, beans and onions in the small garden behind the house.",
    "Can you give me three tips for writing clear emails?",
    "First, state your purpose early. Second, keep it short. Third, end with a clear request.",
    "The meeting was moved to Thursday because the room was not available.",
    "Machine learning models learn patterns from examples rather than fixed rules.",
    "A good dataset has few duplicates, little noise, and a wide range of topics.",
    "List the planets of the solar system in order from the sun.",
    "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    "It rained all afternoon, so the football game was postponed.",
    "How many minutes are there in three hours? There are 180 minutes.",
    "The recipe needs two eggs, a cup of flour, and a pinch of salt.",
    "Thank you for your question; I am happy to help.",
    "I am sorry, but I cannot help with that request.",
    "The museum shows paintings, old maps, and tools from many centuries.",
    "Rewrite the text so that it sounds more formal and polite.",
    "Our team reviewed the results and found two small errors in the table.",
    "The cat slept on the warm windowsill while the children played outside.",
    "Short sentences are easier to read than long ones with many clauses.",
    "What does the word 'curious' mean? It means eager to learn or know something.",
    "The store sells fresh bread every morning from six o'clock.",
    "Please check your answer again and correct any mistakes you find.",
    "Mountains, rivers and forests cover most of the northern region.",
    "A question mark ends a question, and a period ends a statement.",
]

_DTYPE_AUTO = "auto"  # transformers' choice: the checkpoint's own dtype


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2000, split_digits: bool = False) -> Any:
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Byte-level means any text encodes (no unknown token) and decodes back exactly. Special
    tokens: ``<|pad|>``, ``<|bos|>``, ``<|im_start|>`` and ``<|im_end|>`` (EOS = end of turn).
    Plain ``encode`` adds no special tokens; the chat template starts with BOS. ``split_digits``
    makes every digit its own token (as Llama's tokenizer does): BPE merges of frequent digit
    pairs make arithmetic needlessly hard for a small model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # offsets (untrimmed) let apply_chat_template map assistant characters to tokens
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, extra_special_tokens=[TURN_START]
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _config(arch: str, vocab: int, hidden: int, layers: int, heads: int, max_positions: int, tok: Any) -> Any:
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **ids
        )
    if arch == "llama":
        from transformers import AutoConfig

        return AutoConfig.for_model(
            arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden,  # the classic 4x MLP; any size works for a test model
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            **ids,
        )
    raise UserError(f"unknown tiny model arch {arch!r}; choose llama or gpt2")


def build_tiny_causal_lm(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 2000,
    seed: int = 0,
    max_positions: int = 512,
    split_digits: bool = False,
) -> Path:
    """Write a randomly initialised causal LM and its tokenizer to ``out_dir``; return the folder.

    The tokenizer is trained on ``texts`` (default ``BUILTIN_CORPUS``); the model's vocabulary is
    the tokenizer's actual size, which is below ``vocab_size`` when the text is small. The same
    arguments give bit-identical weights: init runs under ``seed`` without touching the global RNG.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tok = train_bpe_tokenizer(BUILTIN_CORPUS if texts is None else texts, vocab_size=vocab_size,
                              split_digits=split_digits)
    tok.model_max_length = max_positions
    config = _config(arch, len(tok), hidden, layers, heads, max_positions, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    tok.save_pretrained(out)
    return out


def _weights_check(folder: Path) -> None:
    """Refuse a local folder whose weights are not safetensors, naming the folder."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(ext))
    if pickles:
        raise UserError(
            f"{folder} has only pickled weights ({', '.join(pickles)}); pickles can run code when loaded, so "
            "dataflywheel reads safetensors only: convert them (load once in a trusted session and "
            "save_pretrained(..., safe_serialization=True)) or use a safetensors checkpoint"
        )
    raise UserError(f"no model weights (*.safetensors) in {folder}")


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: Any = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a causal LM folder or Hub id, loaded once per process.

    ``dtype=None`` keeps the checkpoint's dtype (transformers' "auto"). A local folder loads with
    the Hub offline and must hold safetensors. The model is returned in eval mode on ``device``.
    Cached by (model, dtype, device, attention, trust_remote_code).
    """
    text = fs.local_copy(name_or_path) if fs.is_remote(name_or_path) else str(name_or_path)
    folder = Path(text).expanduser()
    local = folder.is_dir()
    if local:
        _weights_check(folder)
        text = str(folder.resolve())
    elif folder.exists() or text.startswith(("/", ".", "~")):
        raise UserError(f"model folder not found: {folder}")

    def load() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with hub_offline() if local else contextlib.nullcontext():
            try:
                tok = AutoTokenizer.from_pretrained(text, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(
                    text,
                    dtype=_DTYPE_AUTO if dtype is None else dtype,
                    use_safetensors=True,
                    trust_remote_code=trust_remote_code,
                    attn_implementation=attn_implementation,
                )
            except OSError as err:
                raise UserError(f"cannot load causal LM {text!r}: {str(err).splitlines()[0]}") from None
        return model.to(device).eval(), tok

    key = f"causal_lm:{text}:{dtype}:{device}:{attn_implementation}:{trust_remote_code}"
    return shared(key, load)


def load_fp32(name: str, head: str = "causal_lm", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model in fp32, tokenizer)``, a fresh private copy (not cached: training changes the
    weights). ``head="seq_cls"`` loads a 1-logit sequence classifier (a reward model) on the same
    backbone. A tokenizer without a pad token pads with EOS (batches need a pad id; rewards and
    labels never depend on it). Training keeps fp32 master weights and runs bf16 as autocast."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    name = fs.local_copy(name) if fs.is_remote(name) else name  # a model in a bucket: its cached local copy
    folder = Path(name).expanduser()
    if folder.is_dir():
        _weights_check(folder)
    elif folder.exists() or name.startswith(("/", ".", "~")):
        raise UserError(f"model folder not found: {folder}")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        if head == "seq_cls":
            model = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True)
    except OSError as err:
        raise UserError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok
