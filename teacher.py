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
    Teacher.load('out/teacher_shapes/teacher.pt')       # a teacher saved by this file (the shapes CLIP below)

BiomedCLIP needs the optional extra `pip install transformers` (its text tower is a Hugging Face BERT) and, like
every named model, the network once to fetch its weights. Keyword overrides replace whole top-level entries of the
named open_clip config (`vision_cfg=...` replaces the entire vision config), exactly as open_clip does.

`teacher.embed(images)` -> float32 (B, D), L2-normalised, equal to F.normalize(model.encode_image(preprocess(x))).
Inputs are uint8 tensors (B, 3, H, W) or lists of PIL images. Tensors are preprocessed on tensors (fast, batched) with
the settings of the transform open_clip returns (`teacher.preprocess`): resize of the short side, centre crop,
mean/std. That matches `.preprocess` on the same PIL image exactly when no resize is needed and to within one grey
level per pixel when it is (torch's and PIL's bicubic round differently). `embed_dataset` turns an (N, H, W, 3)
uint8 array into the float16 (N, D) array of the prepare step.

`python teacher.py --dataset=shapes` trains the shapes world's teacher: no pretrained model knows that world, so a
small CLIP (open_clip's ViT and text transformer, open_clip's ClipLoss) is trained on its images and captions in a
few minutes on a CPU, then saved for `Teacher.load`. Captions name the background only half of the time; the
contrastive loss still has to tell "... on a striped navy background" from "... on a plain gray background", so the
image embedding carries the global background properties that ARRA asks the GPT to keep consistent. The default
run (D = 64, 3.5M parameters, 400 steps of 256 pairs, seed 1337) reaches val image->text top-1 0.568 among all
1,000 captions (chance 0.001) and 0.908 within blocks of 100, and the background colour / texture can be read off
its embedding with 1.00 / 0.97 accuracy; it took 7 minutes on one thread of a busy 2-core machine (0.67 CPU-s/step).
`python teacher.py --dataset=shapes --preset=strong` trains a stronger one into out/teacher_shapes_strong (PRESETS).

Why a plain class and not an nn.Module: a teacher inside a GPT's module tree would have its parameters picked up by
the optimizer, `.train()`, DDP and the checkpoint. Kept outside, it stays frozen however the student is handled.
"""
import os
import sys
import math
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn.functional as F
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
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode
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
        from PIL import Image
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
        """Load a teacher written by Teacher.save (or by `python teacher.py`): the CLIP is rebuilt from its name and
        config overrides, then strict-loaded, so a saved hf-hub teacher needs that hub config in the local cache."""
        ckpt = load_checkpoint(path, kind='python teacher.py --dataset=shapes')
        if not isinstance(ckpt, dict) or ckpt.get('kind') != TEACHER_KIND:
            raise ValueError(f'{path} is not a teacher checkpoint (kind={ckpt.get("kind") if isinstance(ckpt, dict) else None!r}, '
                             f'expected {TEACHER_KIND!r}); train one with `python teacher.py --dataset=shapes`')
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
    from tqdm import tqdm
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f'embed_dataset takes uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}')
    out = np.empty((len(images), teacher.dim), dtype=np.float16)
    for i in tqdm(range(0, len(images), batch_size), desc=f'teacher {teacher.name}', disable=not progress):
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2)  # (b, 3, H, W)
        out[i:i + len(x)] = teacher.embed(x, batch_size=batch_size).cpu().numpy()
    return out


# ----------------------------------------------------------------------------------------------------------------
# training a small CLIP as the teacher of a world no pretrained model knows (shapes)

@dataclass
class TrainConfig:
    dataset: str = 'shapes'          # reads data/<dataset>/{train,val}_images.npy and _captions.txt
    data_dir: str = ''               # overrides data/<dataset> when set
    out_dir: str = 'out/teacher_shapes'  # teacher.pt goes here
    base_model: str = 'ViT-S-32'     # open_clip config name; its towers and embed_dim are replaced by the fields below
    embed_dim: int = 64              # D: the width of the shared embedding, and of the GPT's alignment target
    patch_size: int = 4              # 32 px / 4 = 8x8 patches: cells of the 3x3 grid span ~2.7 patches
    vision_layers: int = 4           # ViT depth
    vision_width: int = 64           # ViT width (head_width 32 -> 2 heads)
    text_layers: int = 2             # text transformer depth: captions are short and templated
    text_width: int = 64             # text transformer width (2 heads)
    context_length: int = 32         # caption tokens; the longest shapes caption is 24 with SOT/EOT
    batch_size: int = 256            # contrastive batch: more negatives per step, 256 still fits a CPU step in ~1 s
    max_iters: int = 400             # optimizer steps (~5 epochs of 20,000 pairs)
    lr: float = 1e-3                 # peak AdamW learning rate
    warmup_iters: int = 50           # linear warmup, then cosine decay to lr / 10
    weight_decay: float = 0.1        # on matrices only (not gains, biases, logit scale)
    eval_interval: int = 100         # val retrieval every this many steps (and at the end)
    seed: int = 1337
    device: str = 'cpu'              # 'auto' picks cuda when available
    preset: str = ''                 # a named set of the settings above (PRESETS); the command line still wins


# `--preset=strong`: a deeper image tower trained 4x longer (the teacher-strength comparison on shapes), into its
# own out_dir so it never overwrites the default teacher. D stays 64, so the GPT's projector is unchanged. Width is
# left at 64: at 128 a step costs ~5x more on a CPU, while the default's loss is still falling at step 400.
PRESETS = {
    'strong': dict(vision_layers=6, max_iters=1600, warmup_iters=100, eval_interval=400,
                   out_dir='out/teacher_shapes_strong'),
}


def clip_model_kwargs(cfg, image_size):
    """The open_clip overrides of the small CLIP: plain dicts, stored in the checkpoint as they are."""
    return dict(embed_dim=cfg.embed_dim,
                vision_cfg=dict(image_size=image_size, patch_size=cfg.patch_size, layers=cfg.vision_layers,
                                width=cfg.vision_width, head_width=32),
                text_cfg=dict(context_length=cfg.context_length, vocab_size=49408, width=cfg.text_width,
                              heads=cfg.text_width // 32, layers=cfg.text_layers))


def clip_loss(model, images, tokens, loss_fn=None):
    """Symmetric InfoNCE (open_clip's ClipLoss) of preprocessed images (B, 3, S, S) against tokens (B, L)."""
    loss_fn = loss_fn or open_clip.ClipLoss()
    image_features = model.encode_image(images, normalize=True)   # (B, D)
    text_features = model.encode_text(tokens, normalize=True)     # (B, D)
    return loss_fn(image_features, text_features, model.logit_scale.exp())


@torch.no_grad()
def retrieval_metrics(model, images, tokens, captions, group=100, batch_size=500):
    """Image->text top-1 retrieval on a split, three ways (chance in brackets for N = 1000):
    top1: the nearest of all N captions is the image's own (1/N);
    top1_same_text: the nearest caption has the same text as the image's own (duplicates count as right);
    top1_in_group: the nearest of the `group` captions in the image's block of `group` is its own (1/group)."""
    model.eval()
    img = torch.cat([model.encode_image(images[i:i + batch_size], normalize=True)
                     for i in range(0, len(images), batch_size)])            # (N, D)
    txt = torch.cat([model.encode_text(tokens[i:i + batch_size], normalize=True)
                     for i in range(0, len(tokens), batch_size)])            # (N, D)
    sim = img @ txt.T                                                        # (N, N)
    n = len(sim)
    best = sim.argmax(dim=1)                                                 # (N,)
    own = torch.arange(n)
    blocks = [sim[i:i + group, i:i + group].argmax(dim=1) == torch.arange(min(group, n - i))
              for i in range(0, n, group)]
    return dict(top1=(best == own).float().mean().item(),
                top1_same_text=float(np.mean([captions[b] == captions[i] for i, b in enumerate(best.tolist())])),
                top1_in_group=torch.cat(blocks).float().mean().item(), n=n, group=group)


def background_probe(teacher, data_dir, n_train=4000):
    """Nearest-class-mean accuracy of the background colour and texture read from the embedding alone (val split,
    class means from n_train train images): whether the teacher carries the global property. None if no scenes."""
    from data.shapes.prepare import load_split, load_scenes
    if not os.path.exists(os.path.join(data_dir, 'val_scenes.jsonl')):
        return None
    result = {}
    splits = {s: (load_split(data_dir, s)[0], load_scenes(data_dir, s)) for s in ('train', 'val')}
    emb = {s: embed_dataset(teacher, imgs[:n_train], progress=False).astype(np.float32)
           for s, (imgs, _) in splits.items()}
    for prop in ('bg_color', 'bg_texture'):
        labels = {s: np.array([sc[prop] for sc in scenes[:n_train]]) for s, (_, scenes) in splits.items()}
        classes = sorted(set(labels['train']))
        means = np.stack([emb['train'][labels['train'] == c].mean(0) for c in classes])   # (K, D)
        pred = np.array(classes)[(emb['val'] @ means.T).argmax(1)]
        result[prop] = float((pred == labels['val']).mean())
    return result


def train_clip(model, images, tokens, cfg, progress=True, log=print, evaluate=None):
    """AdamW + warmup/cosine on (preprocessed images (N, 3, S, S), tokens (N, L)); returns the per-step losses.
    evaluate: optional callable -> dict of val metrics, logged every cfg.eval_interval steps."""
    from tqdm import tqdm
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]   # gains, biases, logit scale
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': cfg.weight_decay},
                             {'params': no_decay, 'weight_decay': 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    n, order, pos, losses = len(images), torch.randperm(len(images), generator=gen), 0, []
    model.train()
    bar = tqdm(range(cfg.max_iters), desc='train CLIP teacher', disable=not progress)
    for it in bar:
        if pos + cfg.batch_size > n:  # a fresh permutation each epoch: no image twice in one batch
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        warm = (it + 1) / max(1, cfg.warmup_iters)
        progress_frac = max(0.0, it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        lr = cfg.lr * (warm if it < cfg.warmup_iters else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))
        for g in opt.param_groups:
            g['lr'] = lr
        loss = clip_loss(model, images[idx], tokens[idx], loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # open_clip's guard: a temperature above 100 makes the loss unstable
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f'{loss.item():.3f}', scale=f'{model.logit_scale.exp().item():.1f}')
        if log and cfg.eval_interval and (it + 1) % cfg.eval_interval == 0 and it + 1 < cfg.max_iters:
            msg = f'step {it + 1}: train loss {np.mean(losses[-cfg.eval_interval:]):.4f}'
            if evaluate:
                msg += ' | val ' + ' '.join(f'{k} {v:.3f}' for k, v in evaluate().items() if isinstance(v, float))
                model.train()
            log(msg)
    model.eval()
    return losses


def train_config(argv):
    """TrainConfig from `--key=value` arguments: the defaults, or the named --preset's, under the command line."""
    from configurator import configure
    cfg = configure(TrainConfig(), argv)
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise SystemExit(f'--preset={cfg.preset!r}: choose one of {", ".join(PRESETS)}')
        cfg = configure(TrainConfig(**PRESETS[cfg.preset]), argv)
    return cfg


def main(argv):
    from data.shapes.prepare import load_split
    cfg = train_config(argv)
    print(cfg)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    data_dir = cfg.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', cfg.dataset)
    (train_np, train_caps), (val_np, val_caps) = load_split(data_dir, 'train'), load_split(data_dir, 'val')
    model_kwargs = clip_model_kwargs(cfg, image_size=train_np.shape[1])
    model, _ = build_clip(cfg.base_model, None, device, **model_kwargs)
    print(f'CLIP teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, D = {cfg.embed_dim}')
    tokenizer = open_clip.get_tokenizer(cfg.base_model, context_length=cfg.context_length)
    pp = model.visual.preprocess_cfg

    def tensors(imgs, caps):  # the whole split in memory: 20,000 x 3 x 32 x 32 floats is 250 MB
        x = preprocess_uint8(torch.from_numpy(np.array(imgs)).permute(0, 3, 1, 2), pp)  # (N, 3, S, S)
        return x.to(device), tokenizer(caps).to(device)                                            # (N, L)
    train_x, train_t = tensors(train_np, train_caps)
    val_x, val_t = tensors(val_np, val_caps)
    t0 = time.time()
    losses = train_clip(model, train_x, train_t, cfg,
                        evaluate=lambda: retrieval_metrics(model, val_x, val_t, val_caps))
    train_time = time.time() - t0
    metrics = retrieval_metrics(model, val_x, val_t, val_caps)
    path = os.path.join(cfg.out_dir, 'teacher.pt')
    metrics |= dict(final_train_loss=float(np.mean(losses[-20:])), train_seconds=round(train_time, 1),
                    threads=torch.get_num_threads())
    save_clip(path, model, cfg.base_model, model_kwargs, dim=cfg.embed_dim, context_length=cfg.context_length,
              train_config=asdict(cfg), metrics=metrics, iter_num=cfg.max_iters)
    teacher = Teacher.load(path, device=device)  # the probe reads the saved teacher, as the prepare step will
    probe = background_probe(teacher, data_dir)
    if probe:  # saved again, now with the probe's numbers
        metrics |= {f'probe_{k}': v for k, v in probe.items()}
        save_clip(path, model, cfg.base_model, model_kwargs, dim=cfg.embed_dim, context_length=cfg.context_length,
                  train_config=asdict(cfg), metrics=metrics, iter_num=cfg.max_iters)
    n = metrics['n']
    print(f'trained {cfg.max_iters} steps in {train_time:.0f}s on {metrics["threads"]} threads; '
          f'final train loss {metrics["final_train_loss"]:.4f}; D = {teacher.dim}')
    print(f'val image->text top-1: {metrics["top1"]:.3f} among all {n} captions (chance {1 / n:.4f}); '
          f'{metrics["top1_same_text"]:.3f} counting an identical caption text as right; '
          f'{metrics["top1_in_group"]:.3f} within blocks of {metrics["group"]} (chance {1 / metrics["group"]:.2f})')
    if probe:
        print(f'background read from the embedding (nearest class mean, val): colour {probe["bg_color"]:.3f} '
              f'(chance 0.25), texture {probe["bg_texture"]:.3f} (chance 0.5)')
    print(f'saved {path}')


if __name__ == '__main__':
    main(sys.argv[1:])
