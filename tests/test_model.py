"""Tests for model.py: causality, pad-length invariance, KV cache vs full recompute, CFG, the ARRA alignment pieces,
training on a memorised batch, preset sizes against LlamaGen, optimizer groups and the FLOP count. CPU, tiny
configs, a few seconds in all."""
import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import GPT, GPTConfig, Projector, alignment_loss, preset_config, sample_from_logits, ffn_hidden_dim, \
    IMAGE_POS

# a tiny text vocabulary keeps the text table small; the ids follow the real layout [PAD.., SOT, .., EOT]
PAD, SOT, EOT = 63, 61, 62
TINY = dict(n_layer=2, n_head=2, n_embd=32, codebook_size=32, image_tokens=12, image_width=4, text_len=8,
            text_vocab_size=64, text_pad_id=PAD, text_sot_id=SOT, text_eot_id=EOT)


def make_model(seed=0, sharpen=True, **overrides):
    """A tiny GPT. sharpen=True re-draws the weights much larger than the 0.02 init so the logits are far from
    uniform: otherwise a wrong cache or mask would change the logits too little to change a sampled token."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**TINY, **overrides}))
    if sharpen:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.3)
                else:
                    p.normal_(1.0, 0.2)
    return m.eval()


def prompt(token_lists, text_len):
    """Left-padded (B, text_len) prompts: [PAD.., SOT, tokens.., EOT]."""
    out = torch.full((len(token_lists), text_len), PAD, dtype=torch.long)
    for i, toks in enumerate(token_lists):
        ids = [SOT] + list(toks) + [EOT]
        out[i, text_len - len(ids):] = torch.tensor(ids)
    return out


def random_codes(B, cfg, seed=1):
    return torch.randint(0, cfg.codebook_size, (B, cfg.image_tokens), generator=torch.Generator().manual_seed(seed))


class LogitRecorder:
    """Stands in for model.sample_from_logits inside generate: records the logits each step samples from."""

    def __init__(self):
        self.logits = []

    def __call__(self, logits, *args, **kwargs):
        self.logits.append(logits.detach().clone())
        return sample_from_logits(logits, *args, **kwargs)


def test_forward_returns_logits_and_aligned_states_of_the_documented_shapes():
    """The training loop and the loss read these shapes: (B, T, V) logits, (B, P, d) aligned states, scalar losses."""
    m = make_model(teacher_dim=24)
    c = m.config
    out = m(prompt([[1, 2, 3], [4]], c.text_len), random_codes(2, c), teacher=torch.randn(2, 24))
    assert out.logits.shape == (2, c.image_tokens, c.codebook_size)
    assert out.align_hidden.shape == (2, c.image_tokens, c.n_embd)
    assert out.loss.dim() == 0 and out.align_loss.dim() == 0


def test_loss_is_cross_entropy_of_the_logits_against_the_codes():
    """out.loss must be exactly next-code CE over the T image targets (text is never a target)."""
    m = make_model()
    c = m.config
    codes = random_codes(2, c)
    out = m(prompt([[1, 2, 3], [4]], c.text_len), codes)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, c.codebook_size), codes.reshape(-1)))


def test_no_teacher_means_no_alignment_loss():
    """Inference and eval without teacher features must not need a projector or a target."""
    m = make_model(teacher_dim=24)
    assert m(prompt([[1]], m.config.text_len), random_codes(1, m.config)).align_loss is None


def test_a_teacher_for_a_model_without_projector_is_refused():
    """teacher_dim=0 builds no projector; passing features anyway is a caller bug, caught at once."""
    m = make_model()
    with pytest.raises(AssertionError, match='teacher_dim=0'):
        m(prompt([[1]], m.config.text_len), random_codes(1, m.config), teacher=torch.randn(1, 24))


def test_text_of_another_length_is_refused():
    """The rotary tables and masks are sized for text_len: other text would be silently misplaced."""
    m = make_model()
    with pytest.raises(AssertionError, match='text'):
        m(prompt([[1]], 10), random_codes(1, m.config))


def test_config_rejects_an_align_layer_beyond_the_model():
    """A config error names the field and the fix before any weight is built."""
    with pytest.raises(ValueError, match='align_layer'):
        GPT(GPTConfig(**{**TINY, 'align_layer': 3}))


def test_causality():
    """Logits at image position i may depend only on codes before i, and on the prompt: what autoregression needs."""
    m = make_model()
    c = m.config
    text, codes = prompt([[1, 2, 3], [4, 5]], c.text_len), random_codes(2, c)
    base = m(text, codes).logits
    for j in (0, 5, c.image_tokens - 2):
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 1) % c.codebook_size
        logits = m(text, changed).logits
        # logits[:, i] predicts code i from codes < i: changing code j leaves positions 0..j untouched
        torch.testing.assert_close(logits[:, :j + 1], base[:, :j + 1], rtol=0, atol=0)
        assert (logits[:, j + 1] - base[:, j + 1]).abs().max() > 1e-3
    # and the prompt does condition the image
    assert (m(prompt([[7, 8, 9], [4, 5]], c.text_len), codes).logits[0] - base[0]).abs().max() > 1e-3


def test_pad_length_invariance():
    """Left padding must not change any output: the same prompt with more pads (a longer text_len), another row in
    the batch, or guided sampling (whose empty captions also differ in pad count) give the same numbers."""
    short = make_model(text_len=8)
    long = make_model(text_len=13)
    long.load_state_dict(short.state_dict(), strict=True)  # no weight depends on text_len
    c = short.config
    toks = [[5, 9, 17], [3]]
    codes = random_codes(2, c)
    a, b = short(prompt(toks, 8), codes), long(prompt(toks, 13), codes)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    # the residual stream (|h| ~ 30): the rotary angles of other absolute positions round differently in fp32
    torch.testing.assert_close(a.align_hidden, b.align_hidden, rtol=1e-5, atol=5e-5)
    # each row is also independent of what else is in the batch (and of that row's pad count)
    alone = short(prompt(toks[1:], 8), codes[1:]).logits
    torch.testing.assert_close(alone, a.logits[1:], rtol=0, atol=1e-5)
    # and so is sampling, guided rows (whose empty captions also differ in pad count) included
    gen = lambda m, L: m.generate(prompt(toks, L), cfg_scale=2.5, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(gen(short, 8), gen(long, 13))


def test_pad_positions_stay_finite():
    """A pad query sees only itself, so no attention row is empty and no NaN reaches any block output."""
    m = make_model()
    seen = []
    hooks = [blk.register_forward_hook(lambda mod, inp, out: seen.append(out)) for blk in m.blocks]
    m(prompt([[1]], m.config.text_len), random_codes(1, m.config))  # 5 pad positions attend only to themselves
    for h in hooks:
        h.remove()
    assert len(seen) == m.config.n_layer and all(torch.isfinite(s).all() for s in seen)


def test_attention_mask_rows():
    """The mask is causal, hides pad keys from real queries, keeps the diagonal, and a decode step's row is the last
    row of the full mask (what makes the KV cache equal to recomputation)."""
    m = make_model()
    text = prompt([[1, 2, 3], [4]], m.config.text_len)  # 3 and 5 left pads
    key_valid = m._key_valid(text, 2)                   # (2, L + 2)
    mask = model_module.attention_mask(key_valid, 0, key_valid.shape[1])[:, 0]  # (B, S, S)
    S = key_valid.shape[1]
    assert mask.shape == (2, S, S) and not mask.triu(1).any()                     # causal
    for b, n_pad in enumerate((3, 5)):
        # a pad query sees itself only (no empty row, so no NaN on any kernel); pad keys are invisible to the rest
        assert torch.equal(mask[b, :n_pad, :n_pad], torch.eye(n_pad, dtype=torch.bool))
        assert not mask[b, n_pad:, :n_pad].any()
        assert torch.equal(mask[b, n_pad:, n_pad:], torch.ones(S - n_pad, S - n_pad, dtype=torch.bool).tril())
    # a one-query decode step gets the last row of the full mask
    step = model_module.attention_mask(key_valid, S - 1, 1)[:, 0]                   # (B, 1, S)
    assert torch.equal(step[:, 0], mask[:, -1])


@pytest.mark.parametrize('cfg_scale,top_k,top_p', [(1.0, None, None), (3.0, None, None), (1.0, 10, 0.9),
                                                   (2.0, 8, 0.8)])
def test_kv_cache_equals_full_recompute(monkeypatch, cfg_scale, top_k, top_p):
    """The cached path is an optimisation only: same logits at every step, same codes, with and without guidance."""
    m = make_model()
    text = prompt([[1, 2, 3, 4], [5], [6, 7]], m.config.text_len)
    runs = {}
    for use_cache in (True, False):
        rec = LogitRecorder()
        monkeypatch.setattr(model_module, 'sample_from_logits', rec)
        codes = m.generate(text, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                           generator=torch.Generator().manual_seed(11), use_cache=use_cache)
        runs[use_cache] = codes, torch.stack(rec.logits)
    assert runs[True][0].shape == (3, m.config.image_tokens)
    assert torch.equal(runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=0, atol=1e-4)


@pytest.mark.parametrize('cfg_scale', [1.0, 4.0])
def test_generate_matches_a_sampling_loop_over_forward(monkeypatch, cfg_scale):
    """Reference sampler built only from forward(): at step i the mixed logits are u + s (c - u), with c from the
    prompt and u from the empty caption; at s = 1 that is the conditional distribution alone."""
    m = make_model()
    c = m.config
    text = prompt([[1, 2, 3], [9, 9]], c.text_len)
    empty = m.uncond_text(2)
    assert empty[0].tolist() == [PAD] * (c.text_len - 2) + [SOT, EOT]

    rec = LogitRecorder()
    monkeypatch.setattr(model_module, 'sample_from_logits', rec)
    got = m.generate(text, cfg_scale=cfg_scale, top_k=16, generator=torch.Generator().manual_seed(5))

    gen = torch.Generator().manual_seed(5)
    codes = torch.zeros(2, 0, dtype=torch.long)
    for i in range(c.image_tokens):
        padded = torch.cat([codes, codes.new_zeros(2, 1)], 1)  # the last code is only a target: its value is unused
        with torch.no_grad():
            cond = m(text, padded).logits[:, i]
            mixed = cond
            if cfg_scale != 1.0:
                uncond = m(empty, padded).logits[:, i]
                mixed = uncond + cfg_scale * (cond - uncond)
        torch.testing.assert_close(rec.logits[i], mixed, rtol=0, atol=1e-4)
        codes = torch.cat([codes, sample_from_logits(mixed, 1.0, 16, None, gen)], 1)
    assert torch.equal(got, codes)


def test_generate_is_seeded():
    """The generator alone decides the draws: the same seed repeats the codes, another seed changes them."""
    m = make_model()
    text = prompt([[1, 2], [3]], m.config.text_len)
    run = lambda seed: m.generate(text, cfg_scale=2.0, top_p=0.95, generator=torch.Generator().manual_seed(seed))
    a, b, other = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    assert a.dtype == torch.long and a.min() >= 0 and a.max() < m.config.codebook_size


def test_generate_runs_without_dropout_and_restores_mode():
    """Sampling a model in train mode (as train.py's eval grid does) must not apply dropout nor leave eval mode on."""
    m = make_model(dropout=0.5).train()
    c = m.config
    text, codes = prompt([[1, 2]], c.text_len), random_codes(1, c)
    assert not torch.equal(m(text, codes).logits, m(text, codes).logits)  # dropout is live in train mode
    run = lambda: m.generate(text, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(), run())
    assert m.training


@pytest.mark.parametrize('align_layer,positions', [(1, 'hybnext'), (2, 'hybnext'), (1, 'rep'), (3, 'rep')])
def test_align_hidden_comes_from_configured_layer_and_positions(align_layer, positions):
    """ARRA aligns the output of block align_layer at BOI .. c_{T-2} (hybnext) or BOI alone (rep), nothing else."""
    m = make_model(n_layer=3, align_layer=align_layer, align_positions=positions)
    c = m.config
    outputs = {}
    hooks = [blk.register_forward_hook(lambda mod, inp, out, k=k: outputs.__setitem__(k, out))
             for k, blk in enumerate(m.blocks, start=1)]
    out = m(prompt([[1, 2, 3], [4]], c.text_len), random_codes(2, c))
    for h in hooks:
        h.remove()
    P = c.image_tokens if positions == 'hybnext' else 1
    L = c.text_len  # position L is BOI, then c_0 .. c_{T-2}
    assert out.align_hidden.shape == (2, P, c.n_embd)
    torch.testing.assert_close(out.align_hidden, outputs[align_layer][:, L:L + P], rtol=0, atol=0)
    for k, h in outputs.items():
        if k != align_layer:
            assert (h[:, L:L + P] - out.align_hidden).abs().max() > 1e-3


def test_alignment_loss_is_zero_along_the_target_whatever_the_length():
    """1 - cos ignores the projection's length: a projection along the teacher vector costs nothing."""
    target = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    scales = torch.rand(3, 5, 1, generator=torch.Generator().manual_seed(1)) * 10 + 0.1
    assert alignment_loss(target[:, None, :] * scales, target).abs() < 1e-6


def test_alignment_loss_is_two_when_opposite_and_one_when_orthogonal():
    """The loss spans [0, 2] like 1 - cos: 2 for the opposite direction, 1 for an orthogonal one."""
    target = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assert abs(alignment_loss(-target[:, None, :].expand(3, 5, 16), target).item() - 2.0) < 1e-6
    ortho = torch.zeros(2, 4, 2)
    ortho[..., 1] = 1.0
    assert abs(alignment_loss(ortho, torch.tensor([[3.0, 0.0], [0.5, 0.0]])).item() - 1.0) < 1e-6


def test_alignment_loss_is_one_minus_the_mean_cosine():
    """Against torch's cosine_similarity, averaged over positions and then over the batch (the paper's formula)."""
    torch.manual_seed(0)
    projected, target = torch.randn(3, 5, 16), torch.randn(3, 16)
    ref = 1 - torch.stack([F.cosine_similarity(projected[b], target[b][None], dim=-1).mean() for b in range(3)]).mean()
    torch.testing.assert_close(alignment_loss(projected, target), ref)


def test_alignment_loss_refuses_a_teacher_of_another_width():
    """A teacher_dim that does not match the prepared features is a setup bug and must not broadcast silently."""
    with pytest.raises(AssertionError, match='teacher_dim'):
        alignment_loss(torch.randn(3, 5, 16), torch.randn(3, 8))


def patch_pair(projector='mlp', **overrides):
    """A 'global' model and a 'patch' model with the same body, the patch head a copy of the global projector, and a
    batch: (global model, patch model, text, codes)."""
    g = make_model(sharpen=False, teacher_dim=24, **overrides)
    p = make_model(sharpen=False, teacher_dim=0, align_target='patch', patch_dim=24, patch_projector=projector,
                   **overrides)
    p.load_state_dict({k.replace('projector.', 'patch_projector.'): v for k, v in g.state_dict().items()}, strict=True)
    c = g.config
    return g, p, prompt([[1, 2, 3], [4]], c.text_len), random_codes(2, c)


def test_patch_loss_with_the_global_target_in_every_cell_is_the_global_loss():
    """align_target='patch' with g_i = the global embedding at every cell is ARRA's global loss (same projector)."""
    g, p, text, codes = patch_pair()
    teacher = torch.randn(2, 24)
    cells = teacher[:, None, :].expand(2, g.config.image_tokens, 24)          # (B, T, D): one vector everywhere
    a, b = g(text, codes, teacher=teacher), p(text, codes, teacher_patch=cells)
    assert b.align_loss is None and a.patch_loss is None
    torch.testing.assert_close(b.patch_loss, a.align_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)                 # the CE does not see the targets


def test_patch_loss_pairs_position_i_with_code_i_and_sees_a_permutation_the_global_loss_does_not():
    """Permuting the patch targets over positions changes the patch loss; the global loss, one vector for every
    position, has nothing to permute. And the pairing is exact: position i (which predicts code i) against cell i,
    checked against the cosines computed by hand from align_hidden."""
    g, p, text, codes = patch_pair()
    T = g.config.image_tokens
    cells = torch.randn(2, T, 24)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(0))
    out = p(text, codes, teacher_patch=cells)
    shuffled = p(text, codes, teacher_patch=cells[:, perm])
    assert abs(out.patch_loss.item() - shuffled.patch_loss.item()) > 1e-3
    # the global loss pairs every position with the same vector: a permutation of positions leaves it as it is
    teacher = torch.randn(2, 24)
    glob = g(text, codes, teacher=teacher)
    torch.testing.assert_close(alignment_loss(g.projector(glob.align_hidden[:, perm]), teacher), glob.align_loss)
    by_hand = 1 - F.cosine_similarity(p.patch_projector(out.align_hidden), cells, dim=-1).mean()  # (B, T) pairs
    torch.testing.assert_close(out.patch_loss, by_hand, rtol=1e-5, atol=1e-6)


def test_patch_loss_of_a_prefix_uses_the_prefix_cells():
    """A shorter code prefix (t < T) aligns positions 0..t-1 with cells 0..t-1 only."""
    _, p, text, codes = patch_pair()
    cells = torch.randn(2, p.config.image_tokens, 24)
    t = 5
    out = p(text, codes[:, :t], teacher_patch=cells)
    by_hand = 1 - F.cosine_similarity(p.patch_projector(out.align_hidden[:, :t]), cells[:, :t], dim=-1).mean()
    torch.testing.assert_close(out.patch_loss, by_hand, rtol=1e-5, atol=1e-6)


def test_both_is_the_weighted_sum_of_the_two_losses_with_two_projectors():
    """align_target='both': two heads; the objective is align_weight x global + patch_weight x patch, each equal to
    what a one-target model with that head computes."""
    from model import alignment_objective
    torch.manual_seed(0)
    m = make_model(sharpen=False, teacher_dim=24, align_target='both', patch_dim=16, patch_projector='repa',
                   patch_projector_hidden=40)
    assert isinstance(m.projector, Projector) and isinstance(m.patch_projector, model_module.RepaProjector)
    assert m.patch_projector.fc2.in_features == 40 and m.patch_projector.fc3.out_features == 16
    c = m.config
    text, codes = prompt([[1, 2, 3], [4]], c.text_len), random_codes(2, c)
    teacher, cells = torch.randn(2, 24), torch.randn(2, c.image_tokens, 16)
    out = m(text, codes, teacher, cells)
    glob = make_model(sharpen=False, teacher_dim=24)
    glob.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith('patch_projector.')})
    patch = make_model(sharpen=False, align_target='patch', patch_dim=16, patch_projector='repa',
                       patch_projector_hidden=40)
    patch.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith('projector.')})
    a, b = glob(text, codes, teacher=teacher).align_loss, patch(text, codes, teacher_patch=cells).patch_loss
    torch.testing.assert_close(out.align_loss, a, rtol=0, atol=0)
    torch.testing.assert_close(out.patch_loss, b, rtol=0, atol=0)
    torch.testing.assert_close(alignment_objective(out, 1.0, 0.5), a + 0.5 * b)
    torch.testing.assert_close(alignment_objective(out, 0.0, 0.5), 0.5 * b)
    # both heads train and are left out of the sampling parameter count
    alignment_objective(out, 1.0, 0.5).backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in m.patch_projector.parameters())
    assert all(q.grad is not None for q in m.projector.parameters())
    heads = sum(q.numel() for h in (m.projector, m.patch_projector) for q in h.parameters())
    assert m.num_params() == sum(q.numel() for q in m.parameters()) - heads


def test_patch_targets_for_a_model_without_patch_head_are_refused_and_configs_checked():
    m = make_model(teacher_dim=24)
    with pytest.raises(AssertionError, match='patch projector'):
        m(prompt([[1]], m.config.text_len), random_codes(1, m.config), teacher_patch=torch.randn(1, 12, 24))
    for bad in (dict(align_target='cells'), dict(patch_projector='mlp3'), dict(patch_dim=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GPT(GPTConfig(**{**TINY, **bad}))
    assert make_model(teacher_dim=24, align_target='patch', patch_dim=8).projector is None  # no unused global head


@pytest.mark.parametrize('target', ['patch', 'both'])
def test_patch_heads_keep_the_pad_and_cache_guarantees(target):
    """A model with a patch head still gives pad-invariant logits and cached sampling equal to full recompute."""
    short = make_model(text_len=8, teacher_dim=24, align_target=target, patch_dim=16)
    long = make_model(text_len=13, teacher_dim=24, align_target=target, patch_dim=16)
    long.load_state_dict(short.state_dict(), strict=True)
    toks, codes, cells = [[5, 9, 17], [3]], random_codes(2, short.config), torch.randn(2, 12, 16)
    a = short(prompt(toks, 8), codes, teacher_patch=cells)
    b = long(prompt(toks, 13), codes, teacher_patch=cells)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.patch_loss, b.patch_loss, rtol=1e-5, atol=1e-6)
    text = prompt(toks, 8)
    run = lambda use_cache: short.generate(text, cfg_scale=2.0, top_k=20, use_cache=use_cache,  # noqa: E731
                                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(run(True), run(False))


def test_alignment_gradients_reach_projector_and_early_blocks_only():
    """The alignment term trains the projector and the blocks up to align_layer; the teacher is a fixed target and
    later blocks and the head do not feed the aligned state."""
    m = make_model(sharpen=False, n_layer=3, align_layer=2, teacher_dim=24, projector_hidden=40)
    assert isinstance(m.projector, Projector) and m.projector.fc1.out_features == 40
    c = m.config
    teacher = torch.randn(2, 24, requires_grad=True)
    out = m(prompt([[1, 2], [3]], c.text_len), random_codes(2, c), teacher=teacher)
    out.align_loss.backward()
    assert teacher.grad is None                               # the teacher is a fixed target
    for p in m.projector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for k, blk in enumerate(m.blocks, start=1):
        grads = [p.grad for p in blk.parameters()]
        if k <= c.align_layer:
            assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        else:
            assert all(g is None for g in grads)              # later blocks do not feed the aligned state
    assert m.head.weight.grad is None and m.code_embedding.weight.grad.abs().sum() > 0


def test_loss_drops_on_memorised_batch():
    """CE + alignment can be optimised jointly: both fall far on a batch seen 60 times."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY, teacher_dim=16)).train()
    c = m.config
    text, codes = prompt([[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]], c.text_len), random_codes(4, c)
    teacher = F.normalize(torch.randn(4, 16), dim=-1)
    opt = m.configure_optimizers(weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.95), device_type='cpu')
    first = None
    for step in range(60):
        out = m(text, codes, teacher=teacher)
        if first is None:
            first = out
        opt.zero_grad(set_to_none=True)
        (out.loss + out.align_loss).backward()
        opt.step()
    assert abs(first.loss.item() - math.log(c.codebook_size)) < 0.1  # starts near uniform
    assert out.loss.item() < 0.3 * first.loss.item()
    assert out.align_loss.item() < 0.3 * first.align_loss.item()


# LlamaGen's published sizes (README / paper) for its c2i GPT family, 16384 codes, 16x16 tokens
LLAMAGEN_SIZES = {'B': 111e6, 'L': 343e6, 'XL': 775e6, 'XXL': 1.4e9}


@pytest.mark.parametrize('name', list(LLAMAGEN_SIZES))
def test_preset_body_counts_match_llamagen(name):
    """The presets are LlamaGen's GPT-B/L/XL/XXL: body counts within 2% of its published sizes."""
    with torch.device('meta'):  # shapes only: no memory, no init time
        m = GPT(preset_config(name, codebook_size=16384, image_tokens=256))
    body = m.num_params(body_only=True)
    assert abs(body / LLAMAGEN_SIZES[name] - 1) < 0.02, f'{name}: {body / 1e6:.1f}M'


def test_body_param_count_matches_the_formula():
    """num_params(body_only=True) counts blocks, final norm, code embedding and head, computed here by hand."""
    c = GPTConfig(**TINY, teacher_dim=24)
    d, h, V = c.n_embd, ffn_hidden_dim(c.n_embd), c.codebook_size
    per_block = 4 * d * d + 3 * d * h + 2 * d          # wqkv + wo, w1 w2 w3, two norm weights
    assert GPT(c).num_params(body_only=True) == c.n_layer * per_block + d + 2 * V * d


def test_param_count_leaves_out_the_projector():
    """num_params() is what sampling uses: body, text table, BOI and image positions; the training-only projector
    is not in it."""
    c = GPTConfig(**TINY, teacher_dim=24)
    m, d = GPT(c), c.n_embd
    positions = (c.image_tokens // c.image_width + c.image_width) * d                     # row + column tables
    assert m.num_params() == m.num_params(body_only=True) + c.text_vocab_size * d + d + positions
    assert sum(p.numel() for p in m.parameters()) == m.num_params() + (d * 24 + 24) + (24 * 24 + 24)


def test_ffn_width_is_llamagens():
    """SwiGLU width 2/3 of 4d rounded up to 256: 2048 for d=768 and 2816 for d=1024, as LlamaGen's GPT-B and L."""
    assert ffn_hidden_dim(768) == 2048 and ffn_hidden_dim(1024) == 2816


def test_unknown_preset_is_a_clear_error():
    """A typo in --model must name the valid presets."""
    with pytest.raises(ValueError, match='unknown GPT preset'):
        preset_config('M')


def test_configure_optimizers_groups(capsys):
    """Decay on matrices only, and a frozen projector (the align_weight=0 baseline) is not in the optimizer."""
    m = make_model(sharpen=False, teacher_dim=24)
    m.projector.requires_grad_(False)                 # the align_weight=0 baseline freezes it
    opt = m.configure_optimizers(weight_decay=0.05, learning_rate=1e-4, betas=(0.9, 0.95), device_type='cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decay['params']) and all(p.dim() < 2 for p in no_decay['params'])
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert in_opt == trainable and not any(id(p) in in_opt for p in m.projector.parameters())
    assert not opt.defaults.get('fused')
    assert 'decayed' in capsys.readouterr().out


def test_flops_estimate_matches_counted_flops():
    """The analytic FLOP count behind MFU agrees with torch's counter on a forward + backward within 5%."""
    from torch.utils.flop_counter import FlopCounterMode
    m = make_model(sharpen=False, teacher_dim=24).train()
    c = m.config
    with FlopCounterMode(display=False) as counter:
        out = m(prompt([[1, 2]], c.text_len), random_codes(1, c), teacher=torch.randn(1, 24))
        (out.loss + out.align_loss).backward()
    counted, estimated = counter.get_total_flops(), m.flops_per_sequence()
    assert abs(estimated / counted - 1) < 0.05, (estimated, counted)
    assert m.estimate_mfu(fwdbwd_per_iter=8, dt=2.0, peak_flops=1e9) == pytest.approx(estimated * 8 / 2.0 / 1e9)


LOGITS = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(4000, 4)


def draw(**kw):
    return set(sample_from_logits(LOGITS, generator=torch.Generator().manual_seed(0), **kw).flatten().tolist())


def test_top_k_keeps_the_k_most_likely_codes():
    """top_k=k draws only among the k largest logits."""
    assert draw(top_k=1) == {1} and draw(top_k=2) == {1, 3} and draw() == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    """The nucleus stops as soon as its mass reaches top_p, and the most likely code always stays."""
    assert draw(top_p=0.8) == {1, 3}          # 0.5 + 0.3 reaches 0.8: the nucleus stops there
    assert draw(top_p=0.81) == {1, 3, 2}
    assert draw(top_p=0.01) == {1}


def test_a_high_temperature_flattens_the_distribution():
    """Dividing the logits by a large temperature makes all codes nearly equally likely."""
    counts = torch.bincount(sample_from_logits(LOGITS, temperature=100.0, generator=torch.Generator().manual_seed(0))
                            .flatten(), minlength=4)
    assert counts.min() > 800


def test_an_empty_nucleus_is_refused():
    """top_p=0 would keep nothing: a clear error instead of a crash inside multinomial."""
    with pytest.raises(ValueError, match='top_p'):
        sample_from_logits(LOGITS, top_p=0.0)


@pytest.mark.parametrize('heads', [dict(), dict(align_target='both', patch_dim=20, patch_projector='repa',
                                                patch_projector_hidden=48)])
def test_generate_gives_identical_codes_with_the_projector_deleted(heads):
    """ARRA's claim: inference is the base model's. A model whose (large, random) projectors (the global one, and the
    patch one with align_target='both') are removed, rebuilt as teacher_dim=0 from the same weights, samples exactly
    the same codes, so generate never touches a projector."""
    m = make_model(teacher_dim=24, **heads)
    assert (m.patch_projector is not None) == bool(heads)
    with torch.no_grad():
        for head in (m.projector, m.patch_projector):
            for p in head.parameters() if head is not None else ():
                p.normal_(0.0, 10.0)              # any use of a projector would now change the logits a lot
    base = GPT(GPTConfig(**TINY))
    heads = ('projector.', 'patch_projector.')
    base.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith(heads)}, strict=True)
    text = prompt([[1, 2, 3], [4]], m.config.text_len)
    run = lambda model: model.generate(text, cfg_scale=2.0, generator=torch.Generator().manual_seed(7))  # noqa: E731
    assert torch.equal(run(m), run(base.eval()))


# ----------------------------------------------------------------------------------------------------------------
# image positions and greedy decoding

def position_task_loss(image_pos, steps=100, grid=(8, 8), seed=0):
    """Train a tiny GPT on a task where the target code of image slot k is k itself (= row * w + col) while the
    input codes are random, so only the slot's position can tell the answer; return the final training CE."""
    torch.manual_seed(seed)
    h, w = grid
    T = h * w
    m = GPT(GPTConfig(**{**TINY, 'codebook_size': T, 'image_tokens': T, 'image_width': w, 'image_pos': image_pos}))
    text = prompt([[1, 2]] * 16, m.config.text_len)
    target = torch.arange(T).expand(16, T)                                   # (16, T): position k -> code k
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(steps):
        codes = torch.randint(0, T, (16, T))                                 # inputs carry no information
        loss = F.cross_entropy(m(text, codes).logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_the_model_knows_where_it_is_in_the_image():
    """Image tokens get their (row, column) directly: on a task whose answer is the position alone, a tiny model
    is near-perfect in 100 steps. With image_pos='none' (the 1-D rotary alone) it must count from BOI and is far
    from it at the same budget, which is why the positions exist."""
    assert position_task_loss(GPTConfig.image_pos) < 0.05
    assert position_task_loss('none') > 0.3


@pytest.mark.parametrize('image_pos', IMAGE_POS)
def test_every_position_mode_keeps_cache_and_pad_guarantees(image_pos):
    """The position path is also taken by the one-token decode step: the KV cache must still equal a full
    recompute, and left padding must still change nothing, whatever positions image tokens get."""
    short, long = make_model(image_pos=image_pos, text_len=8), make_model(image_pos=image_pos, text_len=13)
    long.load_state_dict(short.state_dict(), strict=True)
    toks = [[5, 9, 17], [3]]
    gen = lambda m, L, cache: m.generate(prompt(toks, L), cfg_scale=2.0, top_k=20, use_cache=cache,
                                         generator=torch.Generator().manual_seed(3))
    reference = gen(short, 8, False)
    assert torch.equal(gen(short, 8, True), reference)
    assert torch.equal(gen(long, 13, True), reference)


def test_image_positions_follow_the_grid():
    """With row + column positions, slot k = (r, c) gets row[r] + col[c]: slots in one column share the column
    vector and differ by their rows (a 3 x 4 grid, so rows and columns cannot be confused)."""
    m = make_model(image_pos='rowcol')
    pos = m._image_positions(0, m.config.image_tokens)                       # (12, d)
    w = m.config.image_width
    for k in range(m.config.image_tokens):
        torch.testing.assert_close(pos[k], m.image_row[k // w] + m.image_col[k % w])
    torch.testing.assert_close(m._image_positions(5, 2), pos[5:7])           # a decode step reads its own slots


def test_temperature_zero_is_greedy(monkeypatch):
    """temperature=0 means greedy decoding: each step takes the argmax of the (guided) logits, so every seed gives
    the same codes."""
    m = make_model()
    text = prompt([[1, 2, 3], [4]], m.config.text_len)
    rec = LogitRecorder()
    monkeypatch.setattr(model_module, 'sample_from_logits', rec)
    codes = m.generate(text, cfg_scale=2.0, temperature=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, torch.stack(rec.logits).argmax(-1).T)           # (B, T): the argmax at every step
    other = m.generate(text, cfg_scale=2.0, temperature=0.0, generator=torch.Generator().manual_seed(99))
    assert torch.equal(codes, other)
    with pytest.raises(ValueError, match='temperature'):
        sample_from_logits(torch.zeros(1, 4), temperature=-0.5)
