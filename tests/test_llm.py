"""
Starting the GPT from a text-only LLM (llm.py, train.py --init_from=llm:...): weight-mapping parity against
transformers' LlamaForCausalLM on tiny random models saved with save_pretrained, the LLM's own tokenizer in the data,
training from the LLM, and the errors for bad input. transformers is a test-only dependency
(requirements-test.txt); nothing here touches the network.
"""
import os
import sys
import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import CAPTIONS, REPO, TINY, make_tiny_dataset, tiny_vqgan

transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

import llm  # noqa: E402
from llm import LLMError, from_pretrained_llm  # noqa: E402
from data.common import decode_text, load_text_tokenizer, text_tokenizer_of, tokenize_captions  # noqa: E402

TEXT_LEN, IMAGE_TOKENS = 10, 4


def save_tiny_bpe(folder):
    """A byte-level BPE (as SmolLM2 / Llama 3 use) trained on the tiny captions, with <s> / </s> as bos / eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['<s>', '</s>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CAPTIONS * 4 + ['a photo of shapes'], trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, 'tokenizer.json'))
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump(dict(bos_token='<s>', eos_token='</s>'), f)
    return tok


def save_tiny_llama(folder, n_kv_head=2, tie=False, rope=None, seed=0, **save_kwargs):
    """A randomly initialised 2-layer LlamaForCausalLM (d=64, 4 heads of 16) beside a tiny BPE; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = save_tiny_bpe(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv_head, rms_norm_eps=1e-6,
                         tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, rope_theta=5000.0,
                         rope_scaling=rope)  # transformers >= 5 saves these two as config.json's rope_parameters
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model


def gpt_shape(folder):
    """GPTConfig fields a tiny LLM-started GPT needs besides the LLM's (text ids from its tokenizer)."""
    m = load_text_tokenizer(folder).meta()
    return dict(codebook_size=16, image_tokens=IMAGE_TOKENS, text_len=TEXT_LEN, teacher_dim=8,
                text_vocab_size=m['text_vocab_size'], text_pad_id=m['text_pad_id'], text_sot_id=m['text_sot_id'],
                text_eot_id=m['text_eot_id'])


def text_hidden_states(gpt, ids):
    """The GPT's final-normed hidden states at the text positions (B, L, d), read from the final norm's output."""
    captured = {}
    handle = gpt.norm.register_forward_hook(lambda module, inputs, output: captured.update(h=output))
    with torch.no_grad():
        gpt(ids, torch.zeros(ids.shape[0], IMAGE_TOKENS, dtype=torch.long))
    handle.remove()
    return captured['h'][:, :ids.shape[1]]


def max_difference(hf_model, folder):
    """Largest |GPT - Hugging Face| over the last hidden state of random full-length texts (no pads), fp32."""
    gpt = from_pretrained_llm(folder, **gpt_shape(folder)).eval()
    ids = torch.randint(0, hf_model.config.vocab_size, (3, TEXT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model.model(ids).last_hidden_state          # (B, L, d), after the final RMSNorm
    return (text_hidden_states(gpt, ids) - reference).abs().max().item()


@pytest.fixture(scope='module')
def tiny_llm(tmp_path_factory):
    """A saved tiny grouped-query Llama with its tokenizer (read-only for tests)."""
    folder = str(tmp_path_factory.mktemp('llm') / 'tiny-llama')
    save_tiny_llama(folder)
    return folder


@pytest.fixture(scope='module')
def llm_data(tiny_llm, tmp_path_factory):
    """The tiny 12-caption dataset with its captions in the tiny LLM's tokenizer."""
    root = tmp_path_factory.mktemp('llm_data')
    vq = tiny_vqgan(str(root / 'vqgan.pt'))
    return make_tiny_dataset(str(root / 'tiny'), vq, text_tokenizer=load_text_tokenizer(tiny_llm))


# ----------------------------------------------------------------------------------------------------------------
# parity with transformers

@pytest.mark.parametrize('n_kv_head,tie', [(2, False), (4, True)], ids=['gqa', 'mha-tied'])
def test_hidden_states_match_transformers(tmp_path, n_kv_head, tie):
    """Every weight, the rotary reordering, GQA, rms_norm_eps and rope_theta mapped right: the text positions'
    hidden states equal LlamaForCausalLM's to 1e-5 in fp32."""
    hf = save_tiny_llama(str(tmp_path), n_kv_head=n_kv_head, tie=tie)
    assert max_difference(hf, str(tmp_path)) < 1e-5


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3's rotary rescaling is reproduced exactly; with head_dim 16 and original length 32 the eight
    frequencies fall in all three bands (kept, blended, slowed), so each branch is checked."""
    rope = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32)
    hf = save_tiny_llama(str(tmp_path), rope=rope)
    assert from_pretrained_llm(str(tmp_path), **gpt_shape(str(tmp_path))).config.rope_llama3 == (8.0, 1.0, 4.0, 32.0)
    assert max_difference(hf, str(tmp_path)) < 1e-5


def test_wrong_rotary_permutation_breaks_parity(tmp_path, monkeypatch):
    """The parity test can fail: loading q and k without the halves-to-pairs reordering gives other outputs."""
    hf = save_tiny_llama(str(tmp_path))
    monkeypatch.setattr(llm, 'hf_rotary_to_pairs', lambda weight, n_heads: weight)
    assert max_difference(hf, str(tmp_path)) > 1e-3


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    """Shards listed in model.safetensors.index.json give exactly the single-file model's weights."""
    save_tiny_llama(str(tmp_path / 'single'))
    save_tiny_llama(str(tmp_path / 'sharded'), max_shard_size='20KB')
    assert os.path.exists(tmp_path / 'sharded' / 'model.safetensors.index.json')
    torch.manual_seed(0)
    single = from_pretrained_llm(str(tmp_path / 'single'), **gpt_shape(str(tmp_path / 'single'))).state_dict()
    torch.manual_seed(0)
    sharded = from_pretrained_llm(str(tmp_path / 'sharded'), **gpt_shape(str(tmp_path / 'sharded'))).state_dict()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_image_parts_are_initialised_as_from_scratch(tiny_llm):
    """Only the LLM's parts are loaded: the code embedding, BOI, image head and projector are exactly those of a GPT
    built from scratch with the same seed and config."""
    from model import GPT
    torch.manual_seed(0)
    loaded = from_pretrained_llm(tiny_llm, **gpt_shape(tiny_llm))
    torch.manual_seed(0)
    scratch = GPT(loaded.config).state_dict()
    new = ('code_embedding.', 'boi', 'head.', 'projector.')
    assert all(torch.equal(v, scratch[k]) for k, v in loaded.state_dict().items() if k.startswith(new))


def test_llm_config_start_has_the_architecture_and_fresh_weights(tiny_llm):
    """gpt_from_llm_config (--init_from=llm_config:DIR, the control of an LLM start): the LLM-started GPT's config,
    and every weight that of a GPT built from scratch with the same seed, none of the LLM's."""
    from model import GPT
    torch.manual_seed(0)
    loaded = from_pretrained_llm(tiny_llm, **gpt_shape(tiny_llm))
    torch.manual_seed(0)
    fresh = llm.gpt_from_llm_config(tiny_llm, **gpt_shape(tiny_llm))
    torch.manual_seed(0)
    scratch = GPT(loaded.config).state_dict()
    assert fresh.config == loaded.config
    assert all(torch.equal(v, scratch[k]) for k, v in fresh.state_dict().items())
    q = 'blocks.0.attention.wqkv.weight'
    assert not torch.allclose(fresh.state_dict()[q], loaded.state_dict()[q])


def test_train_from_llm_config_resumes_with_the_llm_body(tiny_llm, llm_data, tmp_path):
    """A run from --init_from=llm_config:DIR has the LLM's body, records the LLM as its source, and resumes."""
    import train
    args = [f'--data_dir={llm_data}', f'--out_dir={tmp_path}', '--peak_flops=1e11', '--eval_interval=2',
            '--eval_samples=0', '--batch_size=4']
    train.train(train.parse_config([f'--init_from=llm_config:{tiny_llm}', '--max_iters=2', *args])[0])
    ckpt = torch.load(os.path.join(tmp_path, 'ckpt.pt'), weights_only=True)
    assert ckpt['llm_source'] == tiny_llm and ckpt['model_config']['ffn_hidden'] == 96
    cfg, resume = train.parse_config(['--init_from=resume', '--max_iters=3', *args])
    history = train.train(cfg, resume)
    assert [h['iter'] for h in history if h['kind'] == 'train'] == [3]


# ----------------------------------------------------------------------------------------------------------------
# the LLM's tokenizer in the data

def test_llm_tokenizer_round_trip(tiny_llm):
    """Captions in the LLM's tokenizer keep the layout [PAD.., bos, ids.., eos] and decode back to themselves."""
    tok = load_text_tokenizer(tiny_llm)
    text = tokenize_captions(CAPTIONS, TEXT_LEN, tokenizer=tok)                       # (N, L)
    for caption, row in zip(CAPTIONS, text):
        ids = [tok.sot_id] + tok.backend.encode(caption, add_special_tokens=False).ids + [tok.eot_id]
        assert list(row) == [tok.pad_id] * (TEXT_LEN - len(ids)) + ids
        assert decode_text(row, tok) == caption


def test_changed_tokenizer_file_is_refused(tiny_llm, tmp_path):
    """Data (or a checkpoint) prepared with one tokenizer.json is not read with another: the ids would mean other
    words."""
    meta = load_text_tokenizer(tiny_llm).meta()
    other = str(tmp_path / 'other')
    save_tiny_bpe(other)
    with open(os.path.join(other, 'tokenizer.json'), 'a') as f:
        f.write(' ')  # the same tokenizer, other bytes: a different file all the same
    with pytest.raises(ValueError, match='not the one the data was prepared with'):
        text_tokenizer_of(meta, os.path.join(other, 'tokenizer.json'))


def test_large_vocabulary_text_is_stored_as_uint32(tmp_path):
    """A tokenizer past 65,536 ids (Llama 3 has 128,256) gets uint32 text arrays that read back exactly; uint16 would
    wrap its ids around."""
    from types import SimpleNamespace
    from data.common import PreparedSplit, TextTokenizer
    words = {w: 70_000 + i for i, w in enumerate(sorted({w for c in CAPTIONS for w in c.split()}))}
    backend = SimpleNamespace(encode=lambda text, add_special_tokens: SimpleNamespace(
        ids=[words[w] for w in text.split()]))
    tok = TextTokenizer('tokenizers', None, None, 128_256, 128_256, 128_000, 128_001, backend)
    data = make_tiny_dataset(str(tmp_path / 'tiny'), tiny_vqgan(str(tmp_path / 'vq.pt')), text_tokenizer=tok)
    split = PreparedSplit(data, 'train')
    assert split.text.dtype == np.uint32 and split.meta['text_vocab_size'] == 128_257
    expected = [128_256] * (TINY['text_len'] - 5) + [128_000, words['a'], words['red'], words['circle'], 128_001]
    assert list(split.text[0]) == expected  # row 0 is 'a red circle'


def test_shapes_encode_with_the_llm_tokenizer(tiny_llm, tmp_path):
    """`prepare.py --stage=encode --text_tokenizer=DIR` writes the captions in the LLM's tokenizer and records it
    (and the command) in meta.json; switching back to open_clip re-encodes instead of skipping."""
    from dataclasses import replace
    from data.shapes.prepare import RenderConfig, PrepareConfig, render_dataset, encode_dataset
    from data.common import PreparedSplit, load_split
    from teacher import Teacher
    from vqgan import VQConfig, VQModel, save_vqgan
    d = str(tmp_path / 'shapes')
    render_dataset(RenderConfig(out_dir=d, n_train=6, n_val=3), progress=False)
    save_vqgan(VQModel(VQConfig(image_size=32, codebook_size=16, codebook_embed_dim=4, ch=8, ch_mult=(1, 2, 2),
                                num_res_blocks=1, z_channels=8, norm_groups=4)), str(tmp_path / 'vq.pt'))
    Teacher('ViT-S-32', embed_dim=8, vision_cfg=dict(image_size=32, patch_size=8, layers=1, width=16, head_width=8),
            text_cfg=dict(context_length=16, width=16, heads=2, layers=1)).save(str(tmp_path / 'teacher.pt'))
    cfg = PrepareConfig(out_dir=d, n_train=6, n_val=3, vqgan=str(tmp_path / 'vq.pt'), device='cpu',
                        teacher=str(tmp_path / 'teacher.pt'), text_tokenizer=tiny_llm, text_len=128)  # bytes: long
    meta = encode_dataset(cfg, progress=False)
    tok = load_text_tokenizer(tiny_llm)
    assert meta['text_tokenizer'] == tok.identity() and f'--text_tokenizer={tiny_llm}' in meta['prepare_command']
    captions = load_split(d, 'val')[1]
    assert np.array_equal(PreparedSplit(d, 'val').text, tokenize_captions(captions, meta['text_len'], tokenizer=tok))
    meta = encode_dataset(replace(cfg, text_tokenizer='open_clip'), progress=False)
    assert meta['text_tokenizer']['kind'] == 'open_clip'
    assert np.array_equal(PreparedSplit(d, 'val').text, tokenize_captions(captions, meta['text_len']))


# ----------------------------------------------------------------------------------------------------------------
# bad input

def edit_config(folder, **changes):
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)


@pytest.mark.parametrize('changes,message', [
    (dict(model_type='gpt2', architectures=['GPT2LMHeadModel']), 'only Llama-architecture'),
    (dict(rope_parameters=dict(rope_type='yarn', rope_theta=5000.0, factor=2.0)), "rotary scaling 'yarn'"),
    (dict(intermediate_size=128), 'shape mismatch: model.layers.0.mlp.gate_proj.weight'),
    (dict(num_hidden_layers=1), 'has tensors this GPT has no place for'),
], ids=['architecture', 'rope-scaling', 'shape', 'extra-layers'])
def test_bad_checkpoint_is_a_clear_error(tmp_path, changes, message):
    """A checkpoint this GPT cannot reproduce is refused before any training, saying what is wrong."""
    save_tiny_llama(str(tmp_path))
    edit_config(str(tmp_path), **changes)
    with pytest.raises(LLMError, match=message):
        from_pretrained_llm(str(tmp_path), **gpt_shape(str(tmp_path)))


@pytest.mark.parametrize('missing', ['model.safetensors', 'config.json'])
def test_missing_file_is_a_clear_error(tmp_path, missing):
    """A folder without its weights or config names the missing file."""
    save_tiny_llama(str(tmp_path))
    os.remove(tmp_path / missing)
    with pytest.raises(LLMError, match=missing.replace('.', r'\.') + '.*not found|has no ' + missing):
        from_pretrained_llm(str(tmp_path), **gpt_shape(str(tmp_path)))


@pytest.mark.parametrize('offline_env', [True, False], ids=['HF_HUB_OFFLINE', 'unreachable'])
def test_hub_id_without_network_fails_fast(monkeypatch, offline_env):
    """A hub id that is not cached, with no network, names the files to fetch and the local-folder flag."""
    if offline_env:
        monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    else:
        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
        monkeypatch.delenv('TRANSFORMERS_OFFLINE', raising=False)
        monkeypatch.setattr(llm, 'hub_reachable', lambda timeout=3.0: False)
    with pytest.raises(LLMError, match=r'config\.json.*model\.safetensors.*--init_from=llm:DIR'):
        from_pretrained_llm('arra-tests/no-such-llm', codebook_size=16)


def llm_run(llm_folder, data_dir, out_dir, *args):
    """train.py's config for a run from the LLM in llm_folder on data_dir (no peak-FLOPs measurement)."""
    import train
    from configurator import configure
    return configure(train.TrainConfig(), [f'--init_from=llm:{llm_folder}', f'--data_dir={data_dir}',
                                           f'--out_dir={out_dir}', '--peak_flops=1e11', *args])


def test_train_rejects_size_overrides(tiny_llm, llm_data, tmp_path):
    """The body comes from the LLM: --n_layer (and n_head / n_embd) that disagree are an error, not ignored."""
    import train
    with pytest.raises(train.TrainError, match=r'n_layer=5 \(the LLM has 2\).*drop these size overrides'):
        train.train(llm_run(tiny_llm, llm_data, tmp_path, '--n_layer=5'))


def test_train_rejects_data_in_another_tokenizer(tiny_llm, tiny_data, tmp_path):
    """Data tokenized with open_clip cannot train a model reading the LLM's tokenizer; the error names the flag."""
    import train
    with pytest.raises(train.TrainError, match=f'open_clip BPE.*--text_tokenizer={tiny_llm}'):
        train.train(llm_run(tiny_llm, tiny_data, tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# training from the LLM

def test_arra_steps_from_the_llm_lower_the_loss(tiny_llm, llm_data, tmp_path):
    """A few ARRA steps from the LLM start lower both the val cross-entropy and the val alignment loss."""
    import train
    cfg = llm_run(tiny_llm, llm_data, tmp_path, '--max_iters=30', '--eval_interval=30', '--batch_size=16',
                  '--learning_rate=3e-3', '--warmup_iters=5', '--eval_samples=0')
    evals = [h for h in train.train(cfg) if h['kind'] == 'eval']
    assert evals[-1]['val_ce'] < evals[0]['val_ce'] - 0.3
    assert evals[-1]['val_align'] < evals[0]['val_align']


@pytest.mark.slow
def test_train_resume_and_sample_from_llm_end_to_end(tiny_llm, llm_data, tmp_path):
    """`python train.py --init_from=llm:DIR` trains on the CPU, resumes from its checkpoint (which remembers the
    LLM start), and sample.py writes a grid from it, tokenizing the prompt with the LLM's tokenizer."""
    out = str(tmp_path / 'out')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    common = [f'--data_dir={llm_data}', f'--out_dir={out}', '--batch_size=8', '--eval_interval=3',
              '--eval_prompts=2', '--eval_samples=1', '--peak_flops=1e11', '--log_interval=1']

    def run(*args):
        result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    run('train.py', f'--init_from=llm:{tiny_llm}', '--max_iters=3', *common)
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['llm_source'] == tiny_llm and ckpt['iter_num'] == 3
    assert ckpt['model_config']['n_kv_head'] == 2 and ckpt['model_config']['ffn_hidden'] == 96
    run('train.py', '--init_from=resume', '--max_iters=5', *common)
    with open(os.path.join(out, 'log.jsonl')) as f:
        assert [json.loads(line)['iter'] for line in f if '"train"' in line] == [1, 2, 3, 4, 5]
    stdout = run('sample.py', f'--ckpt={out}/ckpt.pt', '--prompt', 'a red circle', '--num_samples=2',
                 f'--out={tmp_path}/grid.png')
    assert os.path.exists(tmp_path / 'grid.png'), stdout
