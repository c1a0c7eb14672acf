"""Tests for vqgan.py: shapes, nearest-code search, straight-through gradients, checkpoints in both formats, the
LlamaGen VQ-16 layout and bad input (its training recipe: test_train_tokenizer.py)."""
import os
import sys
import json
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vqgan  # noqa: E402
from vqgan import VQConfig, VQModel, load_vqgan, save_vqgan, vqgan_identity, encode_images  # noqa: E402
from utils import uint8_to_float  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# 16x16 images -> 8x8 codes; widths divisible by 32 so the LlamaGen-format loader (GroupNorm(32)) can rebuild it
TINY = dict(image_size=16, codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
            z_channels=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return VQModel(VQConfig(**(TINY | overrides)))


def images(b=3, size=16, seed=1):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_shapes_and_dtypes():
    """encode gives (B, h*w) long codes in range, decode (B, 3, H, W) floats, and the training forward uses
    the same codes as encode."""
    model = tiny_model().eval()
    assert model.grid == (8, 8) and model.downsample == 2 and model.codebook_size == 64 and model.image_size == 16
    codes = model.encode(images())
    assert codes.shape == (3, 64) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    out = model.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    # the training forward reconstructs through the same codes as encode -> decode
    recon, _, fwd_codes = model(images())
    assert torch.equal(fwd_codes, codes)
    torch.testing.assert_close(recon, out)


@pytest.mark.parametrize('l2_norm', [True, False])
def test_quantizer_picks_nearest_code_in_raster_order(l2_norm):
    """Each position gets the code nearest to its latent (brute force over all K), in raster order."""
    model = tiny_model(codebook_l2_norm=l2_norm).eval()
    x = images(2)
    codes = model.encode(x)                                               # (B, h*w)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x)).double()                   # (B, D, h, w)
        e = model.quantize.embedding.weight.double()                      # (K, D)
    if l2_norm:
        z, e = z / z.norm(dim=1, keepdim=True), e / e.norm(dim=1, keepdim=True)
    B, D, h, w = z.shape
    for b in range(B):
        for i in range(h):
            for j in range(w):
                dist = ((e - z[b, :, i, j]) ** 2).sum(1)                  # brute force over all K codes
                chosen = codes[b, i * w + j]                              # raster order: row i, column j
                assert dist[chosen] <= dist.min() + 1e-6
    assert len(codes.unique()) > 1  # not a degenerate single-code case


@pytest.mark.parametrize('l2_norm', [True, False])
def test_nearest_code_search_equals_the_written_out_argmin_and_keeps_the_first_tie(l2_norm):
    """The addmm + min search returns exactly the codes of the sums written out + torch.argmin (bench.py's encode
    baseline), over more latents than one distance block, and of two identical codes the first."""
    from bench import nearest_codes_before
    q = tiny_model(codebook_l2_norm=l2_norm).quantize
    with torch.no_grad():
        q.embedding.weight[5] = q.embedding.weight[3]                     # codes 3 and 5 tie everywhere
    z = torch.randn(vqgan.DISTANCE_CHUNK + 1000, 8, generator=torch.Generator().manual_seed(0))  # (N, D)
    z[:10] = q.codebook()[3].detach()                                    # latents exactly on the tied code
    codes = q.nearest_codes(z)                                           # (N,)
    assert torch.equal(codes, nearest_codes_before(q, z))
    assert (codes[:10] == 3).all() and len(codes.unique()) > 30


def test_straight_through_and_loss_terms():
    """The STE copies gradients to the encoder; commitment moves only the encoder, the codebook term only the
    codes; beta weights the commitment term (as LlamaGen, not taming)."""
    model = tiny_model().train()
    x = images(2)
    recon, losses, codes = model(x)
    # the forward value of both terms is the same squared distance; beta scales the commitment term only
    assert torch.allclose(losses['commitment'], model.config.commit_loss_beta * losses['codebook'])
    with torch.no_grad():
        z = F.normalize(model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
        e = F.normalize(model.quantize.embedding.weight, dim=-1)
    torch.testing.assert_close(losses['codebook'], ((e[codes.flatten()] - z) ** 2).mean())

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        g = lambda p: 0.0 if p.grad is None else p.grad.abs().sum().item()  # noqa: E731
        return g(model.encoder.conv_in.weight), g(model.quantize.embedding.weight)

    enc, emb = grads(recon.pow(2).mean())
    assert enc > 0 and emb == 0            # reconstruction reaches the encoder through the STE, not the codebook
    enc, emb = grads(losses['commitment'])
    assert enc > 0 and emb == 0            # commitment moves the encoder only
    enc, emb = grads(losses['codebook'])
    assert enc == 0 and emb > 0            # codebook loss moves the codes only


def test_training_updates_usage_window():
    """The rolling usage window follows training batches and ignores eval ones."""
    model = tiny_model().train()
    assert model.quantize.window_usage() == 0
    _, _, codes = model(images(2))
    assert model.quantize.window_usage() == pytest.approx(codes.unique().numel() / 64)
    model.eval()
    model(images(2, seed=5))
    assert model.quantize.window_usage() == pytest.approx(codes.unique().numel() / 64)  # eval leaves it alone


def test_save_load_roundtrip(tmp_path):
    """A saved tokenizer loads frozen, in eval mode, and encodes and decodes exactly as before."""
    model = tiny_model().eval()
    x = images(2)
    path = str(tmp_path / 'vq.pt')
    save_vqgan(model, path, iter_num=7)
    loaded = load_vqgan(path)
    assert loaded.config == model.config and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    ident = vqgan_identity(path)
    assert ident['codebook_size'] == 64 and ident['grid'] == [8, 8] and len(ident['sha256']) == 64
    assert load_vqgan(path, image_size=32).grid == (16, 16)  # another resolution, same weights


def test_attention_off_drops_only_the_attention_blocks(tmp_path):
    """attention=False: the state dict is the full model's minus every attention block's tensors (same names and
    shapes otherwise), the forward keeps its shapes, the flag survives a checkpoint, and a checkpoint config written
    before the flag existed loads with attention on."""
    full, slim = tiny_model().state_dict(), tiny_model(attention=False).state_dict()
    attn = {k for k in full if '.attn.' in k or k.split('.')[1:3] == ['mid', '1']}
    assert attn and set(slim) == set(full) - attn
    assert all(slim[k].shape == full[k].shape for k in slim)
    model = tiny_model(attention=False).eval()
    recon, _, codes = model(images())
    assert recon.shape == (3, 3, 16, 16) and codes.shape == (3, 64)
    path = str(tmp_path / 'slim.pt')
    save_vqgan(model, path)
    loaded = load_vqgan(path)
    assert loaded.config.attention is False and torch.equal(loaded.encode(images()), model.encode(images()))
    ckpt = torch.load(path, weights_only=True)
    ckpt['config'].pop('attention')
    ckpt['model'] = full
    torch.save(ckpt, path)
    assert load_vqgan(path).config.attention is True


def test_llamagen_format_loads_by_keys(tmp_path):
    """A LlamaGen-style file (only 'model', plus its pickled argparse args) loads strictly and encodes the same."""
    model = tiny_model().eval()
    path = str(tmp_path / 'vq_llamagen.pt')
    torch.save({'model': model.state_dict(), 'steps': 10, 'args': argparse.Namespace(vq_model='VQ-16')}, path)
    loaded = load_vqgan(path, image_size=16)
    assert loaded.config == model.config
    x = images(2)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert vqgan_identity(path)['grid'] == [128, 128]  # LlamaGen files default to 256 px


def test_vq16_state_dict_matches_llamagen_layout():
    """Names and shapes are LlamaGen VQ-16's key for key, so its released files load strictly."""
    expected = json.load(open(os.path.join(HERE, 'data', 'llamagen_vq16_keys.json')))
    with torch.device('meta'):  # names and shapes only: no 72M-parameter allocation
        model = VQModel(VQConfig())
    sd = model.state_dict()
    got = {k: list(v.shape) for k, v in sd.items()}
    assert set(got) - set(expected['keys']) == set() and set(expected['keys']) - set(got) == set()
    assert got == expected['keys']
    assert sum(v.numel() for v in sd.values()) == expected['num_elements']
    assert model.grid == (16, 16) and model.codebook_size == 16384
    assert vqgan.config_from_llamagen(sd) == VQConfig()  # the loader rebuilds VQ-16 from the shapes alone


def test_encode_images_batches_uint8(tmp_path):
    """encode_images over a memmap in batches equals one encode call, as uint16."""
    model = tiny_model().eval()
    arr = np.random.default_rng(0).integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / 'x.npy', arr)
    mm = np.load(tmp_path / 'x.npy', mmap_mode='r')
    codes = encode_images(model, mm, batch_size=3, progress=False)
    assert codes.dtype == np.uint16 and codes.shape == (7, 64)
    assert np.array_equal(codes, model.encode(uint8_to_float(arr)).numpy())
    with pytest.raises(ValueError, match='uint8'):
        encode_images(model, arr.astype(np.float32), progress=False)


def test_encode_refuses_images_it_would_misread():
    """uint8, out-of-range, wrongly sized or single-channel images each get an error that names the conversion."""
    model = tiny_model().eval()
    with pytest.raises(TypeError, match='uint8_to_float'):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'\[-1, 1\]'):
        model.encode(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(ValueError, match='resize'):
        model.encode(torch.zeros(1, 3, 24, 24))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model.encode(torch.zeros(1, 1, 16, 16))


def test_decode_refuses_codes_of_another_grid_or_codebook():
    """Codes from another tokenizer (grid or codebook size) would decode to garbage: refused."""
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r'\(B, 64\)'):
        model.decode(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r'\[0, 64\)'):
        model.decode(torch.full((1, 64), 64))


def test_config_refuses_a_size_the_downsampling_cannot_reach():
    """VQ-16 halves four times: 250 px is not a multiple of 16."""
    with pytest.raises(ValueError, match='divisible'):
        VQConfig(image_size=250)


def test_loader_refuses_missing_foreign_and_corrupt_files(tmp_path):
    """Each wrong file gets its own message: missing, another kind of checkpoint, an unknown state dict, a size the
    tokenizer cannot run at, a file that is not a checkpoint."""
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_vqgan(str(tmp_path / 'missing.pt'))
    gpt = str(tmp_path / 'gpt.pt')
    torch.save({'kind': 'arra-gpt', 'model': {'wte.weight': torch.zeros(2, 2)}, 'config': {}}, gpt)
    with pytest.raises(ValueError, match='arra-gpt'):
        load_vqgan(gpt)
    other = str(tmp_path / 'other.pt')
    torch.save({'model': {'wte.weight': torch.zeros(2, 2)}}, other)
    with pytest.raises(ValueError, match='neither'):
        load_vqgan(other)
    ours = str(tmp_path / 'vq.pt')
    save_vqgan(tiny_model(), ours)
    with pytest.raises(ValueError, match='divisible'):
        load_vqgan(ours, image_size=15)
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'not a checkpoint')
    with pytest.raises(RuntimeError, match='could not read'):
        load_vqgan(str(junk))
