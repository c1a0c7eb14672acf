"""
GGUF file -> Hugging Face folder (llm.convert_gguf, `python llm.py convert_gguf`): on tiny Llama GGUF files written
here with gguf.GGUFWriter from a random LlamaForCausalLM, the converted folder holds the model's weights (exactly for
fp32 tensors, the dequantized values for 4/8-bit ones, llama.cpp's q/k row order undone), loads with
from_pretrained_llm to the same hidden states as the original, and carries the tokenizer; bad files are clear errors.

Optional: parity on the real converted SmolLM2-135M-Instruct (dequantized 4-bit Q4_1 weights), run only when the
folder exists: ARRA_LLM_DIR, default out/llm/smollm2-135m-instruct-q4_1 (made by the command in docs/llm-start.md).
"""
import os
import sys
import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import CAPTIONS, REPO

transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')
pytest.importorskip('accelerate')

from llm import LLMError, convert_gguf, from_pretrained_llm  # noqa: E402
from data.common import load_text_tokenizer  # noqa: E402
from test_llm import gpt_shape, save_tiny_llama, text_hidden_states  # noqa: E402

LLM_DIR = os.environ.get('ARRA_LLM_DIR', os.path.join(REPO, 'out', 'llm', 'smollm2-135m-instruct-q4_1'))
Q = gguf.GGMLQuantizationType


def llama_cpp_permute(weight, n_heads):
    """llama.cpp's convert_hf_to_gguf.py reorders q/k rows per head from the halves to the interleaved layout:
    (h, 2, hd/2, d) -> (h, hd/2, 2, d). Written out here so the test does not borrow llm.py's own reordering."""
    rows, d = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, d).swapaxes(1, 2).reshape(rows, d)


def gguf_tensors(hf_model):
    """{GGUF name: (HF name, fp32 array in GGUF's row order)} of a LlamaForCausalLM."""
    c, sd = hf_model.config, {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    out = {'token_embd.weight': ('model.embed_tokens.weight', sd['model.embed_tokens.weight']),
           'output_norm.weight': ('model.norm.weight', sd['model.norm.weight'])}
    if not c.tie_word_embeddings:
        out['output.weight'] = ('lm_head.weight', sd['lm_head.weight'])
    names = dict(attn_norm='input_layernorm', ffn_norm='post_attention_layernorm', attn_q='self_attn.q_proj',
                 attn_k='self_attn.k_proj', attn_v='self_attn.v_proj', attn_output='self_attn.o_proj',
                 ffn_gate='mlp.gate_proj', ffn_up='mlp.up_proj', ffn_down='mlp.down_proj')
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            hf_name = f'model.layers.{i}.{theirs}.weight'
            w = sd[hf_name]
            if ours == 'attn_q':
                w = llama_cpp_permute(w, c.num_attention_heads)
            elif ours == 'attn_k':
                w = llama_cpp_permute(w, c.num_key_value_heads)
            out[f'blk.{i}.{ours}.weight'] = (hf_name, w)
    return out


def write_tiny_gguf(path, hf_model, tokenizer, matrix_type=Q.F32, table_type=Q.F32, arch='llama'):
    """hf_model (and its byte-level BPE) as a GGUF file, llama.cpp's layout: matrices in matrix_type, the token table
    in table_type, norms fp32. Returns {HF name: the fp32 values the file holds, in HF's row order}."""
    c = hf_model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(64)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters['rope_theta'])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.to_str())['model']['merges']  # 'a b' strings or [a, b] pairs
    w.add_tokenizer_model('gpt2')
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in ('<s>', '</s>') else 1 for t, _ in vocab])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else ' '.join(m) for m in merges])
    w.add_bos_token_id(tokenizer.token_to_id('<s>'))
    w.add_eos_token_id(tokenizer.token_to_id('</s>'))
    held = {}
    for name, (hf_name, value) in gguf_tensors(hf_model).items():
        kind = Q.F32 if value.ndim == 1 else table_type if name == 'token_embd.weight' else matrix_type
        data = value.astype(np.float32) if kind == Q.F32 else gguf.quants.quantize(value, kind)
        w.add_tensor(name, data, raw_dtype=None if kind == Q.F32 else kind)
        stored = value if kind == Q.F32 else gguf.quants.dequantize(data, kind)
        n_heads = dict(attn_q=c.num_attention_heads, attn_k=c.num_key_value_heads).get(name.split('.')[-2])
        if n_heads:  # undo llama.cpp's order: (h, hd/2, 2, d) -> (h, 2, hd/2, d)
            stored = stored.reshape(n_heads, -1, 2, stored.shape[1]).swapaxes(1, 2).reshape(stored.shape)
        held[hf_name] = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def tiny_gguf(tmp_path, tie=True, **types):
    """(path of a tiny GGUF, the LlamaForCausalLM it came from, its tensors as the file holds them)."""
    from tokenizers import Tokenizer
    src = str(tmp_path / 'hf')
    hf = save_tiny_llama(src, tie=tie)
    path = str(tmp_path / 'tiny.gguf')
    held = write_tiny_gguf(path, hf, Tokenizer.from_file(os.path.join(src, 'tokenizer.json')), **types)
    return path, hf, held


def converted_tensors(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, 'model.safetensors'))


def test_cli_converts_fp32_gguf_to_the_same_model(tmp_path):
    """`python llm.py convert_gguf` on an fp32 GGUF gives back the original weights exactly (tied head left out),
    a config.json the loader reads, and a GPT with the original's hidden states; its tokenizer encodes as the
    original one."""
    path, hf, held = tiny_gguf(tmp_path)
    out = str(tmp_path / 'converted')
    result = subprocess.run([sys.executable, 'llm.py', 'convert_gguf', f'--gguf={path}', f'--out_dir={out}'],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-2000:]
    tensors = converted_tensors(out)
    original = hf.state_dict()
    assert set(tensors) == set(original) - {'lm_head.weight'}
    assert all(torch.equal(tensors[k], original[k]) for k in tensors)
    gpt = from_pretrained_llm(out, **gpt_shape(out)).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf.model(ids).last_hidden_state                                    # (B, L, d)
    assert (text_hidden_states(gpt, ids) - reference).abs().max().item() < 1e-5
    ours, theirs = load_text_tokenizer(out), load_text_tokenizer(str(tmp_path / 'hf'))
    assert (ours.sot_id, ours.eot_id) == (theirs.sot_id, theirs.eot_id)
    assert all(ours.encode(c) == theirs.encode(c) for c in CAPTIONS)


def test_quantized_gguf_converts_to_its_dequantized_values(tmp_path):
    """Q4_1 matrices and a Q8_0 token table (SmolLM2's file types) come out as the values the file holds
    (gguf's own dequantization, llama.cpp's q/k order undone), not the original fp32 ones; the untied head is kept."""
    path, hf, held = tiny_gguf(tmp_path, tie=False, matrix_type=Q.Q4_1, table_type=Q.Q8_0)
    out = convert_gguf(path, str(tmp_path / 'converted'))
    tensors = converted_tensors(out)
    assert set(tensors) == set(held)
    assert all(torch.allclose(tensors[k], held[k], rtol=0, atol=1e-6) for k in tensors)
    q = 'model.layers.0.self_attn.q_proj.weight'
    assert (tensors[q] - hf.state_dict()[q]).abs().max() > 1e-4  # 4-bit rounding happened
    from_pretrained_llm(out, **gpt_shape(out))  # and the folder loads


def test_non_llama_gguf_is_refused(tmp_path):
    path = str(tmp_path / 'qwen.gguf')
    w = gguf.GGUFWriter(path, 'qwen2')
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LLMError, match="holds a 'qwen2' model; only Llama-architecture"):
        convert_gguf(path, str(tmp_path / 'out'))


@pytest.mark.parametrize('keep', [0.5, 0.002], ids=['in-tensors', 'in-header'])
def test_truncated_gguf_is_a_clear_error(tmp_path, keep):
    path, _, _ = tiny_gguf(tmp_path)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:max(8, int(len(data) * keep))])
    with pytest.raises(LLMError, match='truncated'):
        convert_gguf(path, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out' / 'model.safetensors')


def test_foreign_file_is_a_clear_error(tmp_path):
    path = str(tmp_path / 'model.gguf')
    torch.save({'w': torch.zeros(3)}, path)  # a zip, not a GGUF
    with pytest.raises(LLMError, match='is not a GGUF file'):
        convert_gguf(path, str(tmp_path / 'out'))
    with pytest.raises(LLMError, match='not found'):
        convert_gguf(str(tmp_path / 'absent.gguf'), str(tmp_path / 'out'))


# ----------------------------------------------------------------------------------------------------------------
# the real converted SmolLM2-135M-Instruct (dequantized 4-bit Q4_1 weights): only where the folder exists

PROMPTS = ['The capital of France is Paris, and the capital of Italy is',
           'a large red circle in the top left and a small blue square in the center',
           'Photosynthesis is the process by which plants turn sunlight, water and carbon dioxide into']


@pytest.mark.skipif(not os.path.isfile(os.path.join(LLM_DIR, 'config.json')),
                    reason=f'no converted LLM at {LLM_DIR} (set ARRA_LLM_DIR; docs/llm-start.md converts one)')
def test_real_llm_matches_transformers():
    """On real prompts in the LLM's own tokenizer (left-padded to one length, pads masked), the GPT's final hidden
    states at the text positions equal LlamaForCausalLM's from the same folder to float32 rounding, and the LLM's
    head on our states predicts the same next tokens. Prints the figures docs/llm-start.md records."""
    from transformers import AutoModelForCausalLM
    tok = load_text_tokenizer(LLM_DIR)
    rows = [[tok.sot_id] + tok.encode(p) for p in PROMPTS]
    L = max(len(r) for r in rows)
    text = torch.tensor([[tok.pad_id] * (L - len(r)) + r for r in rows])                 # (B, L) left-padded
    gpt = from_pretrained_llm(LLM_DIR, **{**gpt_shape(LLM_DIR), 'text_len': L}).eval()
    ours = text_hidden_states(gpt, text)                                                  # (B, L, d)
    del gpt
    hf = AutoModelForCausalLM.from_pretrained(LLM_DIR, dtype=torch.float32).eval()
    worst_abs, worst_rel, same, total = 0.0, 0.0, 0, 0
    for b, r in enumerate(rows):
        with torch.no_grad():
            ref = hf.model(torch.tensor([r])).last_hidden_state[0]                      # (len, d)
            mine = ours[b, L - len(r):]                                                   # its text positions
            next_ours, next_ref = hf.lm_head(mine).argmax(-1), hf.lm_head(ref).argmax(-1)  # (len,)
        diff = (mine - ref).abs().max().item()
        rel = ((mine - ref).norm() / ref.norm()).item()
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
        same, total = same + (next_ours == next_ref).sum().item(), total + len(r)
        print(f'{PROMPTS[b]!r}: {len(r)} tokens, max |diff| {diff:.2e}, relative {rel:.2e}, next token '
              f'{tok.decode([int(next_ours[-1])])!r} (transformers {tok.decode([int(next_ref[-1])])!r})')
    print(f'overall: max |diff| {worst_abs:.2e}, relative {worst_rel:.2e}, same next token at {same}/{total} '
          f'positions')
    assert worst_rel < 1e-4 and same == total
