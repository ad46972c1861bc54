"""ElvaEmbedder on the built-in tiny Qwen2-VL, on CPU: shapes, norms, <emb> pooling under padding, freezing, LoRA
gradients, merge and save/load round trips, and the attention choice."""
import logging

import pytest
import torch
from PIL import Image

from elva.model import EMB_TOKEN, RET_TOKEN, ChatCollator, ElvaEmbedder, ModelConfig, resolve_attention

# The tiny model runs in fp32; batching only changes the matmul shapes, so 1e-5 is a generous bound.
ATOL = 1e-5


def _image(color, size=(64, 48)):
    im = Image.new("RGB", size, color)
    # A second colour block, so different images differ in more than their mean.
    im.paste((255 - color[0], color[1], 255 - color[2]), (0, 0, size[0] // 2, size[1] // 3))
    return im


RED, BLUE = _image((200, 10, 10)), _image((10, 10, 200), size=(90, 60))
ITEMS = [
    "a red circle",
    RED,
    (BLUE, "make the square green"),
    "two green triangles at the bottom right on a gray background, and a small star on the left",
    BLUE,
]


def _perturb_lora(emb: ElvaEmbedder, seed: int = 1) -> None:
    """LoRA B starts at zero (a no-op); give the adapters weight so that merge and save tests test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in emb.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def embedder():
    emb = ElvaEmbedder.tiny(seed=0)
    _perturb_lora(emb)
    return emb


def test_shapes_norms_and_determinism(embedder):
    e = embedder.embed(ITEMS)
    assert e.shape == (len(ITEMS), embedder.hidden_size) == (5, 64)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(ITEMS)), atol=1e-6, rtol=0)
    torch.testing.assert_close(embedder.embed(ITEMS), e, atol=0, rtol=0)
    # A fresh model from the same seed gives the same embeddings (LoRA perturbed the same way).
    other = ElvaEmbedder.tiny(seed=0)
    _perturb_lora(other)
    torch.testing.assert_close(other.embed(ITEMS), e, atol=0, rtol=0)
    # Every pair of different inputs gets a different embedding.
    cos = e @ e.T
    off = cos[~torch.eye(len(ITEMS), dtype=torch.bool)]
    assert (off < 1 - 1e-4).all(), cos


def test_instructions_change_the_embedding(embedder):
    plain = embedder.embed(["a red circle", RED])
    instr = embedder.embed(["a red circle", RED], instructions="Retrieve an image that matches the given caption.")
    assert ((plain - instr).norm(dim=-1) > 1e-3).all()
    per_item = embedder.embed(["a red circle", RED], instructions=[None, None])
    torch.testing.assert_close(per_item, plain, atol=0, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_emb_position_with_padded_batches(padding_side):
    emb = ElvaEmbedder.tiny(seed=0, padding_side=padding_side)
    _perturb_lora(emb)
    batch = emb.collate(ITEMS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask.sum(1) < ids.shape[1]).any(), "the batch must hold padded rows"
    emb_id = emb.tokenizer.convert_tokens_to_ids(EMB_TOKEN)
    rows = torch.arange(len(ITEMS))
    assert (ids[rows, batch["emb_index"] + 1] == emb_id).all()
    # The pooled token is the "\n" after "assistant", as with Qwen2-VL's chat template.
    nl = emb.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert (ids[rows, batch["emb_index"]] == nl[-1]).all()
    assert (batch["mm_token_type_ids"].sum(1) == torch.tensor([0, 4, 6, 0, 6])).all()  # grid_thw.prod() // 4
    together = emb.embed(ITEMS)
    alone = torch.cat([emb.embed([item]) for item in ITEMS])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)
    # Mixed batch sizes through embed's chunking also agree.
    torch.testing.assert_close(emb.embed(ITEMS, batch_size=2), together, atol=ATOL, rtol=0)


def test_left_and_right_padding_agree(embedder):
    left = ElvaEmbedder.tiny(seed=0, padding_side="left")
    _perturb_lora(left)
    torch.testing.assert_close(left.embed(ITEMS), embedder.embed(ITEMS), atol=ATOL, rtol=0)


def test_collator_prompts():
    emb = ElvaEmbedder.tiny(seed=0, lora_r=0)
    c = emb.collator
    assert isinstance(c, ChatCollator)
    assert "Summarize above sentence in one word: " in c.render("hi", has_image=False)
    assert "Summarize above image in one word: " in c.render(None, has_image=True, n_image_tokens=2)
    text = c.render("hi", has_image=True, n_image_tokens=2)
    assert text.endswith(f"<|im_start|>assistant\n{EMB_TOKEN}.<|im_end|>\n")
    assert "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi\nSummarize above image and sentence" in text
    assert RET_TOKEN in emb.tokenizer.get_vocab() and emb.ret_token_id != emb.emb_token_id
    # Both new tokens stay single tokens.
    assert emb.tokenizer.tokenize(f"x{EMB_TOKEN}{RET_TOKEN}")[-2:] == [EMB_TOKEN, RET_TOKEN]
    # Text is cut to max_text_tokens before templating, so <emb> survives.
    short = ElvaEmbedder.tiny(seed=0, lora_r=0, max_text_tokens=3)
    b = short.collate(["a red circle " * 50])
    assert b["input_ids"].shape[1] < 60
    with pytest.raises(TypeError, match="an item must be"):
        c([3])
    with pytest.raises(ValueError, match="instructions must be"):
        c(["a", "b"], instructions=["x"])


def test_only_lora_requires_grad(embedder):
    trainable = [n for n, p in embedder.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(".language_model." in n for n in trainable)
    assert not any(p.requires_grad for p in embedder._hf_model().model.visual.parameters())
    assert not embedder._hf_model().get_input_embeddings().weight.requires_grad
    frozen = ElvaEmbedder.tiny(seed=0, lora_r=0)
    assert not frozen.has_lora and not frozen.trainable_parameters()


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_backward_reaches_lora(gradient_checkpointing):
    emb = ElvaEmbedder.tiny(seed=0, gradient_checkpointing=gradient_checkpointing)
    _perturb_lora(emb)
    emb.train()
    flags = [m.gradient_checkpointing for m in emb.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags and any(flags) == gradient_checkpointing
    batch = emb.collate(ITEMS[:4])
    e = emb.forward_embeddings(batch)
    assert e.requires_grad and e.shape == (4, 64)
    loss = torch.nn.functional.cross_entropy(e[:2] @ e[2:].T / 0.05, torch.arange(2))
    loss.backward()
    named = {n: p for n, p in emb.model.named_parameters() if p.requires_grad}
    assert named
    for n, p in named.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert sum(float(p.grad.abs().sum()) for p in named.values()) > 0
    assert all(p.grad is None for p in emb._hf_model().model.visual.parameters())


def test_merge_lora_keeps_embeddings():
    emb = ElvaEmbedder.tiny(seed=0)
    _perturb_lora(emb)
    before = emb.embed(ITEMS)
    base = ElvaEmbedder.tiny(seed=0).embed(ITEMS)
    assert (before - base).abs().max() > 1e-3, "the perturbed adapters must change the embeddings"
    emb.merge_lora()
    assert not emb.has_lora and not emb.trainable_parameters()
    torch.testing.assert_close(emb.embed(ITEMS), before, atol=ATOL, rtol=0)
    # A fresh adapter for the next stage starts as a no-op.
    emb.add_lora(r=4, alpha=8)
    assert emb.has_lora and emb.config.lora_r == 4 and emb.trainable_parameters()
    torch.testing.assert_close(emb.embed(ITEMS), before, atol=ATOL, rtol=0)


def test_save_and_load_round_trip(embedder, tmp_path):
    before = embedder.embed(ITEMS)
    embedder.save_pretrained(tmp_path / "ckpt")
    loaded = ElvaEmbedder.from_pretrained(tmp_path / "ckpt")
    assert loaded.has_lora and loaded.config == embedder.config
    assert loaded.emb_token_id == embedder.emb_token_id and loaded.ret_token_id == embedder.ret_token_id
    torch.testing.assert_close(loaded.embed(ITEMS), before, atol=0, rtol=0)
    assert loaded.trainable_parameters() and all(
        "lora_" in n for n, p in loaded.model.named_parameters() if p.requires_grad
    )
    # A merged checkpoint loads as plain weights plus a fresh (no-op) adapter.
    loaded.merge_lora()
    loaded.save_pretrained(tmp_path / "merged")
    again = ElvaEmbedder.from_pretrained(tmp_path / "merged", lora_r=8)
    assert again.has_lora
    torch.testing.assert_close(again.embed(ITEMS), before, atol=ATOL, rtol=0)


def test_modules_to_save_train_save_merge_and_disable_with_the_adapters(tmp_path):
    """lora_modules_to_save=[lm_head]: the head trains beside LoRA, survives save/load and merge, and disabling the
    adapters (the GRPO reference policy) restores the original head."""
    emb = ElvaEmbedder.tiny(seed=0, lora_modules_to_save=["lm_head"])
    trainable = [n for n, p in emb.model.named_parameters() if p.requires_grad]
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trainable
    assert all("lora_" in n or ".modules_to_save." in n for n in trainable)
    original = emb._hf_model().lm_head.original_module.weight.clone()
    with torch.no_grad():
        for name, p in emb.model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(3, 64)
    trained = emb._hf_model().lm_head(hidden)
    with emb.model.disable_adapter():
        torch.testing.assert_close(emb._hf_model().lm_head(hidden), hidden @ original.T)
    assert (trained - hidden @ original.T).abs().max() > 0.1

    emb.save_pretrained(tmp_path / "ckpt")
    loaded = ElvaEmbedder.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.lora_modules_to_save == ("lm_head",)
    torch.testing.assert_close(loaded._hf_model().lm_head(hidden), trained, atol=0, rtol=0)
    with loaded.model.disable_adapter():
        torch.testing.assert_close(loaded._hf_model().lm_head(hidden), hidden @ original.T)
    before = emb.embed(ITEMS)
    emb.merge_lora()
    torch.testing.assert_close(emb._hf_model().lm_head(hidden), trained, atol=ATOL, rtol=0)
    emb.save_pretrained(tmp_path / "merged")
    merged = ElvaEmbedder.from_pretrained(tmp_path / "merged", lora_r=0)
    torch.testing.assert_close(merged._hf_model().lm_head(hidden), trained, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged.embed(ITEMS), before, atol=ATOL, rtol=0)


def test_attention_choice_is_sdpa_and_logged(caplog):
    if torch.cuda.is_available():
        pytest.skip("the auto choice is only pinned down on a CPU machine")
    with caplog.at_level(logging.INFO, logger="elva.model"):
        emb = ElvaEmbedder.tiny(seed=0, lora_r=0)
    assert emb.attn_implementation == "sdpa"
    assert emb._hf_model().config._attn_implementation == "sdpa"
    assert any("attention: sdpa" in r.getMessage() for r in caplog.records)
    assert resolve_attention("eager") == "eager"
    with caplog.at_level(logging.WARNING, logger="elva.model"):
        assert resolve_attention("flash_attention_2") == "sdpa"
    assert any(r.levelno == logging.WARNING and "flash_attention_2 unusable" in r.getMessage()
               for r in caplog.records)


def test_config_from_dict_and_validation():
    cfg = ModelConfig.from_dict({"dtype": "bfloat16", "lora_r": 16, "lora_target_modules": ["q_proj", "v_proj"]})
    assert cfg.lora_target_modules == ("q_proj", "v_proj") and cfg.torch_dtype == torch.bfloat16
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"lora_rank": 8})
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(attention="flex_attention")
    with pytest.raises(ValueError, match="padding_side"):
        ModelConfig(padding_side="middle")


def test_bfloat16_embeddings_are_fp32_unit_norm():
    emb = ElvaEmbedder.tiny(seed=0, dtype="bfloat16")
    assert emb._hf_model().dtype == torch.bfloat16
    e = emb.embed(ITEMS[:3])
    assert e.dtype == torch.float32 and e.shape == (3, 64)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
