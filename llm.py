"""
Start the text-to-image GPT from a pretrained text-only LLM of the Llama family, as the paper's ARRA starts from
Chameleon-7B's text weights: nanoGPT's `init_from='gpt2'` for the blocks model.py already follows (RMSNorm, SwiGLU,
rotary, bias-free attention, grouped-query heads).

    python train.py --init_from=llm:path/to/SmolLM2-135M ...   # see docs/llm.md
    python llm.py                                              # fine-tuning memory estimates for some LLM sizes
    python llm.py scale                                        # memory per GPU of every size, DDP vs FSDP, and the
                                                               # compute of the ImageNet recipe (an estimate)
    python llm.py convert_gguf --gguf=FILE.gguf --out_dir=DIR  # a llama.cpp GGUF file -> a folder loaded here

    from llm import from_pretrained_llm
    model = from_pretrained_llm('path/to/SmolLM2-135M', codebook_size=16384, image_tokens=256, text_len=77,
                                teacher_dim=512)

What loads: a Hugging Face `LlamaForCausalLM` folder, config.json + model.safetensors (or the shards listed in
model.safetensors.index.json): SmolLM2-135M/360M, TinyLlama-1.1B, Llama-3.2-1B (its llama3 rotary rescaling is
implemented), Llama-2-7B. Other architectures, bias terms, other rotary scalings or a head_dim that is not
hidden_size / num_attention_heads are refused with an error. A hub id (org/name) is fetched into the Hugging Face
cache when the hub can be reached; without network the error names the files to fetch and the local-folder flag.

Mapping (Hugging Face name -> GPT name); every other GPT weight is new and initialised as from scratch (the code
embedding, the BOI vector, the image head, the ARRA projector, and text rows past the LLM's vocabulary, e.g. a pad):
    model.embed_tokens                      -> text_embedding (rows 0 .. vocab_size-1)
    model.layers.i.input_layernorm          -> blocks.i.attention_norm
    model.layers.i.self_attn.{q,k,v}_proj   -> blocks.i.attention.wqkv, stacked [q; k; v], q and k rows reordered
    model.layers.i.self_attn.o_proj         -> blocks.i.attention.wo
    model.layers.i.post_attention_layernorm -> blocks.i.ffn_norm
    model.layers.i.mlp.{gate,up,down}_proj  -> blocks.i.feed_forward.{w1,w3,w2}
    model.norm                              -> norm (it now feeds the image head)
    lm_head                                 -> dropped: the GPT never writes text (tied or not)
"""
import os
import re
import sys
import json
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from model import GPT, GPTConfig

# the GPTConfig fields an LLM's config.json decides (text_vocab_size: at least its vocabulary)
LLM_FIELDS = ('n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'norm_eps', 'rope_base', 'rope_llama3',
              'text_vocab_size')
CHECKPOINT_FILES = ('config.json', 'model.safetensors', 'model.safetensors.index.json', 'model-*.safetensors',
                    'tokenizer.json', 'tokenizer_config.json')
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


class LLMError(ValueError):
    """An LLM checkpoint that cannot be loaded, with a message that says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# finding the files

def resolve_llm_dir(source, files=CHECKPOINT_FILES):
    """A local folder as it is; a hub id (org/name) -> its folder in the Hugging Face cache, fetched if needed."""
    if os.path.isdir(source):
        return source
    if not HUB_ID.match(source):
        raise LLMError(f'LLM folder {source} not found: pass a folder holding config.json and model.safetensors '
                       f'(--init_from=llm:DIR), or a Hugging Face hub id org/name')
    return fetch_from_hub(source, files)


def hub_reachable(timeout=3.0):
    """Whether a TCP connection to the hub opens within `timeout` seconds (so no network fails in seconds)."""
    host = urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co')).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch_from_hub(hub_id, files):
    """hub_id's files (glob patterns) from the Hugging Face cache, downloading them when the hub can be reached."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(hub_id, allow_patterns=list(files), local_files_only=True)
    except Exception:  # not in the cache (huggingface_hub raises several kinds): try the network below
        pass
    offline = any(os.environ.get(v, '').lower() in ('1', 'true', 'yes', 'on')
                  for v in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'))
    why = 'HF_HUB_OFFLINE is set' if offline else None
    if not offline and not hub_reachable():
        why = 'the hub cannot be reached (no network?)'
    if why is None:
        try:
            return snapshot_download(hub_id, allow_patterns=list(files))
        except Exception as e:
            why = f'the download failed: {type(e).__name__}: {str(e)[:200]}'
    raise LLMError(f'{hub_id} is not in the Hugging Face cache and {why}. Fetch {", ".join(files)} (those that '
                   f'exist) from https://huggingface.co/{hub_id} into one folder, e.g. `hf download {hub_id} '
                   f'--include "*.json" "*.safetensors" --local-dir DIR`, and pass the folder instead: '
                   f'--init_from=llm:DIR (and --text_tokenizer=DIR for the prepare step)')


# ----------------------------------------------------------------------------------------------------------------
# config.json -> GPTConfig

def read_llm_config(folder):
    """The LLM_FIELDS of folder/config.json, after refusing what this GPT cannot reproduce exactly."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        raise LLMError(f'{path} not found: an LLM folder needs config.json and model.safetensors (or '
                       f'model.safetensors.index.json with its shards)')
    with open(path) as f:
        hf = json.load(f)
    archs = hf.get('architectures') or []
    if hf.get('model_type') != 'llama' or (archs and 'LlamaForCausalLM' not in archs):
        raise LLMError(f'{folder} holds a {archs or hf.get("model_type")!r} model (model_type '
                       f'{hf.get("model_type")!r}); only Llama-architecture text models (LlamaForCausalLM: SmolLM2, '
                       f'TinyLlama, Llama 2 / 3) map onto this GPT')
    n_embd, n_head = hf['hidden_size'], hf['num_attention_heads']
    problems = []
    if hf.get('hidden_act', 'silu') != 'silu':
        problems.append(f'hidden_act {hf["hidden_act"]!r} (the SwiGLU here uses silu)')
    if hf.get('attention_bias') or hf.get('mlp_bias'):
        problems.append('attention or MLP biases (the blocks here have none)')
    if hf.get('head_dim') not in (None, n_embd // n_head):
        problems.append(f'head_dim {hf["head_dim"]} != hidden_size / num_attention_heads = {n_embd // n_head}')
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}  # transformers >= 5 / older config.json
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    llama3 = ()
    if rope_type == 'llama3':
        llama3 = tuple(float(rope[k]) for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                                                'original_max_position_embeddings'))
    elif rope_type != 'default':
        problems.append(f'rotary scaling {rope_type!r} (only none and llama3 are implemented: add it to '
                        f'model.rope_angles first)')
    if problems:
        raise LLMError(f'{path}: this GPT cannot reproduce ' + '; '.join(problems))
    return dict(n_layer=hf['num_hidden_layers'], n_head=n_head, n_kv_head=hf.get('num_key_value_heads') or n_head,
                n_embd=n_embd, ffn_hidden=hf['intermediate_size'], norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
                rope_base=float(hf.get('rope_theta', rope.get('rope_theta', 10000.0))), rope_llama3=llama3,
                text_vocab_size=hf['vocab_size'])


def llm_gpt_config(llm_fields, **overrides):
    """GPTConfig with the body of the LLM (LLM_FIELDS of llm_fields: read_llm_config's dict, or the model_config of a
    checkpoint that started from it) and any other field from overrides. The text table keeps at least the LLM's
    rows; an override that would change the body is an error."""
    body = {k: llm_fields[k] for k in LLM_FIELDS}
    valid = set(GPTConfig.__dataclass_fields__)
    if set(overrides) - valid:
        raise LLMError(f'unknown GPTConfig fields {sorted(set(overrides) - valid)}; valid: {sorted(valid)}')
    clash = {k: v for k, v in overrides.items() if k in body and k != 'text_vocab_size' and v != body[k]}
    if clash:
        raise LLMError(f'{", ".join(f"{k}={v} (the LLM has {body[k]})" for k, v in clash.items())}: the body of a '
                       f'model started from an LLM is the LLM\'s own; drop these size overrides (--n_layer, '
                       f'--n_head, --n_embd)')
    body['text_vocab_size'] = max(body['text_vocab_size'], overrides.get('text_vocab_size', 0))
    return GPTConfig(**{**overrides, **body})


# ----------------------------------------------------------------------------------------------------------------
# the weights

def hf_rotary_to_pairs(weight, n_heads):
    """Reorder the rows of a q or k projection (n_heads * hd, d) from Hugging Face's rotary layout to ours.

    Hugging Face rotates row j of a head with row j + hd/2 (the two halves), our apply_rope rotates 2i with 2i + 1,
    both at frequency i; moving row i to 2i and row i + hd/2 to 2i + 1 in every head of q and of k makes the rotated
    vectors the same up to one shared permutation, which leaves every q.k (and so attention) unchanged."""
    rows, d = weight.shape
    hd = rows // n_heads
    return weight.reshape(n_heads, 2, hd // 2, d).transpose(1, 2).reshape(rows, d)  # [h, half, i] -> [h, i, half]


class SafetensorsFolder:
    """The tensors of a folder's model.safetensors, or of the shards model.safetensors.index.json lists, read one
    at a time, checked against the shape the config implies. Records which names were read."""

    def __init__(self, folder):
        index, single = (os.path.join(folder, f) for f in ('model.safetensors.index.json', 'model.safetensors'))
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = {k: os.path.join(folder, v) for k, v in json.load(f)['weight_map'].items()}
        elif os.path.isfile(single):
            from safetensors import safe_open
            with safe_open(single, framework='pt') as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            old = [f for f in ('pytorch_model.bin', 'model.pt') if os.path.exists(os.path.join(folder, f))]
            raise LLMError(f'{folder} has no model.safetensors (nor model.safetensors.index.json with its shards)' +
                           (f'; {old[0]} is not read here: save the model with safetensors '
                            f'(save_pretrained(..., safe_serialization=True))' if old else ''))
        missing = sorted({f for f in self.file_of.values() if not os.path.isfile(f)})
        if missing:
            raise LLMError(f'the shards {missing} listed in model.safetensors.index.json are missing: fetch them')
        self.used = set()

    def get(self, name, shape):
        from safetensors import safe_open
        if name not in self.file_of:
            raise LLMError(f'tensor {name} is missing from the safetensors of this LLM (a truncated download, or '
                           f'not a plain Llama checkpoint)')
        with safe_open(self.file_of[name], framework='pt') as f:
            tensor = f.get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise LLMError(f'shape mismatch: {name} is {tuple(tensor.shape)} in {self.file_of[name]} but config.json '
                           f'implies {tuple(shape)}; the folder\'s config.json and weights do not belong together')
        self.used.add(name)
        return tensor


@torch.no_grad()
def load_llm_weights(model, folder):
    """Copy the LLM's weights in folder into model (a GPT built with llm_gpt_config from the same config.json), in
    the model's dtype. Every LLM tensor must be used, except the text head and old rotary caches."""
    c, weights = model.config, SafetensorsFolder(folder)
    kv_dim = (c.n_kv_head or c.n_head) * (c.n_embd // c.n_head)
    vocab = read_llm_config(folder)['text_vocab_size']
    embed = 'model.embed_tokens.weight'
    if embed not in weights.file_of and 'lm_head.weight' in weights.file_of:
        embed = 'lm_head.weight'  # tied embeddings saved under the head's name only
    model.text_embedding.weight[:vocab].copy_(weights.get(embed, (vocab, c.n_embd)))
    for i, block in enumerate(model.blocks):
        hf = f'model.layers.{i}.'
        q = hf_rotary_to_pairs(weights.get(hf + 'self_attn.q_proj.weight', (c.n_embd, c.n_embd)), c.n_head)
        k = hf_rotary_to_pairs(weights.get(hf + 'self_attn.k_proj.weight', (kv_dim, c.n_embd)), c.n_kv_head or c.n_head)
        v = weights.get(hf + 'self_attn.v_proj.weight', (kv_dim, c.n_embd))
        block.attention.wqkv.weight.copy_(torch.cat([q, k, v]))                      # (C + 2 kv_dim, C)
        block.attention.wo.weight.copy_(weights.get(hf + 'self_attn.o_proj.weight', (c.n_embd, c.n_embd)))
        block.attention_norm.weight.copy_(weights.get(hf + 'input_layernorm.weight', (c.n_embd,)))
        block.ffn_norm.weight.copy_(weights.get(hf + 'post_attention_layernorm.weight', (c.n_embd,)))
        for ours, theirs in (('w1', 'gate_proj'), ('w3', 'up_proj')):
            getattr(block.feed_forward, ours).weight.copy_(weights.get(hf + f'mlp.{theirs}.weight',
                                                                       (c.ffn_hidden, c.n_embd)))
        block.feed_forward.w2.weight.copy_(weights.get(hf + 'mlp.down_proj.weight', (c.n_embd, c.ffn_hidden)))
    model.norm.weight.copy_(weights.get('model.norm.weight', (c.n_embd,)))
    unused = sorted(n for n in set(weights.file_of) - weights.used
                    if n != 'lm_head.weight' and not n.endswith('rotary_emb.inv_freq'))
    if unused:
        more = ' ...' if len(unused) > 5 else ''
        raise LLMError(f'{folder} has tensors this GPT has no place for: {unused[:5]}{more} (more layers than '
                       f'config.json says, or not a plain Llama checkpoint)')
    return model


def from_pretrained_llm(path_or_hub_id, **gpt_overrides):
    """A GPT whose blocks, final norm and text table are the LLM's (a local folder or a hub id) and whose image
    parts are new. gpt_overrides: any other GPTConfig field (codebook_size, image_tokens, text_len, teacher_dim,
    text ids, ...); the body sizes come from the LLM's config.json."""
    folder = resolve_llm_dir(path_or_hub_id)
    return load_llm_weights(gpt_from_llm_config(folder, **gpt_overrides), folder)


def gpt_from_llm_config(path_or_hub_id, **gpt_overrides):
    """A GPT with the LLM's architecture (its config.json) and fresh random weights, initialised as from scratch:
    the control of an LLM start (train.py --init_from=llm_config:DIR). Only config.json is read."""
    folder = resolve_llm_dir(path_or_hub_id, files=('config.json',))
    return GPT(llm_gpt_config(read_llm_config(folder), **gpt_overrides))


# ----------------------------------------------------------------------------------------------------------------
# GGUF file -> Hugging Face folder (config.json, model.safetensors, tokenizer.json) that the loader above reads

GGUF_MAGIC = b'GGUF'


def read_gguf_architecture(path):
    """general.architecture of a GGUF file, after checking that it is one (magic bytes) and that it is whole (the
    gguf package reads every tensor's offset and size against the file's length)."""
    if not os.path.isfile(path):
        raise LLMError(f'GGUF file {path} not found')
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LLMError(f'{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); pass the .gguf '
                       f'file of a Llama-family model (llama.cpp\'s format)')
    try:
        import gguf
    except ImportError:
        raise LLMError('reading a GGUF file needs the gguf package: pip install gguf accelerate') from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a cut-off file fails inside numpy's memmap or the header parser, as various errors
        raise LLMError(f'{path} cannot be read as GGUF ({type(e).__name__}: {str(e)[:200]}): a truncated or '
                       f'corrupt download? Fetch the file again') from None
    field = reader.fields.get('general.architecture')
    if field is None:
        raise LLMError(f'{path} has no general.architecture entry: not a model GGUF file')
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > os.path.getsize(path):
        raise LLMError(f'{path} is truncated: its tensors end at byte {end:,} but the file has '
                       f'{os.path.getsize(path):,}; fetch the file again')
    return field.contents()


def convert_gguf(gguf_path, out_dir):
    """Write out_dir/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json} from a Llama GGUF file,
    through transformers (which dequantizes every tensor to fp32 and undoes llama.cpp's q/k row order). The weights
    are then the *dequantized* ones: a 4-bit file gives 4-bit-rounded weights in fp32, not the original model's.
    What is left out: the text head when it is tied to the token table (the loader reads the table), and the
    config's quantization_config (the folder is plain fp32)."""
    arch = read_gguf_architecture(gguf_path)
    if arch != 'llama':
        raise LLMError(f'{gguf_path} holds a {arch!r} model; only Llama-architecture GGUF files (general.architecture '
                       f'llama: SmolLM2, TinyLlama, Llama 2 / 3) map onto this GPT')
    missing = [m for m in ('gguf', 'accelerate', 'transformers') if not _importable(m)]
    if missing:
        raise LLMError(f'converting a GGUF file needs {", ".join(missing)}: pip install {" ".join(missing)}')
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(out_dir, exist_ok=True)
    config = model.config.to_dict()
    config.pop('quantization_config', None)  # transformers refuses to save a "gguf-quantized" model; ours is fp32
    config.pop('_name_or_path', None)
    config['architectures'] = [type(model).__name__]  # LlamaForCausalLM (transformers leaves it empty here)
    tied = bool(config.get('tie_word_embeddings'))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == 'lm_head.weight')}
    tmp = os.path.join(out_dir, '.tmp_model.safetensors')
    save_file(state, tmp, metadata={'format': 'pt', 'source': f'dequantized from {name}'})
    os.replace(tmp, os.path.join(out_dir, 'model.safetensors'))
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _importable(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def start_from_llm(source, meta, data_dir, gpt_overrides):
    """train.py --init_from=llm:SOURCE -> from_pretrained_llm(SOURCE), once the captions of data_dir (its meta.json)
    are known to be in the LLM's own tokenizer (its tokenizer.json, by sha256); else an error naming the prepare
    command to re-run."""
    from utils import file_sha256
    folder = resolve_llm_dir(source)
    tokenizer_file = os.path.join(folder, 'tokenizer.json')
    recorded = meta.get('text_tokenizer')
    if not os.path.isfile(tokenizer_file) or not isinstance(recorded, dict) or \
            recorded.get('sha256') != file_sha256(tokenizer_file):
        used = recorded.get('path') if isinstance(recorded, dict) and recorded.get('path') else 'open_clip BPE'
        command = meta.get('prepare_command', 'the prepare step of this dataset')
        raise LLMError(f'the captions in {data_dir} were tokenized with {used}, not with the tokenizer of the LLM '
                       f'{source} ({tokenizer_file}{"" if os.path.isfile(tokenizer_file) else ", missing"}): '
                       f'prepare them with it: `{command} --text_tokenizer={source}`')
    return from_pretrained_llm(folder, **gpt_overrides)


# ----------------------------------------------------------------------------------------------------------------
# memory estimate

# Body sizes from the config.json of each model card (typed in here, not read from the files).
LLM_SIZES = {
    'SmolLM2-135M': dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_hidden=1536, text_vocab_size=49152),
    'SmolLM2-360M': dict(n_layer=32, n_head=15, n_kv_head=5, n_embd=960, ffn_hidden=2560, text_vocab_size=49152),
    'TinyLlama-1.1B': dict(n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, ffn_hidden=5632, text_vocab_size=32000),
    'Llama-3.2-1B': dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_hidden=8192, text_vocab_size=128256),
    'Llama-2-7B': dict(n_layer=32, n_head=32, n_kv_head=32, n_embd=4096, ffn_hidden=11008, text_vocab_size=32000),
}


def train_memory(config, batch_size=1, world=1, fsdp=False, grad_checkpoint=False):
    """Rough training memory per GPU (GiB) of a GPTConfig under train.py on `world` GPUs, an estimate, not a
    measurement. Model state: fp32 weights, gradients and AdamW's two moments, 16 bytes per parameter, all of it on
    every GPU under DDP (fsdp=False) and 16 / world under FSDP, which adds the bf16 copies it gathers for compute:
    the root unit (embeddings, head, projector: kept gathered through the step) and two blocks (the one computing and
    the one prefetched), plus one block's fp32 gradient before its reduce-scatter. Activations autograd keeps for
    one micro-batch under bf16 autocast, per token and block: ~34 * d bytes (norms in fp32, q/k/v, rotary, attention
    output, residuals) + 8 * ffn_hidden (the SwiGLU's three branches and product), the attention matrix never stored
    (fused SDPA kernels), plus the code logits (bf16 logits, fp32 softmax and its gradient). grad_checkpoint: each
    block keeps only its fp32 input (4 * d bytes per token) and one block's full activations exist at a time, in
    its recomputation."""
    with torch.device('meta'):
        model = GPT(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_block = sum(p.numel() for p in model.blocks[0].parameters())
    bytes_per_param = 16 / world if fsdp else 16
    gathered = 2 * (n_params - config.n_layer * n_block + 2 * n_block) + 4 * n_block if fsdp else 0
    tokens = batch_size * (config.text_len + config.image_tokens)
    ffn = model.blocks[0].feed_forward.w1.out_features
    per_block = tokens * (34 * config.n_embd + 8 * ffn)
    if grad_checkpoint:
        activations = tokens * config.n_layer * 4 * config.n_embd + per_block
    else:
        activations = config.n_layer * per_block
    logits = batch_size * config.image_tokens * config.codebook_size * (2 + 4 + 4)
    gib = 1024 ** 3
    states = bytes_per_param * n_params + gathered
    return dict(params=n_params, bytes_per_param=bytes_per_param, states_gib=states / gib,
                activations_gib=(activations + logits) / gib, total_gib=(states + activations + logits) / gib)


# 256 image codes (16x16 of a 16384 codebook), 77 CLIP text tokens, a CLIP ViT-B teacher: the ImageNet setting
IMAGENET_SHAPE = dict(codebook_size=16384, image_tokens=256, text_len=77, teacher_dim=512)
# LlamaGen's 3B (GPT-3B) next to the presets of model.py; the 7B is Llama 2's body (the paper's 7B ARRA run)
SHARDED_SIZES = {'3B': dict(n_layer=24, n_head=32, n_embd=3200),
                 '7B': dict(LLM_SIZES['Llama-2-7B'], text_pad_id=0, text_sot_id=1, text_eot_id=2)}


def scale_table(batch_size=32, world=8):
    """docs/sharded-training.md's memory table: per-GPU memory of each size under DDP and FSDP on `world` GPUs
    at `batch_size` rows of 256 codes per GPU."""
    from model import PRESETS
    print(f'| model | parameters | bytes/param DDP | bytes/param FSDP x{world} | DDP states | FSDP states | '
          f'activations, batch {batch_size} | FSDP total | FSDP total, --grad_checkpoint |')
    print('|---|---|---|---|---|---|---|---|---|')
    for name, body in {**{k: v for k, v in PRESETS.items() if k != 'tiny'}, **SHARDED_SIZES}.items():
        cfg = GPTConfig(**body, **IMAGENET_SHAPE)
        ddp, fsdp = (train_memory(cfg, batch_size, world, f) for f in (False, True))
        recompute = train_memory(cfg, batch_size, world, True, grad_checkpoint=True)
        print(f'| {name} | {ddp["params"] / 1e9:.2f}B | {ddp["bytes_per_param"]:.0f} | {fsdp["bytes_per_param"]:.0f} '
              f'| {ddp["states_gib"]:.1f} GiB | {fsdp["states_gib"]:.1f} GiB | {ddp["activations_gib"]:.1f} GiB | '
              f'{fsdp["total_gib"]:.1f} GiB | {recompute["total_gib"]:.1f} GiB |')


# The paper's ImageNet recipe (LlamaGen's): 300 epochs over ImageNet-1k's 1,281,167 train images, one sequence of
# our ImageNet text length (data/imagenet/prepare.py's text_len: 'a photo of a {class}.') + 256 codes each.
IMAGENET_TRAIN_IMAGES, IMAGENET_EPOCHS, IMAGENET_TEXT_LEN = 1_281_167, 300, 16
H100_BF16_PEAK = 989e12   # FLOP/s: an H100 SXM's dense bf16 peak (datasheet)
ASSUMED_MFU = 0.40        # an assumed model FLOPs utilisation, not one measured here


def compute_rows(names=('B', 'L', 'XL'), gpus=8, peak=H100_BF16_PEAK, mfu=ASSUMED_MFU):
    """Training FLOPs of the ImageNet recipe for each preset (GPT.flops_per_sequence x sequences, ARRA's projector
    included) and the GPU-hours and days on one node of `gpus` GPUs at `mfu` of `peak`: an estimate."""
    from model import PRESETS
    sequences = IMAGENET_EPOCHS * IMAGENET_TRAIN_IMAGES
    rows = []
    for name in names:
        with torch.device('meta'):
            model = GPT(GPTConfig(**PRESETS[name], **{**IMAGENET_SHAPE, 'text_len': IMAGENET_TEXT_LEN}))
        flops = model.flops_per_sequence() * sequences
        gpu_hours = flops / (mfu * peak) / 3600
        rows.append(dict(model=name, params=model.num_params(), flops_per_sequence=model.flops_per_sequence(),
                         sequences=sequences, flops=flops, gpu_hours=gpu_hours, node_days=gpu_hours / gpus / 24))
    return rows


def compute_table(gpus=8, peak=H100_BF16_PEAK, mfu=ASSUMED_MFU):
    """docs/sharded-training.md's compute table: what the ImageNet recipe costs, on paper."""
    print(f'Compute of the ImageNet recipe ({IMAGENET_EPOCHS} epochs x {IMAGENET_TRAIN_IMAGES:,} images, '
          f'{IMAGENET_TEXT_LEN} text tokens + {IMAGENET_SHAPE["image_tokens"]} codes), an estimate: '
          f'{100 * mfu:.0f}% MFU of {peak / 1e12:.0f} TFLOP/s per GPU (an H100\'s dense bf16), {gpus} GPUs')
    print(f'| model | parameters | training FLOPs per sequence | training FLOPs | GPU-hours | days on one '
          f'{gpus}-GPU node |')
    print('|---|---|---|---|---|---|')
    for r in compute_rows(gpus=gpus, peak=peak, mfu=mfu):
        print(f'| {r["model"]} | {r["params"] / 1e9:.2f}B | {r["flops_per_sequence"]:.3g} | {r["flops"]:.3g} | '
              f'{r["gpu_hours"]:,.0f} | {r["node_days"]:.1f} |')


@dataclass
class ConvertConfig:
    gguf: str = ''      # the .gguf file of a Llama-family model (any llama.cpp quantization; dequantized to fp32)
    out_dir: str = ''   # the Hugging Face folder to write: config.json, model.safetensors, tokenizer.json


def convert_main(argv):
    """`python llm.py convert_gguf --gguf=FILE --out_dir=DIR`."""
    from configurator import configure
    cfg = configure(ConvertConfig(), argv)
    if not cfg.gguf or not cfg.out_dir:
        sys.exit('usage: python llm.py convert_gguf --gguf=FILE.gguf --out_dir=DIR')
    try:
        convert_gguf(cfg.gguf, cfg.out_dir)
    except LLMError as e:
        sys.exit(f'error: {e}')
    print(f'wrote {cfg.out_dir}: config.json, model.safetensors (weights dequantized to fp32), tokenizer.json; use '
          f'--init_from=llm:{cfg.out_dir} and --text_tokenizer={cfg.out_dir}')


def main(argv):
    """Print the tables of docs/llm.md and docs/sharded-training.md: `python llm.py 1 8` (LLM fine-tuning memory on
    one GPU, batch 1 and 8) or `python llm.py scale` (every size under DDP and FSDP on 8 GPUs, batch 32, then the
    ImageNet recipe's compute); or convert a GGUF file: `python llm.py convert_gguf --gguf=FILE --out_dir=DIR`."""
    if argv[:1] == ['convert_gguf']:
        return convert_main(argv[1:])
    if argv[:1] == ['scale']:
        scale_table()
        print()
        return compute_table()
    shape = dict(IMAGENET_SHAPE, text_pad_id=0, text_sot_id=0, text_eot_id=0)
    batch_sizes = [int(b) for b in argv] or [1, 8]
    print('| LLM | parameters | weights + grads + AdamW | ' +
          ' | '.join(f'activations, batch {b}' for b in batch_sizes) + ' |')
    print('|---|---|---|' + '---|' * len(batch_sizes))
    for name, body in LLM_SIZES.items():
        cfg = GPTConfig(**body, **shape)
        rows = [train_memory(cfg, b) for b in batch_sizes]
        print(f'| {name} | {rows[0]["params"] / 1e9:.2f}B | {rows[0]["states_gib"]:.1f} GiB | ' +
              ' | '.join(f'{r["activations_gib"]:.1f} GiB' for r in rows) + ' |')


if __name__ == '__main__':
    main(sys.argv[1:])
