"""
Prepare ImageNet for text-to-image training: every image -> LlamaGen's VQ-16 codes of its 256x256 centre crop, a
prompt built from its class name, and a CLIP teacher embedding of the same crop (the arrays of data/common.py).

    python data/imagenet/prepare.py --train_dir=/data/imagenet/train --val_dir=/data/imagenet/val
    torchrun --nproc_per_node=8 data/imagenet/prepare.py --train_dir=... --val_dir=... --flip=True

Input: ImageFolder layout, one folder per class named by its WordNet id (train/n01440764/*.JPEG, ...); the val
images must be sorted into the same wnid folders (the usual valprep step). A subset of the classes is fine.
Prompts: caption_template filled with the class name, 'a photo of a {}.' -> 'a photo of a tench.'. The names are
data/imagenet/classes.txt (the first WordNet synonym of each class, underscores as spaces, in the standard class-index
order), matched to folders through data/imagenet/wnids.txt (the 1000 wnids, sorted: the order ImageFolder uses).
Two names occur twice in that standard list ('crane': the bird and the machine; 'maillot': two kinds of swimsuit),
so those class pairs share a prompt.
Tokenizer: LlamaGen's vq_ds16_c2i.pt (download it from LlamaGen's release page) via vqgan.load_vqgan: 16x16 codes
from 16384 at 256 px. Teacher: open_clip ViT-B-16 / laion2b_s34b_b88k by default (D = 512), or any named open_clip
model, or a saved teacher file (--teacher=path).
Work is sharded over the torchrun ranks and resumable; unreadable images are skipped and listed (data/encode.py).
Output in out_dir (default: this folder): {split}_codes.bin, _text.bin, _teacher.bin, _captions.txt, _files.txt,
_skipped.txt and meta.json. With --flip=True the train split gets the mirrored images as a second set of rows.
"""
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from data.encode import EncodeConfig, SplitItems, IMAGE_EXTENSIONS, prepare  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class ImageNetConfig(EncodeConfig):
    out_dir: str = HERE                       # where the arrays go (data/imagenet/, read by --dataset=imagenet)
    text_len: int = 16                        # the longest 'a photo of a {name}.' prompt is 14 tokens with SOT/EOT
    train_dir: str = ''                       # ImageNet train folder: train/<wnid>/*.JPEG (required)
    val_dir: str = ''                         # ImageNet val folder sorted into <wnid> folders (required)
    caption_template: str = 'a photo of a {}.'  # the prompt of an image; {} is its class name


def read_class_names(folder=HERE):
    """-> {wnid: class name} from wnids.txt and classes.txt (line i of each is class index i)."""
    with open(os.path.join(folder, 'wnids.txt')) as f:
        wnids = f.read().split()
    with open(os.path.join(folder, 'classes.txt')) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(wnids) != len(names):
        raise ValueError(f'{folder}: wnids.txt has {len(wnids)} lines but classes.txt {len(names)}; they must match')
    return dict(zip(wnids, names))


def list_image_folder(root, names, template):
    """ImageFolder order: class folders sorted by name, files sorted within each (subfolders walked, sorted).
    -> (paths relative to root, captions)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{root} is not a folder; expected an ImageFolder tree like {root}/n01440764/*.JPEG')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    unknown = [c for c in classes if c not in names]
    if not classes or unknown:
        raise ValueError(f'{root} should hold one folder per ImageNet class named by its wnid (n01440764, ...); '
                         + (f'found unknown folders {unknown[:5]}' if unknown else 'found no folders')
                         + '. For other datasets use data/folder/prepare.py with a captions file.')
    paths, captions = [], []
    for wnid in classes:
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, wnid), followlinks=True)):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(dirpath, fname), root))
                    captions.append(template.format(names[wnid]))
    if not paths:
        raise ValueError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) found under {root}')
    return paths, captions


def prepare_imagenet(cfg: ImageNetConfig, progress=True):
    if not cfg.train_dir or not cfg.val_dir:
        raise ValueError('--train_dir and --val_dir are required: ImageNet folders with one <wnid> folder per class '
                         '(train.py needs both splits; sort the val images into wnid folders first)')
    if '{}' not in cfg.caption_template:
        raise ValueError(f'caption_template={cfg.caption_template!r} has no {{}} for the class name')
    names = read_class_names()
    splits = []
    for split, root in (('train', cfg.train_dir), ('val', cfg.val_dir)):
        paths, captions = list_image_folder(root, names, cfg.caption_template)
        splits.append(SplitItems(split, root, paths, captions, flip=cfg.flip and split == 'train'))
    source = dict(train_dir=os.path.abspath(cfg.train_dir), val_dir=os.path.abspath(cfg.val_dir),
                  caption_template=cfg.caption_template,
                  class_names='data/imagenet/classes.txt (wnids.txt order)')
    return prepare(cfg, splits, 'imagenet', 'data/imagenet/prepare.py', source=source, progress=progress)


if __name__ == '__main__':
    cfg = configure(ImageNetConfig(), sys.argv[1:])
    if int(os.environ.get('RANK', 0)) == 0:
        print(cfg)
    prepare_imagenet(cfg)
