"""
Prepare Fashion-MNIST (Zalando, MIT licence; see data/fashion/README.md): the real 70,000-image dataset of 28 x 28
grey clothing photos in 10 classes, padded to 32 x 32 RGB, with one prompt per class.

    apt-get install -y dataset-fashion-mnist                       # or torchvision's FashionMNIST(root, download=True)
    python data/fashion/prepare.py --source=/usr/share/datasets/fashion-mnist     # images stage, ~10 s
    python data/shapes/train_tokenizer.py --dataset=fashion        # -> out/vqgan_fashion/ckpt.pt (any prepared set)
    python data/fashion/prepare.py --stage=encode --teacher=out/teachers/vit_s_focus.safetensors

--source is a folder holding the four IDX files, gzipped or not, in either layout: Debian's
/usr/share/datasets/fashion-mnist/ (the files themselves) or torchvision's ROOT (or ROOT/FashionMNIST/raw/).

The images stage writes into out_dir (data/fashion/ by default):
    {split}_images.npy    uint8 (N, 32, 32, 3)   the 28 x 28 image centred on 2 px of black (its background), grey
                                                 copied to R, G and B (the shapes tokenizer's 32 px -> 8 x 8 grid)
    {split}_labels.npy    uint8 (N,)             the class index 0..9 (CLASSES)
    {split}_captions.txt  one prompt a line      PROMPT_TEMPLATE filled with the class's PROMPT_NAMES entry
    source.json           where the files came from (paths, sha256) and the settings
    preview.png           4 train images of each class, one class a row with its prompt
Split: train = the 60,000 training images in file order; val = the 10,000 test images (t10k), in file order.

The encode stage (data/common.py's contract) adds {split}_codes.bin, _text.bin, _teacher.bin and meta.json, through
the same pieces as the other datasets: vqgan.encode_images, teacher.embed_dataset, data.common.tokenize_captions.
--teacher is a saved CLIP teacher (.pt, Teacher.load: e.g. one trained on these images by
`python data/shapes/train_teacher.py --dataset=fashion --out_dir=out/teacher_fashion`), a DINOv2-layout ViT weights
file (.safetensors, teacher.ViTTeacher: e.g. scripts/convert_vit_onnx.py's output), or timm:NAME (a timm DINOv2
model by name, e.g. timm:vit_small_patch14_dinov2.lvd142m, fetched by timm: needs the network once).
--patch_targets=True also writes {split}_teacher_patch.bin, float16 (N, 64, D_p): the teacher's patch tokens on the
8 x 8 code grid (train.py --align_target=patch|both), from the same forward pass as _teacher.bin; on a dir already
encoded with this tokenizer and teacher it adds them alone.
"""
import os
import sys
import gzip
import json
import time
from dataclasses import dataclass, asdict, fields

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from utils import save_image_grid, atomic_write_bytes, file_sha256, pick_device  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# The prompt of class k is PROMPT_TEMPLATE with article + PROMPT_NAMES[k]: "a photo of a sneaker", "a photo of an
# ankle boot". The names are the class names read as English nouns ("Trouser" -> "pair of trousers").
PROMPT_TEMPLATE = 'a photo of {article} {name}'
PROMPT_NAMES = ('t-shirt', 'pair of trousers', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
                'ankle boot')
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
IDX_MAGIC = {3: 2051, 1: 2049}   # uint8 images (N, 28, 28) and uint8 labels (N,): 0x0803 and 0x0801
PAD = 2                          # 28 + 2 * 2 = 32
FASHION_TEXT_LEN = 12            # the longest prompt is 9 BPE tokens with SOT and EOT
HOW_TO_GET = ('get the files with `apt-get install -y dataset-fashion-mnist` (then --source='
              '/usr/share/datasets/fashion-mnist), or with torchvision: `python -c "from torchvision.datasets import '
              'FashionMNIST; FashionMNIST(\'ROOT\', download=True)"` (then --source=ROOT)')


def prompt_of(label):
    name = PROMPT_NAMES[int(label)]
    return PROMPT_TEMPLATE.format(article='an' if name[0] in 'aeiou' else 'a', name=name)


PROMPTS = tuple(prompt_of(k) for k in range(len(CLASSES)))


class IDXError(ValueError):
    """A missing or malformed IDX file; the message names the file and how to get good ones."""


def read_idx(path, ndim):
    """A gzipped (.gz) or raw IDX file of uint8 values -> numpy array of its shape (ndim dimensions)."""
    try:
        opener = gzip.open if path.endswith('.gz') else open
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream ends here
        raise IDXError(f'{path} cannot be read ({type(e).__name__}: {e}); {HOW_TO_GET}') from None
    magic = int.from_bytes(data[:4], 'big') if len(data) >= 4 else None
    if magic != IDX_MAGIC[ndim]:
        raise IDXError(f'{path} is not a uint8 IDX file of {ndim} dimension(s): magic number {magic} (expected '
                       f'{IDX_MAGIC[ndim]}); {HOW_TO_GET}')
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise IDXError(f'{path} is truncated or padded: {len(data) - header} data bytes, its header says '
                       f'{" x ".join(map(str, shape))} = {int(np.prod(shape))}; {HOW_TO_GET}')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(source, stem):
    """The file `stem` (raw) or `stem.gz` under source, source/FashionMNIST/raw or source/raw (raw preferred)."""
    for folder in (source, os.path.join(source, 'FashionMNIST', 'raw'), os.path.join(source, 'raw')):
        for name in (stem, stem + '.gz'):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    raise IDXError(f'{stem}[.gz] not found in {source} (nor in its FashionMNIST/raw/ or raw/); {HOW_TO_GET}')


def load_fashion(source):
    """-> {split: (images uint8 (N, 28, 28), labels uint8 (N,), [image path, label path])}, checked."""
    out = {}
    for split, (image_stem, label_stem) in FILES.items():
        paths = [find_idx(source, image_stem), find_idx(source, label_stem)]
        images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise IDXError(f'{paths[0]} holds {images.shape} images and {paths[1]} {labels.shape} labels: expected '
                           f'(N, 28, 28) and (N,); {HOW_TO_GET}')
        if labels.max() >= len(CLASSES):
            raise IDXError(f'{paths[1]} has label {labels.max()}, past the {len(CLASSES)} classes; {HOW_TO_GET}')
        out[split] = (images, labels, paths)
    return out


def to_rgb32(images):
    """uint8 (N, 28, 28) -> uint8 (N, 32, 32, 3): 2 px of black around, grey copied to the three channels."""
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))                   # (N, 32, 32)
    return np.repeat(padded[..., None], 3, axis=-1)                              # (N, 32, 32, 3)


@dataclass
class FashionConfig:
    source: str = '/usr/share/datasets/fashion-mnist'  # folder with the IDX files (see the module docstring)
    out_dir: str = HERE            # where the arrays go
    stage: str = 'images'          # 'images' | 'encode' | 'all' (images, then encode)
    # encode stage
    vqgan: str = 'out/vqgan_fashion/ckpt.pt'   # python data/shapes/train_tokenizer.py --dataset=fashion
    teacher: str = 'out/teachers/vit_s_focus.safetensors'  # .pt CLIP teacher, .safetensors ViT, or timm:NAME
    teacher_image_size: int = 112  # a ViT teacher's input side (112 px / patch 14 = the 8 x 8 code grid)
    text_len: int = FASHION_TEXT_LEN
    text_tokenizer: str = 'open_clip'
    patch_targets: bool = False    # also write {split}_teacher_patch.bin (train.py --align_target=patch|both)
    batch_size: int = 256
    device: str = 'auto'


def write_images(cfg, progress=True):
    """The images stage; skipped when source.json says the same files were already written."""
    t0 = time.time()
    data = load_fashion(cfg.source)
    os.makedirs(cfg.out_dir, exist_ok=True)
    stamp = dict(files={split: [dict(path=os.path.abspath(p), sha256=file_sha256(p)) for p in paths]
                        for split, (_, _, paths) in data.items()},
                 pad=PAD, prompt_template=PROMPT_TEMPLATE, prompts=list(PROMPTS), classes=list(CLASSES),
                 splits={split: len(labels) for split, (_, labels, _) in data.items()})
    stamp_path = os.path.join(cfg.out_dir, 'source.json')
    if os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp and all(
            os.path.exists(os.path.join(cfg.out_dir, f'{s}_images.npy')) for s in data):
        print(f'Fashion-MNIST already written to {cfg.out_dir} from these files; skipping')
        return stamp
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # the images are about to change: no stale stamp
    for split, (images, labels, _) in data.items():
        for name, array in (('images', to_rgb32(images)), ('labels', labels)):
            tmp = os.path.join(cfg.out_dir, f'.tmp_{split}_{name}.npy')
            np.save(tmp, array)
            os.replace(tmp, os.path.join(cfg.out_dir, f'{split}_{name}.npy'))
        atomic_write_bytes(''.join(PROMPTS[k] + '\n' for k in labels).encode(),
                           os.path.join(cfg.out_dir, f'{split}_captions.txt'))
    images, labels = to_rgb32(data['train'][0]), data['train'][1]
    first = [np.flatnonzero(labels == k)[:4] for k in range(len(CLASSES))]      # 4 of each class, file order
    save_image_grid(images[np.concatenate(first)], os.path.join(cfg.out_dir, 'preview.png'), nrow=4, scale=2,
                    captions=list(PROMPTS), caption_width=6 * 28)
    atomic_write_bytes(json.dumps(stamp, indent=1).encode(), stamp_path)
    print(f'wrote {stamp["splits"]["train"]:,} train + {stamp["splits"]["val"]:,} val images (32x32 RGB) into '
          f'{cfg.out_dir} in {time.time() - t0:.1f}s; preview: {os.path.join(cfg.out_dir, "preview.png")}')
    return stamp


def encode_dataset(cfg, progress=True):
    """The encode stage: codes, text and teacher arrays + meta.json (written last) into cfg.out_dir."""
    from data.common import load_split, tokenize_captions, write_split, write_meta, load_text_tokenizer
    from vqgan import load_vqgan, encode_images, vqgan_identity
    from teacher import load_teacher_spec, embed_dataset
    from data.encode import embed_patch_dataset, write_patch_targets, announce_patch_targets, teacher_patch_dim
    stamp_path = os.path.join(cfg.out_dir, 'source.json')
    if not os.path.exists(stamp_path):
        raise FileNotFoundError(f'{stamp_path} not found: write the images first with '
                                f'`python data/fashion/prepare.py --source=DIR`')
    if not os.path.isfile(cfg.vqgan):
        raise FileNotFoundError(f'tokenizer {cfg.vqgan} not found: train it with '
                                f'`python data/shapes/train_tokenizer.py --dataset=fashion`, or pass --vqgan=PATH')
    device = pick_device(cfg.device)
    teacher = load_teacher_spec(cfg.teacher, device=device, image_size=cfg.teacher_image_size)
    text_tok = load_text_tokenizer(cfg.text_tokenizer)
    vq = load_vqgan(cfg.vqgan)
    source = json.load(open(stamp_path))
    wanted = dict(vqgan=vqgan_identity(cfg.vqgan)['sha256'], teacher=teacher.identity(), text_len=cfg.text_len,
                  text_tokenizer=text_tok.identity(), source=source)
    meta_path = os.path.join(cfg.out_dir, 'meta.json')
    if os.path.exists(meta_path):
        old = json.load(open(meta_path))
        if dict(vqgan=old['vqgan']['sha256'], teacher=old['teacher'], text_len=old['text_len'],
                text_tokenizer=old['text_tokenizer'], source=old.get('source')) == wanted:
            if cfg.patch_targets and 'teacher_patch' not in old:
                return add_patch_targets(cfg, old, teacher, progress)
            print(f'{cfg.out_dir} is already encoded with this tokenizer and teacher; skipping')
            return old
        os.remove(meta_path)  # the arrays are about to change: never a stale meta
    t0, counts, patch_sha = time.time(), {}, {}
    if cfg.patch_targets:
        announce_patch_targets(cfg.out_dir, source['splits'], vq.grid[0] * vq.grid[1],
                               teacher_patch_dim(teacher))
    for split in ('train', 'val'):
        images, captions = load_split(cfg.out_dir, split)
        if vq.image_size != images.shape[1]:
            raise ValueError(f'the tokenizer {cfg.vqgan} takes {vq.image_size}px images, these are '
                             f'{images.shape[1]}px: train one with `python data/shapes/train_tokenizer.py '
                             f'--data_dir={cfg.out_dir}`')
        if cfg.patch_targets:  # one pass of the teacher gives both the global and the patch targets
            glob, patches = embed_patch_dataset(teacher, images, tuple(vq.grid), cfg.batch_size, progress,
                                                with_global=True)                          # (N, D), (N, T, D_p)
            patch_sha[split] = write_patch_targets(cfg.out_dir, split, patches)
            del patches
        else:
            glob = embed_dataset(teacher, images, cfg.batch_size, progress)                # (N, D) float16
        write_split(cfg.out_dir, split, dict(
            codes=encode_images(vq, images, cfg.batch_size, device, progress),            # (N, T) uint16
            text=tokenize_captions(captions, cfg.text_len, tokenizer=text_tok),            # (N, L)
            teacher=glob))
        counts[split] = len(images)
    default = FashionConfig()
    meta = dict(
        dataset='fashion', splits=counts, n_train=counts['train'], n_val=counts['val'],
        image_size=vq.image_size, grid=list(vq.grid), image_tokens=vq.grid[0] * vq.grid[1],
        codebook_size=vq.codebook_size, text_len=cfg.text_len, **text_tok.meta(),
        teacher=teacher.identity(), teacher_dim=teacher.dim, vqgan=vqgan_identity(cfg.vqgan),
        captions={split: f'{split}_captions.txt' for split in counts}, labels={s: f'{s}_labels.npy' for s in counts},
        classes=list(CLASSES), prompts=list(PROMPTS), source=source,
        **(dict(teacher_patch=patch_record(teacher, vq.grid, patch_sha)) if cfg.patch_targets else {}),
        prepare_command=' '.join(['python data/fashion/prepare.py --stage=encode'] + [
            f'--{f.name}={getattr(cfg, f.name)}' for f in fields(cfg)
            if f.name not in ('stage', 'source') and getattr(cfg, f.name) != getattr(default, f.name)]))
    write_meta(cfg.out_dir, meta)
    print(f'encoded {counts["train"]:,} train + {counts["val"]:,} val images in {time.time() - t0:.1f}s: codes '
          f'{vq.grid[0]}x{vq.grid[1]} of {vq.codebook_size}, teacher {teacher.name} (D = {teacher.dim})')
    return meta


def patch_record(teacher, grid, sha256):
    from data.encode import patch_meta, teacher_patch_grid, teacher_patch_dim, resample_note
    src = teacher_patch_grid(teacher)
    return patch_meta(teacher.identity(), src, grid, teacher_patch_dim(teacher), resample_note(src, grid), sha256)


def add_patch_targets(cfg, meta, teacher, progress=True):
    """Add {split}_teacher_patch.bin and meta.json's `teacher_patch` to an encoded dir (codes and globals kept)."""
    from data.common import load_split, write_meta
    from data.encode import embed_patch_dataset, write_patch_targets, announce_patch_targets, teacher_patch_dim
    t0, grid, sha = time.time(), tuple(meta['grid']), {}
    announce_patch_targets(cfg.out_dir, meta['splits'], meta['image_tokens'], teacher_patch_dim(teacher))
    for split in meta['splits']:
        images, _ = load_split(cfg.out_dir, split)
        sha[split] = write_patch_targets(cfg.out_dir, split, embed_patch_dataset(teacher, images, grid,
                                                                                 cfg.batch_size, progress))
    meta = dict(meta, teacher_patch=patch_record(teacher, grid, sha))
    write_meta(cfg.out_dir, meta)
    print(f'wrote patch targets ({teacher.name}, {grid[0]}x{grid[1]}) in {time.time() - t0:.1f}s')
    return meta


def main(argv):
    cfg = configure(FashionConfig(), argv)
    if cfg.stage not in ('images', 'encode', 'all'):
        raise SystemExit(f"--stage={cfg.stage!r}: choose 'images', 'encode' or 'all'")
    print(asdict(cfg))
    try:
        if cfg.stage in ('images', 'all'):
            write_images(cfg)
        if cfg.stage in ('encode', 'all'):
            encode_dataset(cfg)
    except (FileNotFoundError, ValueError) as e:  # bad input: the message says what to do; no traceback needed
        raise SystemExit(f'error: {e}')


if __name__ == '__main__':
    main(sys.argv[1:])
