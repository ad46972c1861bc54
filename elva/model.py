"""The ELVA embedder: Qwen2-VL with a frozen vision tower, LoRA on the language model, LamRA-style ``<emb>`` pooling.

An input (text, image, or both) becomes a two-turn chat, rendered exactly as Qwen2-VL's chat template does::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n[<|vision_start|><|image_pad|>*n<|vision_end|>]{text}\\n
        Summarize above image and sentence in one word: <|im_end|>\\n      (one line, wrapped here)
    <|im_start|>assistant\\n<emb>.<|im_end|>\\n

("image and sentence" becomes "image" or "sentence" for a single modality; a query's task instruction is prefixed to
its text as ``f"{instruction} {text}"``, as in Code-kunkun/LamRA.) The embedding is the last-layer hidden state one
position before the first ``<emb>``, i.e. at the "\\n" after ``assistant``, L2-normalised in fp32. Attention is
causal, so the ``<emb>`` row of the embedding matrix and everything after it never reach the feature: the new
token rows need no gradient and stay frozen.

Everything here runs offline: :meth:`ElvaEmbedder.tiny` builds a small random Qwen2-VL with an in-process trained
byte-level BPE tokenizer, and :meth:`ElvaEmbedder.from_pretrained` reads a local folder (a downloaded
Qwen2-VL-*-Instruct, or one written by :meth:`ElvaEmbedder.save_pretrained`). The processor class is never used
(it needs torchvision); the tokenizer and the PIL image processor are kept and saved separately.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ModelConfig",
    "ChatCollator",
    "ElvaEmbedder",
    "resolve_attention",
    "build_tiny_tokenizer",
    "build_image_processor",
    "EMB_TOKEN",
    "RET_TOKEN",
    "GENERATIVE_PROMPT",
    "SUMMARY_SUPPRESSED_TOKENS",
    "QWEN_SPECIAL_TOKENS",
    "QWEN2VL_2B_SIZES",
    "QWEN2VL_2B_VOCAB",
    "TINY_MODEL_CONFIG",
]

EMB_TOKEN = "<emb>"
RET_TOKEN = "[RET]"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Tokens a generated summary may not contain: vision placeholders would desynchronise the image features, <emb>
# belongs to the stage 1-2 template, <|im_start|> opens a turn and <|endoftext|> is the padding.
SUMMARY_SUPPRESSED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", EMB_TOKEN,
                             "<|im_start|>", "<|endoftext|>")
# Stage 3's generative extraction (SPEC Part B): the model writes a summary, then [RET], whose hidden state is the
# embedding.
GENERATIVE_PROMPT = ("Analyze and summarize the key information of the above input. Finally, append the special "
                     "token [RET] to represent the entire input.")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
_ELVA_CONFIG_FILE = "elva_model.json"
_ADAPTER_DIR = "adapter"

# The built-in tiny Qwen2-VL (about 0.2M parameters with the tiny tokenizer). mrope_section must sum to
# head_dim / 2 = (64 / 4) / 2 = 8, and the vision hidden_size must equal the text hidden_size.
TINY_MODEL_CONFIG: dict[str, Any] = {
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
    },
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 4,
        "mlp_ratio": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "tie_word_embeddings": False,
}
# Qwen2-VL-2B-Instruct's shapes (its public config.json), for throughput runs of a randomly initialised model.
QWEN2VL_2B_SIZES: dict[str, Any] = {
    "text_config": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 1536,
        "num_heads": 16,
        "mlp_ratio": 4,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "tie_word_embeddings": True,
}
QWEN2VL_2B_VOCAB = 151936
# Image sizes for the tiny model: 56x56 to 224x224 pixels (4 to 64 merged image tokens).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 64

# Enough English for a byte-level BPE to learn the prompt words and caption-like words of the synthetic benchmark.
_TINY_CORPUS = [
    "You are a helpful assistant.",
    "Summarize above image and sentence in one word: ",
    "Summarize above image in one word: ",
    "Summarize above sentence in one word: ",
    "Analyze and summarize the key information of the above input. Finally, append the special token to represent "
    "the entire input.",
    "system user assistant",
    "Retrieve an image that matches the given caption.",
    "Retrieve a caption that describes the given image.",
    "Find an image that looks like the given image.",
    "Retrieve the image after applying the modification to the reference image.",
    "Find a sentence that is entailed by the given sentence.",
    "a small red circle in the top left corner on a white background",
    "a large blue square in the center on a black background",
    "two green triangles at the bottom right on a gray background",
    "three yellow stars on the left over a striped background",
    "one purple hexagon on the right on a dotted background",
    "make the circle green and move it to the top",
    "a man is riding a horse along the beach at sunset",
    "a woman is reading a book in the park while a dog sleeps",
    "two children are playing football on the grass",
    "the cat sits on the mat next to an orange ball",
    "a photo of a city street with cars, people and tall buildings",
    "A person is cooking dinner in a kitchen. Nobody is cooking.",
    "shape colour color size position count background small medium large big tiny",
    "red orange yellow green blue purple pink brown black white gray",
    "circle square triangle star hexagon rectangle ellipse cross diamond heart",
    "top bottom left right center middle corner upper lower near far",
    "one two three four five six seven eight nine ten",
    "plain striped dotted checkered gradient noisy",
    "0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' \" ( ) - _ / \\n",
]


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Options of :class:`ElvaEmbedder`.

    > Precision and attention

    - ``dtype``: parameter dtype, "float32", "bfloat16" or "float16". Embeddings are always returned in fp32.
    - ``attention``: "auto", "sdpa", "eager" or "flash_attention_2". "auto" takes flash_attention_2 only when
      ``flash_attn`` imports and CUDA is available, else sdpa (which runs PyTorch's flash kernels on GPU).
    - ``gradient_checkpointing``: recompute the language model's activations in the backward pass
      (non-reentrant, so frozen input embeddings need no ``requires_grad`` trick).

    > LoRA (peft, on the language model only; the vision tower is always frozen)

    - ``lora_r``: rank; 0 means no adapters and every parameter frozen (a reference or inference model).
    - ``lora_alpha``, ``lora_dropout``: as in ``peft.LoraConfig``.
    - ``lora_target_modules``: leaf names of the language model's linear layers that get adapters.
    - ``lora_modules_to_save``: modules trained in full beside the adapters (peft's ``modules_to_save``), e.g.
      ``["lm_head"]`` where the summaries of the generative extraction need a language-model head that learns (the
      built-in tiny model's is random). Disabling the adapters disables these copies too.

    > Inputs

    - ``max_text_tokens``: the text of an input is cut to this many tokens before templating (LamRA: 480), so
      ``<emb>`` is never cut off.
    - ``min_pixels`` / ``max_pixels``: image size bounds for the image processor; None keeps the processor's own
      (LamRA uses ``max_pixels = 300 * 28 * 28`` with Qwen2-VL-7B).
    - ``padding_side``: "right" or "left"; the ``<emb>`` position is found per row, so both give the same embeddings.
    - ``system_prompt``: the Qwen2-VL chat template's default system turn; None or "" drops it.

    > Extraction used by evaluation and mining (training always uses its own stage's)

    - ``extraction``: "emb" (the hidden state before ``<emb>``) or "generative" (greedy summary, then the hidden
      state at ``[RET]``; written by stage 3); ``generative_max_new_tokens`` caps the summary.
    """

    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    attention: str = field(default="auto", metadata={"help": "auto, sdpa, eager or flash_attention_2"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute LM activations in backward"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank; 0 = no adapters, everything frozen"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: tuple[str, ...] = field(
        default=DEFAULT_LORA_TARGETS, metadata={"help": "language-model linear layers that get LoRA"}
    )
    lora_modules_to_save: tuple[str, ...] = field(
        default=(), metadata={"help": "modules trained in full beside LoRA (peft modules_to_save), e.g. lm_head"}
    )
    max_text_tokens: int = field(default=480, metadata={"help": "text tokens kept per input before templating"})
    min_pixels: int | None = field(default=None, metadata={"help": "image processor shortest_edge (pixels)"})
    max_pixels: int | None = field(default=None, metadata={"help": "image processor longest_edge (pixels)"})
    padding_side: str = field(default="right", metadata={"help": "right or left"})
    system_prompt: str | None = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system turn text"})
    extraction: str = field(default="emb", metadata={"help": "emb (stages 1-2) or generative (stage 3, [RET])"})
    generative_max_new_tokens: int = field(default=32, metadata={"help": "greedy summary length, generative"})

    def __post_init__(self):
        for name in ("lora_target_modules", "lora_modules_to_save"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {self.dtype!r}")
        if self.attention not in _ATTENTIONS:
            raise ValueError(f"attention must be one of {list(_ATTENTIONS)}; got {self.attention!r}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 = no adapters); got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if self.lora_r > 0 and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module when lora_r > 0; got ()")
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1; got {self.max_text_tokens}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {self.padding_side!r}")
        if self.extraction not in ("emb", "generative"):
            raise ValueError(f"extraction must be 'emb' or 'generative'; got {self.extraction!r}")
        if self.generative_max_new_tokens < 1:
            raise ValueError(f"generative_max_new_tokens must be >= 1; got {self.generative_max_new_tokens}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels}); lower min_pixels"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ModelConfig":
        """Build from a dict (e.g. the ``model:`` section of a YAML file); unknown keys raise ValueError."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        d["lora_modules_to_save"] = list(self.lora_modules_to_save)
        return d

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def resolve_attention(requested: str = "auto") -> str:
    """Map an attention option to the implementation transformers gets, and log the choice.

    "auto" gives "flash_attention_2" only when ``flash_attn`` imports and CUDA is available, else "sdpa".
    An explicit "flash_attention_2" without flash_attn falls back to "sdpa" with a warning.
    """
    if requested not in _ATTENTIONS:
        raise ValueError(f"attention must be one of {list(_ATTENTIONS)}; got {requested!r}")
    if requested in ("sdpa", "eager"):
        logger.info("attention: %s (requested %s)", requested, requested)
        return requested
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("CUDA is not available")
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build raising something else
        reasons.append(f"flash_attn does not import ({type(exc).__name__}: {exc})")
    if not reasons:
        logger.info("attention: flash_attention_2 (requested %s)", requested)
        return "flash_attention_2"
    log = logger.warning if requested == "flash_attention_2" else logger.info
    log("attention: sdpa (requested %s; flash_attention_2 unusable: %s)", requested, "; ".join(reasons))
    return "sdpa"


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and image processor
# --------------------------------------------------------------------------------------------------------------------
def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 512):
    """A byte-level BPE trained in-process on a small built-in corpus, with the Qwen specials, ``<emb>`` and ``[RET]``.

    The corpus order is shuffled by ``seed``; the result is deterministic for a given seed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(_TINY_CORPUS)
    random.Random(seed).shuffle(corpus)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    _add_elva_tokens(fast)
    return fast


def _add_elva_tokens(tokenizer) -> None:
    """Add ``<emb>`` and ``[RET]`` as special (never split) tokens when the tokenizer lacks them."""
    missing = [t for t in (EMB_TOKEN, RET_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


def build_image_processor(min_pixels: int | None = TINY_MIN_PIXELS, max_pixels: int | None = TINY_MAX_PIXELS):
    """Qwen2-VL's PIL image processor (the default one needs torchvision), 14-px patches merged 2x2."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )


def _set_pixel_bounds(image_processor, min_pixels: int | None, max_pixels: int | None) -> None:
    if min_pixels is None and max_pixels is None:
        return
    size = dict(getattr(image_processor, "size", None) or {})
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
        if hasattr(image_processor, "min_pixels"):
            image_processor.min_pixels = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
        if hasattr(image_processor, "max_pixels"):
            image_processor.max_pixels = max_pixels
    image_processor.size = size


# --------------------------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------------------------
Item = Union[str, "PIL.Image.Image", tuple]  # noqa: F821


def _split_item(item) -> tuple[Any, str | None]:
    """(image or None, text or None) from a str, a PIL image, an (image, text) pair or a dict with image/text."""
    from PIL import Image

    if isinstance(item, str):
        return None, item
    if isinstance(item, Image.Image):
        return item, None
    if isinstance(item, Mapping):
        image, text = item.get("image"), item.get("text")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        image, text = item
    else:
        raise TypeError(
            "an item must be a str, a PIL.Image.Image, an (image, text) pair or a dict with 'image'/'text'; "
            f"got {type(item).__name__}"
        )
    if image is not None and not isinstance(image, Image.Image):
        raise TypeError(f"an item's image must be a PIL.Image.Image or None; got {type(image).__name__}")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"an item's text must be a str or None; got {type(text).__name__}")
    if image is None and text is None:
        raise ValueError("an item needs an image, a text or both; got neither")
    return image, text


class ChatCollator:
    """Turns items into a padded Qwen2-VL batch whose embedding position is known per row.

    Call it with a list of items (str, PIL image, (image, text)) and optional instructions (one str for all, or a
    list aligned with the items, None entries allowed). Returns a dict of CPU tensors:

    - ``input_ids`` int64 [B, L], ``attention_mask`` int64 [B, L] (padded on ``padding_side``);
    - ``mm_token_type_ids`` int64 [B, L], 1 on ``<|image_pad|>`` tokens;
    - ``emb_index`` int64 [B]: the position one before the first ``<emb>`` of each row (the pooled position);
      absent with ``generative=True``, which renders stage 3's open-ended prompt, left-padded, for generation;
    - when any item has an image: ``pixel_values`` float32 [sum of patches, 3*2*14*14] and ``image_grid_thw``
      int64 [n_images, 3], in row order.

    Each image takes ``grid_thw.prod() // merge_size**2`` ``<|image_pad|>`` tokens.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        *,
        max_text_tokens: int = 480,
        padding_side: str = "right",
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_tokens = max_text_tokens
        self.padding_side = padding_side
        self.system_prompt = system_prompt
        vocab = tokenizer.get_vocab()
        missing = [t for t in (EMB_TOKEN, "<|image_pad|>", "<|vision_start|>", "<|vision_end|>") if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the tokens {missing}; build it with build_tiny_tokenizer or load "
                             "a Qwen2-VL tokenizer (ElvaEmbedder adds <emb> and [RET] itself)")
        self.emb_token_id = vocab[EMB_TOKEN]
        self.image_token_id = vocab["<|image_pad|>"]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab["<|endoftext|>"]
        self.merge_size = int(getattr(image_processor, "merge_size", 2))

    def render(self, text: str | None, has_image: bool, n_image_tokens: int = 0, generative: bool = False) -> str:
        """The chat text of one input, with ``n_image_tokens`` image placeholders. ``generative`` renders stage 3's
        prompt and leaves the assistant turn open for the summary and ``[RET]``."""
        user = ""
        if has_image:
            user += "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>"
        if generative:
            user += f"{text or ''}\n{GENERATIVE_PROMPT}"
        else:
            what = "image and sentence" if has_image and text else "image" if has_image else "sentence"
            user += f"{text or ''}\nSummarize above {what} in one word: "
        system = f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n" if self.system_prompt else ""
        prompt = f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return prompt if generative else f"{prompt}{EMB_TOKEN}.<|im_end|>\n"

    def _truncate(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_text_tokens])

    def __call__(self, items: Sequence[Item], instructions: str | Sequence[str | None] | None = None, *,
                 generative: bool = False) -> dict:
        items = list(items)
        if not items:
            raise ValueError("items must hold at least one item; got an empty list")
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(items)
        instructions = list(instructions)
        if len(instructions) != len(items):
            raise ValueError(f"instructions must be one str or a list as long as items ({len(items)}); "
                             f"got a list of {len(instructions)}")

        images, texts = [], []
        for item, instruction in zip(items, instructions):
            image, text = _split_item(item)
            if text is not None:
                text = self._truncate(text)
            if instruction:
                text = f"{instruction} {text}" if text else instruction
            images.append(image)
            texts.append(text)

        batch: dict[str, torch.Tensor] = {}
        n_tokens = [0] * len(items)
        present = [i for i, im in enumerate(images) if im is not None]
        if present:
            vis = self.image_processor(images=[images[i].convert("RGB") for i in present], return_tensors="pt")
            grid = vis["image_grid_thw"].to(torch.long)
            batch["pixel_values"] = vis["pixel_values"]
            batch["image_grid_thw"] = grid
            for row, g in zip(present, grid):
                n_tokens[row] = int(g.prod()) // (self.merge_size**2)

        rows = [
            self.tokenizer(self.render(t, im is not None, n, generative), add_special_tokens=False)["input_ids"]
            for t, im, n in zip(texts, images, n_tokens)
        ]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = generative or self.padding_side == "left"  # generation continues every prompt at the same column
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, sl] = 1
        batch["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        batch["input_ids"] = input_ids
        batch["attention_mask"] = attention_mask
        if generative:
            return batch
        is_emb = (input_ids == self.emb_token_id) & attention_mask.bool()
        if not bool(is_emb.any(dim=1).all()):
            bad = (~is_emb.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"rows {bad} have no {EMB_TOKEN} token after tokenisation; the tokenizer must keep "
                             f"{EMB_TOKEN} as one special token")
        batch["emb_index"] = is_emb.long().argmax(dim=1) - 1
        return batch


# --------------------------------------------------------------------------------------------------------------------
# The embedder
# --------------------------------------------------------------------------------------------------------------------
class ElvaEmbedder(nn.Module):
    """Qwen2-VL embedder. ``model`` is the HF ``Qwen2VLForConditionalGeneration``, wrapped in a peft ``PeftModel``
    while LoRA adapters are attached.

    Trainable parameters: only the LoRA A/B matrices of the language model (``lora_r > 0``). The vision tower, the
    base language model, the embedding matrix (including the ``<emb>``/``[RET]`` rows: ``<emb>`` never reaches the
    pooled position) and the LM head are frozen.
    """

    def __init__(self, model, tokenizer, image_processor, config: ModelConfig | None = None,
                 attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config or ModelConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.attn_implementation = attn_implementation
        vocab = tokenizer.get_vocab()
        self.emb_token_id = vocab[EMB_TOKEN]
        self.ret_token_id = vocab[RET_TOKEN]
        self.suppressed_token_ids = [vocab[t] for t in SUMMARY_SUPPRESSED_TOKENS if t in vocab]
        hf_cfg = self._hf_model().config
        image_token_id = getattr(hf_cfg, "image_token_id", None)
        if image_token_id is not None and image_token_id != vocab["<|image_pad|>"]:
            raise ValueError(f"the model's image_token_id ({image_token_id}) differs from the tokenizer's "
                             f"<|image_pad|> id ({vocab['<|image_pad|>']}); load the tokenizer of this checkpoint")
        self.collator = ChatCollator(
            tokenizer,
            image_processor,
            max_text_tokens=self.config.max_text_tokens,
            padding_side=self.config.padding_side,
            system_prompt=self.config.system_prompt,
        )

    # ---- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, config: ModelConfig | Mapping | None = None, **overrides) -> "ElvaEmbedder":
        """The built-in tiny random Qwen2-VL (hidden 64, 2 layers, vision depth 2) with a BPE tokenizer trained on
        a built-in corpus. Deterministic for a given seed; the global RNG is left untouched."""
        return cls.random(TINY_MODEL_CONFIG, seed=seed, config=config, **overrides)

    @classmethod
    def random(cls, sizes: Mapping[str, Any], seed: int = 0, config: ModelConfig | Mapping | None = None,
               vocab_size: int | None = None, **overrides) -> "ElvaEmbedder":
        """A randomly initialised Qwen2-VL of the given ``sizes`` (TINY_MODEL_CONFIG's layout, e.g.
        QWEN2VL_2B_SIZES) with the built-in tokenizer; ``vocab_size`` pads the embedding table (a real model's)."""
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        cfg = _make_config(config, overrides)
        if cfg.min_pixels is None:
            cfg.min_pixels = TINY_MIN_PIXELS
        if cfg.max_pixels is None:
            cfg.max_pixels = TINY_MAX_PIXELS
        tokenizer = build_tiny_tokenizer(seed)
        image_processor = build_image_processor(cfg.min_pixels, cfg.max_pixels)
        vocab = tokenizer.get_vocab()
        text_config = dict(sizes["text_config"])
        text_config.update(
            vocab_size=max(len(tokenizer), vocab_size or 0),
            bos_token_id=vocab["<|endoftext|>"],
            eos_token_id=vocab["<|im_end|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
        hf_cfg = Qwen2VLConfig(
            text_config=text_config,
            vision_config=dict(sizes["vision_config"]),
            image_token_id=vocab["<|image_pad|>"],
            video_token_id=vocab["<|video_pad|>"],
            vision_start_token_id=vocab["<|vision_start|>"],
            vision_end_token_id=vocab["<|vision_end|>"],
            tie_word_embeddings=sizes["tie_word_embeddings"],
        )
        attn = resolve_attention(cfg.attention)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2VLForConditionalGeneration._from_config(hf_cfg, attn_implementation=attn)
            model = model.to(cfg.torch_dtype)
            return cls._finish(model, tokenizer, image_processor, cfg, attn, adapter_dir=None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: ModelConfig | Mapping | None = None,
                        **overrides) -> "ElvaEmbedder":
        """Load a local checkpoint folder: a Qwen2-VL-*-Instruct download, or one written by :meth:`save_pretrained`.

        Options come from ``config``/``overrides`` on top of the folder's saved ``elva_model.json`` (if any). A
        saved adapter (``<path>/adapter``) is restored as trainable LoRA; otherwise fresh LoRA is attached when
        ``lora_r > 0`` (its B matrices start at zero, so the embeddings equal the base model's).
        """
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"path must be a local checkpoint folder; got {path!r}, which is not a directory")
        saved: dict[str, Any] = {}
        saved_file = os.path.join(path, _ELVA_CONFIG_FILE)
        if os.path.exists(saved_file):
            with open(saved_file) as f:
                saved = json.load(f)
        if isinstance(config, ModelConfig):
            cfg = dataclasses.replace(config, **overrides)
        else:
            cfg = ModelConfig.from_dict({**saved, **dict(config or {}), **overrides})
        tokenizer = AutoTokenizer.from_pretrained(path)
        _add_elva_tokens(tokenizer)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        _set_pixel_bounds(image_processor, cfg.min_pixels, cfg.max_pixels)
        attn = resolve_attention(cfg.attention)
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=cfg.torch_dtype, attn_implementation=attn)
        # Real Qwen2-VL checkpoints keep spare rows (151936 > len(tokenizer)), so the new tokens usually fit.
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        adapter_dir = os.path.join(path, _ADAPTER_DIR)
        return cls._finish(model, tokenizer, image_processor, cfg, attn,
                           adapter_dir=adapter_dir if os.path.isdir(adapter_dir) else None)

    @classmethod
    def _finish(cls, model, tokenizer, image_processor, cfg: ModelConfig, attn: str, adapter_dir):
        model.config.emb_token_id = tokenizer.convert_tokens_to_ids(EMB_TOKEN)
        model.config.ret_token_id = tokenizer.convert_tokens_to_ids(RET_TOKEN)
        model.requires_grad_(False)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        self = cls(model, tokenizer, image_processor, cfg, attn)
        if adapter_dir is None and cfg.lora_r > 0:
            self.add_lora()
        self._freeze_non_lora()
        if cfg.gradient_checkpointing:
            _enable_checkpointing(self._hf_model())
        self.eval()
        return self

    # ---- LoRA ------------------------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    def add_lora(self, r: int | None = None, alpha: float | None = None, dropout: float | None = None,
                 target_modules: Sequence[str] | None = None) -> "ElvaEmbedder":
        """Attach fresh LoRA adapters to the language model (e.g. for the next stage after :meth:`merge_lora`).
        Arguments default to the config, which is updated to the values used."""
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise ValueError("LoRA adapters are already attached; call merge_lora() first")
        c = self.config
        c.lora_r = c.lora_r if r is None else r
        c.lora_alpha = c.lora_alpha if alpha is None else alpha
        c.lora_dropout = c.lora_dropout if dropout is None else dropout
        if target_modules is not None:
            c.lora_target_modules = tuple(target_modules)
        if c.lora_r <= 0:
            raise ValueError(f"add_lora needs r > 0; got {c.lora_r}")
        # A regex (full match) keeps the adapters off the vision tower, whose layers are qkv/proj/fc1/fc2 anyway.
        names = "|".join(sorted(set(c.lora_target_modules)))
        lora = LoraConfig(
            r=c.lora_r,
            lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout,
            target_modules=rf".*language_model.*\.({names})",
            modules_to_save=list(c.lora_modules_to_save) or None,
            bias="none",
        )
        self.model = get_peft_model(self.model, lora)
        n = sum(p.numel() for p in self.trainable_parameters())
        if n == 0:
            raise ValueError(f"no language-model module matched lora_target_modules {list(c.lora_target_modules)}")
        self._freeze_non_lora()
        logger.info("LoRA attached: r=%d alpha=%g dropout=%g targets=%s (%d trainable parameters)",
                    c.lora_r, c.lora_alpha, c.lora_dropout, list(c.lora_target_modules), n)
        return self

    def merge_lora(self) -> "ElvaEmbedder":
        """Fold the LoRA adapters into the base weights and drop them; every parameter is then frozen.
        Call :meth:`add_lora` to start the next stage."""
        if self.has_lora:
            self.model = self.model.merge_and_unload()
        self.model.requires_grad_(False)
        return self

    def _freeze_non_lora(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name or ".modules_to_save." in name)
        for p in self._hf_model().model.visual.parameters():
            p.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights only (for trainer checkpoints); empty without LoRA."""
        if not self.has_lora:
            return {}
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    # ---- saving ----------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the base weights (LoRA not folded in), the tokenizer, the image processor, ``elva_model.json`` and,
        with LoRA attached, the adapter in ``<path>/adapter``. :meth:`from_pretrained` restores it exactly."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        base = self._hf_model()
        if self.has_lora:
            state = {}
            for k, v in base.state_dict().items():
                if "lora_" in k or ".modules_to_save." in k:  # those are in the adapter
                    continue
                state[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = v
            base.save_pretrained(path, state_dict=state)
            self.model.save_pretrained(os.path.join(path, _ADAPTER_DIR))
        else:
            base.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        with open(os.path.join(path, _ELVA_CONFIG_FILE), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    # ---- forward ---------------------------------------------------------------------------------------------------
    def _hf_model(self):
        """The ``Qwen2VLForConditionalGeneration`` (inside the peft wrapper when adapters are attached)."""
        return self.model.get_base_model() if self.has_lora else self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self._hf_model().config.text_config.hidden_size

    def collate(self, items: Sequence[Item], instructions=None) -> dict:
        """Same as ``self.collator(items, instructions)``."""
        return self.collator(items, instructions)

    def forward_embeddings(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of a collated batch, with gradients: fp32 [B, hidden], L2-normalised.

        The batch comes from :class:`ChatCollator`; tensors are moved to the model's device here.
        """
        device = self.device
        kwargs = {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
            "mm_token_type_ids": batch["mm_token_type_ids"].to(device),
            "use_cache": False,
        }
        if "pixel_values" in batch:
            kwargs["pixel_values"] = batch["pixel_values"].to(device, self._hf_model().dtype)
            kwargs["image_grid_thw"] = batch["image_grid_thw"].to(device)
        # The inner Qwen2VLModel returns the final-norm hidden states without computing the LM-head logits.
        hidden = self._hf_model().model(**kwargs).last_hidden_state
        index = batch["emb_index"].to(device)
        pooled = hidden[torch.arange(hidden.shape[0], device=device), index]
        return F.normalize(pooled.float(), dim=-1)

    forward = forward_embeddings

    @torch.no_grad()
    def embed(self, items: Sequence[Item], instructions=None, batch_size: int = 32,
              extraction: str = "emb") -> torch.Tensor:
        """Embeddings of items (str, PIL image or (image, text)), fp32 [n, hidden], L2-normalised, on the model's
        device. Runs in eval mode without gradients, ``batch_size`` items per forward. ``extraction`` "emb" pools
        before ``<emb>``; "generative" reads ``[RET]`` after a greedy summary of at most
        ``config.generative_max_new_tokens`` tokens (:meth:`generate_embed`)."""
        items = list(items)
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(items)
        instructions = list(instructions)
        if len(instructions) != len(items):
            raise ValueError(f"instructions must be one str or a list as long as items ({len(items)}); "
                             f"got a list of {len(instructions)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if extraction not in ("emb", "generative"):
            raise ValueError(f"extraction must be 'emb' or 'generative'; got {extraction!r}")
        if not items:
            return torch.empty(0, self.hidden_size, device=self.device)

        def chunk(rows: slice) -> torch.Tensor:
            if extraction == "generative":
                return self.generate_embed(items[rows], instructions[rows],
                                           max_new_tokens=self.config.generative_max_new_tokens).embeddings
            return self.forward_embeddings(self.collator(items[rows], instructions[rows]))

        was_training = self.training
        self.eval()
        try:
            out = [chunk(slice(i, i + batch_size)) for i in range(0, len(items), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out)

    def generate_embed(self, items: Sequence[Item], instructions=None, *, sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 32):
        """Stage 3's generative embeddings: a summary, then ``[RET]``, whose hidden state is the embedding. Returns
        an :class:`elva.generative.Generation` (token ids, their log-probs, embeddings); see that module."""
        from elva.generative import generate_embed

        return generate_embed(self, items, instructions, sample=sample, temperature=temperature, top_p=top_p,
                              max_new_tokens=max_new_tokens)


def _enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing; transformers 5.24 renamed the method (5.17 has only the old name)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _make_config(config, overrides) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return dataclasses.replace(config, **overrides)
    return ModelConfig.from_dict({**dict(config or {}), **overrides})
