"""
The text-to-image GPT: a decoder-only transformer that reads a prompt and writes VQGAN image codes, plus the two
pieces ARRA adds for training (section "ARRA" below: a projector and the alignment loss; `grep -n ARRA` finds them).

    model = GPT(preset_config('B', codebook_size=16384, image_tokens=256, teacher_dim=512))
    out = model(text, codes, teacher)            # out.loss (CE), out.align_loss (ARRA), out.logits
    codes = model.generate(text, cfg_scale=2.0)  # (B, T) image codes: KV cache, classifier-free guidance

Sequence: [pad .. pad SOT t_1 .. t_k EOT] [BOI] [c_0 .. c_{T-2}]; the last T positions predict c_0 .. c_{T-1}.
Blocks are LlamaGen's (pre-norm RMSNorm, fused qkv, SwiGLU, rotary positions on every token; README, "Notes");
image inputs also get a learned row + column vector for the grid cell they predict (README, "Image positions").
References: nanoGPT's model.py (structure, init, optimizer groups, MFU), LlamaGen's autoregressive/models/gpt.py
(blocks, sizes, CFG sampling), ARRA arXiv 2503.07334. Imports only torch.
"""
import math
import inspect
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F


@dataclass
class GPTConfig:
    n_layer: int = 4                # transformer blocks (presets below: LlamaGen's B / L / XL / XXL)
    n_head: int = 4                 # attention heads; head_dim = n_embd // n_head must be even (rotary pairs)
    n_embd: int = 128               # model width d
    n_kv_head: int = 0              # key/value heads (grouped-query attention, as Llama LLMs); 0 = n_head
    ffn_hidden: int = 0             # SwiGLU hidden width; 0 = LlamaGen's rule (ffn_hidden_dim)
    norm_eps: float = 1e-5          # RMSNorm epsilon
    codebook_size: int = 512        # V: image code vocabulary (the output head covers codes only)
    image_tokens: int = 64          # T = grid_h * grid_w codes per image, raster order
    image_width: int = 0            # grid_w: codes per image row (grid_h = image_tokens // image_width); 0 = square
    image_pos: str = 'rowcol'       # 'rowcol': learned row + column vectors on image inputs; 'none': rotary only
    text_len: int = 28              # L: text block length (left-padded)
    text_vocab_size: int = 49409    # open_clip BPE 49408 + one pad id
    text_pad_id: int = 49408        # id of the left pad (data/common.py TEXT_PAD_ID)
    text_sot_id: int = 49406        # start-of-text id (open_clip)
    text_eot_id: int = 49407        # end-of-text id (open_clip)
    dropout: float = 0.0            # embedding/attention/residual/ffn dropout (LlamaGen uses 0.1 on ImageNet)
    rope_base: float = 10000.0      # rotary frequency base
    rope_llama3: tuple = ()         # Llama 3's rotary rescaling (factor, low_freq_factor, high_freq_factor,
                                    # original_max_position_embeddings); () = none
    # ARRA (section "ARRA" below): the projector and which hidden states it aligns; training only
    teacher_dim: int = 0            # D of the teacher embedding; 0 = no projector (inference-only model)
    projector_hidden: int = 0       # hidden width of the projector MLP; 0 = teacher_dim (the paper's choice)
    align_layer: int = 1            # align the hidden state after this many blocks (1 = first block, paper default)
    align_positions: str = 'hybnext'  # 'hybnext': all T image prediction positions (BOI, c_0..c_{T-2}); 'rep': BOI only
    align_target: str = 'global'    # 'global': ARRA's one vector per image; 'patch': REPA's per-cell targets (each
                                    # prediction position its own cell); 'both': the two losses, two projectors
    patch_dim: int = 0              # width of the teacher's patch targets; 0 = no patch projector
    patch_projector: str = 'mlp'    # 'mlp': Projector's 2-layer GELU form; 'repa': LlamaGen-REPA's 3-layer SiLU MLP
    patch_projector_hidden: int = 0  # hidden width; 0 = patch_dim ('mlp') or 2048 ('repa', REPA's)

    def __post_init__(self):
        if self.image_width == 0 and math.isqrt(self.image_tokens) ** 2 == self.image_tokens:
            self.image_width = math.isqrt(self.image_tokens)  # a square grid, stored explicitly


ALIGN_TARGETS = ('global', 'patch', 'both')  # what the hidden states are aligned to (section ARRA)
PATCH_PROJECTORS = ('mlp', 'repa')
IMAGE_POS = ('rowcol', 'none')  # 'none': the 1-D rotary alone (the model before image positions, for ablations)

# Body sizes of LlamaGen's GPT family (autoregressive/models/gpt.py GPT_B .. GPT_XXL); 'tiny' is a CPU-sized model.
PRESETS = {
    'tiny': dict(n_layer=4, n_head=4, n_embd=128),
    'B': dict(n_layer=12, n_head=12, n_embd=768),     # LlamaGen GPT-B, 111M
    'L': dict(n_layer=24, n_head=16, n_embd=1024),    # GPT-L, 343M
    'XL': dict(n_layer=36, n_head=20, n_embd=1280),   # GPT-XL, 775M
    'XXL': dict(n_layer=48, n_head=24, n_embd=1536),  # GPT-XXL, 1.4B
}


def preset_config(name, **overrides):
    """GPTConfig with a preset body size; any field can be overridden: preset_config('B', codebook_size=16384)."""
    if name not in PRESETS:
        raise ValueError(f'unknown GPT preset {name!r}; choose one of {list(PRESETS)}')
    return GPTConfig(**{**PRESETS[name], **overrides})


def check_config(c):
    """Raise a ValueError naming the problem for a config the model cannot be built from."""
    problems = []
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
        problems.append(f'n_embd={c.n_embd} must split into n_head={c.n_head} heads of even width (rotary pairs)')
    if c.n_kv_head < 0 or c.n_head % (c.n_kv_head or c.n_head):
        problems.append(f'n_kv_head={c.n_kv_head} must divide n_head={c.n_head} (0 = n_head)')
    if c.rope_llama3 and len(c.rope_llama3) != 4:
        problems.append(f'rope_llama3={c.rope_llama3} must be (factor, low_freq_factor, high_freq_factor, '
                        f'original_max_position_embeddings) or ()')
    if c.text_len < 2:
        problems.append(f'text_len={c.text_len} cannot hold the empty caption [SOT, EOT]; use at least 2')
    for name in ('text_pad_id', 'text_sot_id', 'text_eot_id'):
        if not 0 <= getattr(c, name) < c.text_vocab_size:
            problems.append(f'{name}={getattr(c, name)} is outside the text vocabulary [0, {c.text_vocab_size})')
    if not 1 <= c.align_layer <= c.n_layer:
        problems.append(f'align_layer={c.align_layer} must be in 1..n_layer={c.n_layer}')
    if c.align_positions not in ('hybnext', 'rep'):
        problems.append(f"align_positions={c.align_positions!r} must be 'hybnext' or 'rep'")
    if c.align_target not in ALIGN_TARGETS:
        problems.append(f'align_target={c.align_target!r} must be one of {ALIGN_TARGETS}')
    if c.patch_projector not in PATCH_PROJECTORS:
        problems.append(f'patch_projector={c.patch_projector!r} must be one of {PATCH_PROJECTORS}')
    if c.patch_dim < 0 or c.patch_projector_hidden < 0:
        problems.append('patch_dim and patch_projector_hidden must be >= 0 (0 = no patch projector / the default)')
    if c.teacher_dim < 0 or c.projector_hidden < 0:
        problems.append('teacher_dim and projector_hidden must be >= 0 (0 = no projector / hidden = teacher_dim)')
    if c.image_tokens < 1 or c.codebook_size < 1:
        problems.append('image_tokens and codebook_size must be positive')
    if c.image_width < 1 or c.image_tokens % c.image_width:
        problems.append(f'image_width={c.image_width} must divide image_tokens={c.image_tokens} (a full grid)')
    if c.image_pos not in IMAGE_POS:
        problems.append(f'image_pos={c.image_pos!r} must be one of {IMAGE_POS}')
    if problems:
        raise ValueError('invalid GPTConfig: ' + '; '.join(problems))


# ----------------------------------------------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 (bf16 squares lose precision), cast back to x's dtype."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_angles(head_dim, max_len, base, llama3=()):
    """cos, sin tables (max_len, head_dim/2): position p rotates pair i by p * base^(-2i/head_dim).
    llama3 = (factor, low_freq_factor, high_freq_factor, original_len): Llama 3's rescaling, which slows the
    frequencies whose wavelength exceeds original_len / low_freq_factor by `factor`, keeps those shorter than
    original_len / high_freq_factor, and blends linearly (in original_len / wavelength) in between."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    if llama3:
        factor, low, high, original_len = llama3
        cycles = original_len * inv_freq / (2 * math.pi)            # (hd/2,) turns within the original context
        blend = ((cycles - low) / (high - low)).clamp(0.0, 1.0)     # 0: slow down fully, 1: keep
        inv_freq = inv_freq / factor * (1 - blend) + inv_freq * blend
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)               # (S, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs (x_2i, x_2i+1) of x (B, H, S, hd) by the angles of its positions (cos/sin (S, hd/2)),
    in fp32. q.k then depends only on the distance between the two positions."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                # 2 x (B, H, S, hd/2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)  # (B, H, S, hd/2, 2)
    return out.flatten(-2).type_as(x)                                  # (B, H, S, hd)


class KVCache:
    """One layer's keys and values during generation: full-length tensors allocated at the prefill (with the dtype
    the keys have then, e.g. bf16 under autocast), written in place, read up to the current position."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.k = self.v = None

    def update(self, start, k, v):
        """Store k, v (B, H, S, hd) at positions start..start+S-1; return all keys/values so far (B, H, start+S, hd)."""
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_zeros(B, H, self.max_len, hd)
            self.v = v.new_zeros(B, H, self.max_len, hd)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal self-attention; with n_kv_head < n_head (grouped-query), each key/value head serves n_head / n_kv_head
    consecutive query heads, and the KV cache holds only the n_kv_head heads."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.kv_dim = self.n_kv_head * self.head_dim
        self.dropout = config.dropout
        self.wqkv = nn.Linear(config.n_embd, config.n_embd + 2 * self.kv_dim, bias=False)  # q, k, v in one matmul
        self.wo = nn.Linear(config.n_embd, config.n_embd, bias=False)        # output projection (scaled init)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        B, S, C = x.shape
        q, k, v = self.wqkv(x).split([C, self.kv_dim, self.kv_dim], dim=2)  # (B, S, C), 2 x (B, S, Hkv*hd)
        q = q.view(B, S, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, S, hd)
        k = k.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)                          # (B, Hkv, start+S, hd)
        if self.n_kv_head != self.n_head:                             # query head h reads kv head h // group
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, start+S, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, start+S, hd)
        # mask (B, 1, S, start+S), True = may attend: causal, pad keys removed, the diagonal always kept
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, S, hd)
        y = y.transpose(1, 2).contiguous().view(B, S, C)              # (B, S, C)
        return self.resid_dropout(self.wo(y))


def ffn_hidden_dim(n_embd, multiple_of=256):
    """LlamaGen's SwiGLU width: 2/3 of 4d (so the three matrices cost what a 4d GELU MLP's two do), rounded up to a
    multiple of 256: 2048 for d=768, 2816 for d=1024."""
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config):
        super().__init__()
        hidden = config.ffn_hidden or ffn_hidden_dim(config.n_embd)
        self.w1 = nn.Linear(config.n_embd, hidden, bias=False)  # gate
        self.w3 = nn.Linear(config.n_embd, hidden, bias=False)  # value
        self.w2 = nn.Linear(hidden, config.n_embd, bias=False)  # output projection (scaled init)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))  # (B, S, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(.))."""

    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------------------------
# ARRA (arXiv 2503.07334): the hidden state after block `align_layer` at the aligned positions (`align_positions`:
# every image prediction position, each a "<HYBNEXT>" (nothing is inserted in the sequence), or BOI alone) goes
# through `Projector` and is pulled towards the frozen teacher's global embedding of the target image (width
# `teacher_dim`) by `alignment_loss` = 1 - cos. GPT.forward returns it as out.align_loss; train.py adds
# align_weight x it to the cross-entropy. Training only: sampling never uses the projector.
#
# Patch-wise targets (align_target 'patch' or 'both': REPA's kind of target, as LlamaGen-REPA uses it on an AR model):
# the teacher's patch features resampled to the code grid, one vector g_i per code i (grid row i // w, column i % w),
# stored by the encode step as {split}_teacher_patch.bin (N, T, D_p). Which hidden state answers to g_i: image slot i
# sits at sequence position L + i and reads BOI (i = 0) or code i-1; its output predicts code i (forward scores
# logits[:, i] against codes[:, i]). So the state at L + i, the step about to write code i, is pulled towards code
# i's cell: h[:, L:L+t] pairs with g[:, :t] index by index, no shift. (Pairing g_i with position L + i + 1, the step
# that reads code i, would ask for what that step already sees.) The patch loss is `patch_alignment_loss` =
# 1 - mean_i cos(A_p(h_i), g_i), through a projector of its own (`patch_projector`: the same 2-layer MLP form, or
# 'repa', LlamaGen-REPA's 3-layer SiLU MLP), returned as out.patch_loss; train.py adds patch_weight x it.
# align_positions concerns the global loss only: every position has a patch target. With 'both', each loss keeps its
# own weight and projector; `alignment_objective` is the weighted sum the training step adds to the CE.

class Projector(nn.Module):
    """ARRA's alignment head A: Linear(d, hidden) -> GELU -> Linear(hidden, D), applied to each position separately.
    Trained with the model, discarded after training."""

    def __init__(self, n_embd, hidden, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, h):
        return self.fc2(F.gelu(self.fc1(h)))  # (B, P, d) -> (B, P, D)


class RepaProjector(nn.Module):
    """LlamaGen-REPA's patch projector (REPA's build_mlp): Linear(d, h) -> SiLU -> Linear(h, h) -> SiLU ->
    Linear(h, D), h = 2048 in REPA, applied to each position separately. Training only, like Projector."""

    def __init__(self, n_embd, hidden, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def forward(self, h):
        return self.fc3(F.silu(self.fc2(F.silu(self.fc1(h)))))  # (B, P, d) -> (B, P, D)


def make_patch_projector(config):
    """The patch head of a config: Projector (hidden patch_dim by default) or RepaProjector (hidden 2048)."""
    if config.patch_projector == 'repa':
        return RepaProjector(config.n_embd, config.patch_projector_hidden or 2048, config.patch_dim)
    return Projector(config.n_embd, config.patch_projector_hidden or config.patch_dim, config.patch_dim)


def alignment_loss(projected, target):
    """ARRA's global visual alignment loss: 1 - mean over batch and positions of cos(projected[b, p], target[b]).

    projected (B, P, D): the projector's output at the P aligned positions; target (B, D): the teacher's global
    embedding of each target image (one vector per image, shared by all positions). Both sides are L2-normalised
    here, in fp32. The target is detached: the teacher is frozen, gradients reach only the projector and the GPT.
    0 when every projection points along its target, 1 when orthogonal, 2 when opposite."""
    assert projected.dim() == 3 and target.dim() == 2 and projected.shape[0] == target.shape[0] \
        and projected.shape[2] == target.shape[1], f'projected (B, P, D) vs target (B, D): {tuple(projected.shape)}, ' \
        f'{tuple(target.shape)} (does teacher_dim match the teacher features?)'
    p = F.normalize(projected.float(), dim=-1)                 # (B, P, D)
    t = F.normalize(target.detach().float(), dim=-1)           # (B, D)
    cos = (p * t[:, None, :]).sum(-1)                          # (B, P)
    return 1.0 - cos.mean()  # P is the same for every row, so this is the mean over positions, then over the batch


def patch_alignment_loss(projected, target):
    """REPA's patch-wise loss on an AR model: 1 - mean over batch and positions of cos(projected[b, i], target[b, i]).

    projected (B, t, D): the patch projector's output at the t image prediction positions (position i predicts code
    i); target (B, t, D): the teacher's patch feature at code i's grid cell. fp32, both sides L2-normalised, the
    target detached, as alignment_loss. With target[b, i] = g[b] for every i it is alignment_loss(projected, g)."""
    assert projected.dim() == 3 and projected.shape == target.shape, f'projected (B, t, D) vs patch target ' \
        f'(B, t, D): {tuple(projected.shape)}, {tuple(target.shape)} (does patch_dim match the patch targets?)'
    p = F.normalize(projected.float(), dim=-1)                 # (B, t, D)
    g = F.normalize(target.detach().float(), dim=-1)           # (B, t, D)
    return 1.0 - (p * g).sum(-1).mean()                        # mean of (B, t) cosines


def alignment_objective(out, align_weight, patch_weight):
    """What the training step adds to the CE: align_weight x out.align_loss + patch_weight x out.patch_loss, over
    the terms the forward computed (a scalar 0 when none)."""
    total = out.loss.new_zeros(())
    if out.align_loss is not None and align_weight:
        total = total + align_weight * out.align_loss
    if out.patch_loss is not None and patch_weight:
        total = total + patch_weight * out.patch_loss
    return total


# ----------------------------------------------------------------------------------------------------------------
# masks and sampling

def attention_mask(key_valid, start, q_len):
    """Boolean mask (B, 1, q_len, start+q_len) for queries at positions start..start+q_len-1 over keys 0..start+q_len-1
    (True = may attend): causal, pad keys removed, and each query always sees itself, so a pad query (which has no
    other visible key under left padding) has a non-empty row and no NaN. key_valid: (B, >= start+q_len) bool."""
    n_keys = start + q_len
    q_pos = torch.arange(start, n_keys, device=key_valid.device)  # (q,)
    k_pos = torch.arange(n_keys, device=key_valid.device)         # (k,)
    causal = k_pos[None, :] <= q_pos[:, None]                     # (q, k)
    itself = k_pos[None, :] == q_pos[:, None]                     # (q, k)
    mask = (causal[None] & key_valid[:, None, :n_keys]) | itself[None]  # (B, q, k)
    return mask[:, None]                                          # (B, 1, q, k)


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): divide by temperature, keep the top_k largest, keep the smallest set of
    tokens whose probability mass reaches top_p (nucleus; the most likely token always stays), then draw with
    torch.multinomial and the given generator. temperature=0 is greedy decoding: the argmax, no randomness.
    Returns (B, 1) long."""
    if temperature < 0:
        raise ValueError(f'temperature={temperature} must be >= 0 (0 = greedy)')
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)                              # (B, 1)
    logits = logits.float() / temperature                                    # (B, V)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f'top_k={top_k} must be >= 1 (or None for no top-k filtering)')
        if top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]           # (B, 1)
            logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f'top_p={top_p} must be in (0, 1] (or None for no nucleus filtering)')
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
            probs = sorted_logits.softmax(-1)
            mass_before = probs.cumsum(-1) - probs                          # mass of the strictly more likely tokens
            drop_sorted = mass_before >= top_p                               # the first token is never dropped
            drop = drop_sorted.scatter(-1, order, drop_sorted)               # back to vocabulary order
            logits = logits.masked_fill(drop, float('-inf'))
    probs = logits.softmax(-1)                                               # (B, V)
    return torch.multinomial(probs, 1, generator=generator)                 # (B, 1)


def config_from_checkpoint(model_config):
    """GPTConfig from a checkpoint's plain dict. Checkpoints written before image tokens had positions
    (image_pos) hold weights of another model: refuse them rather than load them into the wrong one."""
    if 'image_pos' not in model_config:
        raise ValueError('this GPT checkpoint was trained before image tokens had 2-D positions (GPTConfig.image_pos) '
                         'and cannot be loaded into the current model: retrain it with `python train.py` '
                         '(the same flags as before)')
    return GPTConfig(**model_config)


class GPTOutput(NamedTuple):
    logits: torch.Tensor                 # (B, T, V) next-code logits at the T image prediction positions
    loss: torch.Tensor                   # scalar cross-entropy over the T image targets
    align_hidden: torch.Tensor           # (B, P, d) hidden states after block align_layer at the aligned positions
    align_loss: Optional[torch.Tensor]   # scalar 1 - cos, when a teacher is given and teacher_dim > 0; else None
    patch_loss: Optional[torch.Tensor] = None  # scalar 1 - mean cos over cells, when patch targets are given


# ----------------------------------------------------------------------------------------------------------------
# the model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        d = config.n_embd
        self.text_embedding = nn.Embedding(config.text_vocab_size, d)
        self.boi = nn.Parameter(torch.zeros(d))                       # begin-of-image input vector, predicts c_0
        self.code_embedding = nn.Embedding(config.codebook_size, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(d, config.norm_eps)
        # No weight tying: the head predicts codes only and LlamaGen keeps separate input and output code tables
        # (its published sizes count both), so the presets compare like with like.
        self.head = nn.Linear(d, config.codebook_size, bias=False)
        self.projector = None  # ARRA: the alignment head, training only (teacher_dim = 0: an inference model)
        self.patch_projector = None  # the patch-wise head (align_target 'patch' / 'both'), training only
        self.grad_checkpoint = False  # train.py --grad_checkpoint: keep block inputs only, recompute in backward
        if config.teacher_dim > 0 and config.align_target != 'patch':
            self.projector = Projector(d, config.projector_hidden or config.teacher_dim, config.teacher_dim)
        if config.patch_dim > 0 and config.align_target != 'global':
            self.patch_projector = make_patch_projector(config)
        # image positions: a learned vector per grid row and per grid column, added to the BOI and code inputs
        if config.image_pos == 'rowcol':
            self.image_row = nn.Parameter(torch.zeros(config.image_tokens // config.image_width, d))  # (h, d)
            self.image_col = nn.Parameter(torch.zeros(config.image_width, d))                        # (w, d)
        # rotary tables for every position of the sequence; not saved (they follow from the config)
        cos, sin = rope_angles(d // config.n_head, config.text_len + config.image_tokens, config.rope_base,
                               config.rope_llama3)
        self.register_buffer('rope_cos', cos, persistent=False)      # (L + T, hd/2)
        self.register_buffer('rope_sin', sin, persistent=False)      # (L + T, hd/2)

        self.apply(self._init_weights)
        nn.init.normal_(self.boi, mean=0.0, std=0.02)
        if config.image_pos == 'rowcol':
            nn.init.normal_(self.image_row, mean=0.0, std=0.02)
            nn.init.normal_(self.image_col, mean=0.0, std=0.02)
        # GPT-2's scaled init: each block adds two residual branches, so their output projections start smaller
        for name, p in self.named_parameters():
            if name.endswith('attention.wo.weight') or name.endswith('feed_forward.w2.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, 'bias', None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, body_only=False):
        """Parameters sampling uses (ARRA's training-only projector is left out). body_only=True: blocks, final norm,
        code embedding and head, what LlamaGen's c2i GPT counts minus its class embedding (our text table and BOI
        play that role), so it compares with LlamaGen's published 111M / 343M / 775M / 1.4B."""
        if body_only:
            parts = [self.blocks, self.norm, self.code_embedding, self.head]
            return sum(p.numel() for m in parts for p in m.parameters())
        proj = {id(p) for head in (self.projector, self.patch_projector) if head is not None for p in head.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in proj)

    def uncond_text(self, batch_size, device=None):
        """The empty caption [PAD .. PAD, SOT, EOT] (batch_size, L): the unconditional prompt for CFG."""
        c = self.config
        row = torch.full((c.text_len,), c.text_pad_id, dtype=torch.long, device=device)
        row[-2], row[-1] = c.text_sot_id, c.text_eot_id
        return row.expand(batch_size, -1)

    def _key_valid(self, text, n_image):
        """(B, L + n_image) bool: False at the text pads, True at the text tokens and the n_image image positions."""
        image = torch.ones(text.shape[0], n_image, dtype=torch.bool, device=text.device)
        return torch.cat([text != self.config.text_pad_id, image], dim=1)

    def _image_positions(self, start, n):
        """(n, d) position vectors of image slots start..start+n-1: slot k predicts code k, which sits at grid row
        k // w and column k % w, so it gets row[k // w] + col[k % w] (0 with image_pos='none')."""
        if self.config.image_pos == 'none':
            return 0.0
        slot = torch.arange(start, start + n, device=self.boi.device)                       # (n,)
        w = self.config.image_width
        return self.image_row[slot // w] + self.image_col[slot % w]                         # (n, d)

    def _embed_image(self, codes_in, first_slot=0):
        """Input vectors of image slots (slot 0 reads BOI, slot k > 0 reads code k-1; slot k predicts code k), plus
        their positions. first_slot == 0: [BOI, codes_in] -> (B, 1 + t, d); else codes_in at slots first_slot.. ->
        (B, t, d) (one decode step)."""
        x = self.code_embedding(codes_in)                                      # (B, t, d)
        if first_slot == 0:
            x = torch.cat([self.boi.view(1, 1, -1).expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + t, d)
        return x + self._image_positions(first_slot, x.shape[1])

    def _embed(self, text, codes_in):
        """[text, BOI, codes_in] -> (B, L + 1 + t, d) input vectors, and key_valid (B, L + 1 + t)."""
        x = torch.cat([self.text_embedding(text), self._embed_image(codes_in)], dim=1)  # (B, L + 1 + t, d)
        return x, self._key_valid(text, 1 + codes_in.shape[1])

    def _run_blocks(self, x, key_valid, start=0, caches=None, capture_layer=None):
        """Blocks over x (B, S, d) sitting at positions start..start+S-1; returns the final-normed hidden states
        (B, S, d) and the raw hidden state after block `capture_layer` (or None)."""
        S = x.shape[1]
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]  # (S, hd/2)
        mask = attention_mask(key_valid, start, S)                                 # (B, 1, S, start+S)
        x = self.drop(x)
        captured = None
        for i, block in enumerate(self.blocks):
            if self.grad_checkpoint and self.training and caches is None:  # the same numbers, dropout included
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, start, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, None if caches is None else caches[i], start)
            if i + 1 == capture_layer:
                captured = x
        return self.norm(x), captured

    def forward(self, text, codes, teacher=None, teacher_patch=None):
        """text (B, L) long, left-padded BPE ids; codes (B, t) long, the image's codes (t = T in training; a
        shorter prefix also works); teacher (B, D) float or None; teacher_patch (B, T, D_p) float or None, the patch
        targets on the code grid. Inputs are [text, BOI, codes[:, :-1]], targets codes. Returns GPTOutput(logits
        (B, t, V), loss, align_hidden (B, P, d), align_loss or None, patch_loss or None)."""
        B, L, t = text.shape[0], self.config.text_len, codes.shape[1]
        assert text.shape == (B, L) and text.dtype == torch.long, f'text (B, {L}) long, got {tuple(text.shape)}'
        assert codes.shape[0] == B and 1 <= t <= self.config.image_tokens, f'codes (B, t<=T), got {codes.shape}'
        x, key_valid = self._embed(text, codes[:, :-1])                    # (B, L + t, d)
        h, h_align = self._run_blocks(x, key_valid, capture_layer=self.config.align_layer)
        logits = self.head(h[:, L:])                                       # (B, t, V): image positions only
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        # ARRA: the hidden state after block align_layer at the aligned positions, pulled towards the teacher's
        # embedding of the target image through the projector (1 - cos)
        n_align = t if self.config.align_positions == 'hybnext' else 1
        align_hidden = h_align[:, L:L + n_align]                           # (B, P, d): BOI .. c_{t-2}, or BOI
        align_loss = None
        if teacher is not None:
            assert self.projector is not None, 'a teacher was passed to a model without projector (teacher_dim=0)'
            align_loss = alignment_loss(self.projector(align_hidden), teacher)  # scalar 1 - cos
        # patch-wise: position L + i predicts code i, so it is pulled towards code i's cell (section ARRA)
        patch_loss = None
        if teacher_patch is not None:
            assert self.patch_projector is not None, 'patch targets were passed to a model without patch projector ' \
                "(align_target='global' or patch_dim=0)"
            patch_loss = patch_alignment_loss(self.patch_projector(h_align[:, L:L + t]),    # (B, t, D_p)
                                              teacher_patch[:, :t])                         # scalar
        return GPTOutput(logits, loss, align_hidden, align_loss, patch_loss)

    @torch.no_grad()
    def generate(self, text, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True):
        """Sample T image codes per prompt. text (B, L) long -> codes (B, T) long.

        cfg_scale != 1: the empty-caption rows are appended ([cond; uncond], 2B rows in one batch), logits are mixed
        u + s * (c - u), and the token sampled from the mix is fed to both halves. cfg_scale == 1 runs the
        conditional rows alone. use_cache=True: one prefill over [text, BOI], then one token per step through the
        static KV cache; use_cache=False recomputes the whole sequence every step (slow; the reference the cache is
        tested against). Runs in eval mode (no dropout) and restores the previous mode. No projector: sampling is
        the base model's whatever ARRA did in training."""
        B, L = text.shape
        assert L == self.config.text_len and text.dtype == torch.long, f'text (B, {self.config.text_len}) long'
        T = self.config.image_tokens
        guided = cfg_scale != 1.0
        rows = torch.cat([text, self.uncond_text(B, text.device)]) if guided else text  # (B or 2B, L)
        key_valid = self._key_valid(rows, T)                                            # (R, L + T)
        codes = text.new_zeros(B, 0)
        caches = [KVCache(L + T) for _ in self.blocks] if use_cache else None
        was_training = self.training
        self.eval()
        try:
            for i in range(T):
                if not use_cache:                       # full recompute: [text, BOI, c_0 .. c_{i-1}]
                    fed = torch.cat([codes, codes]) if guided else codes
                    x, _ = self._embed(rows, fed)       # (R, L + 1 + i, d)
                    h, _ = self._run_blocks(x, key_valid[:, :L + 1 + i])
                elif i == 0:                            # prefill: [text, BOI] at positions 0..L
                    x, _ = self._embed(rows, rows[:, :0])
                    h, _ = self._run_blocks(x, key_valid, start=0, caches=caches)
                else:                                   # decode: c_{i-1} at position L + i
                    fed = torch.cat([token, token]) if guided else token   # the same token for both halves
                    x = self._embed_image(fed, first_slot=i)               # (R, 1, d): slot i
                    h, _ = self._run_blocks(x, key_valid, start=L + i, caches=caches)
                logits = self.head(h[:, -1])                               # (R, V): last position only
                if guided:
                    cond, uncond = logits.float().chunk(2)                  # 2 x (B, V)
                    logits = uncond + cfg_scale * (cond - uncond)
                token = sample_from_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
                codes = torch.cat([codes, token], dim=1)                    # (B, i + 1)
        finally:
            self.train(was_training)
        return codes

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices and embeddings (dim >= 2) and none on norms, biases and the BOI vector.
        Frozen parameters (requires_grad=False) are left out. Fused kernels only on CUDA, where supported."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.dim() >= 2]
        no_decay = [p for n, p in params if p.dim() < 2]
        groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
        use_fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        print(f'optimizer: {len(decay)} decayed tensors ({sum(p.numel() for p in decay):,} parameters), '
              f'{len(no_decay)} non-decayed ({sum(p.numel() for p in no_decay):,} parameters); fused: {use_fused}')
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if use_fused else {}))

    def flops_per_sequence(self):
        """Training FLOPs (forward + backward) for one example, PaLM/nanoGPT style: 6 FLOPs per weight per token
        that passes through it (blocks: all S = L + T positions; head: the T image positions; projector: the
        aligned positions; patch projector: the T image positions), plus 12 * n_layer * n_head * head_dim * S per
        token for the attention scores and mixing, counted over the full (not causally halved) S x S matrix.
        Embedding lookups cost nothing."""
        c = self.config
        S, T = c.text_len + c.image_tokens, c.image_tokens
        n_blocks = sum(p.numel() for p in self.blocks.parameters())
        flops = 6 * n_blocks * S + 6 * self.head.weight.numel() * T
        if self.projector is not None:  # ARRA's projector at the aligned positions
            P = T if c.align_positions == 'hybnext' else 1
            flops += 6 * sum(p.numel() for p in self.projector.parameters()) * P
        if self.patch_projector is not None:  # the patch head at every image position
            flops += 6 * sum(p.numel() for p in self.patch_projector.parameters()) * T
        flops += 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * S * S
        return flops

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s (fwdbwd_per_iter sequences in dt seconds) over peak_flops, the
        peak FLOP/s of the hardware, measured or from its datasheet, for the precision in use."""
        return self.flops_per_sequence() * fwdbwd_per_iter / dt / peak_flops
