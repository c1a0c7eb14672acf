"""Fashion-MNIST: the IDX reader, the prepare stages on tiny IDX files, the tokenizer trainer on them, the classifier,
the Frechet distances and the probes. No real files, except the test marked to run only where they are."""
import os
import gzip

import numpy as np
import pytest
import torch

from data.fashion import prepare as fp

pytestmark = pytest.mark.usefixtures('one_thread')
REAL = '/usr/share/datasets/fashion-mnist'


def write_idx(path, array, gz=None, magic=None):
    """Write a uint8 array as an IDX file (gzipped when the path ends in .gz), optionally with a wrong magic."""
    array = np.asarray(array, dtype=np.uint8)
    header = (magic or fp.IDX_MAGIC[array.ndim]).to_bytes(4, 'big') + b''.join(
        int(d).to_bytes(4, 'big') for d in array.shape)
    data = header + array.tobytes()
    with (gzip.open if path.endswith('.gz') else open)(path, 'wb') as f:
        f.write(data)
    return path


def tiny_source(folder, n_train=30, n_val=20, gz=True, seed=0):
    """The four Fashion-MNIST IDX files with random images; labels cycle through the 10 classes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (('train', n_train), ('val', n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        image_stem, label_stem = fp.FILES[split]
        ext = '.gz' if gz else ''
        write_idx(os.path.join(folder, image_stem + ext), images)
        write_idx(os.path.join(folder, label_stem + ext), labels)
        arrays[split] = (images, labels)
    return arrays


def assert_names_both_ways(message):
    assert 'apt-get install -y dataset-fashion-mnist' in message and 'FashionMNIST(' in message


@pytest.mark.parametrize('gz', [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = write_idx(str(tmp_path / ('x.gz' if gz else 'x')), a)
    assert np.array_equal(fp.read_idx(path, 3), a)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert np.array_equal(fp.read_idx(write_idx(str(tmp_path / 'y'), labels), 1), labels)


def test_read_idx_wrong_magic(tmp_path):
    path = write_idx(str(tmp_path / 'x.gz'), np.zeros((2, 28, 28)), magic=2049)     # a label file's magic
    with pytest.raises(fp.IDXError, match='magic number 2049') as err:
        fp.read_idx(path, 3)
    assert_names_both_ways(str(err.value))


def test_read_idx_truncated_raw_and_gz(tmp_path):
    a = np.zeros((4, 28, 28), dtype=np.uint8)
    raw = write_idx(str(tmp_path / 'x'), a)
    with open(raw, 'rb') as f:
        data = f.read()
    with open(raw, 'wb') as f:
        f.write(data[:-100])
    with pytest.raises(fp.IDXError, match='truncated') as err:
        fp.read_idx(raw, 3)
    assert_names_both_ways(str(err.value))
    gz = write_idx(str(tmp_path / 'x.gz'), a)
    with open(gz, 'rb') as f:
        data = f.read()
    with open(gz, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(fp.IDXError, match='cannot be read') as err:
        fp.read_idx(gz, 3)
    assert_names_both_ways(str(err.value))


def test_missing_files_name_both_ways(tmp_path):
    with pytest.raises(fp.IDXError, match='train-images-idx3-ubyte') as err:
        fp.load_fashion(str(tmp_path))
    assert_names_both_ways(str(err.value))


def test_torchvision_layout_and_raw_files(tmp_path):
    arrays = tiny_source(str(tmp_path / 'FashionMNIST' / 'raw'), gz=False)
    data = fp.load_fashion(str(tmp_path))
    assert np.array_equal(data['train'][0], arrays['train'][0]) and np.array_equal(data['val'][1], arrays['val'][1])


def test_prompts_follow_the_template():
    assert fp.PROMPTS[7] == 'a photo of a sneaker' and fp.PROMPTS[9] == 'a photo of an ankle boot'
    assert len(set(fp.PROMPTS)) == 10


def tiny_vq32(path):
    """An untrained tokenizer for 32 px images -> 8 x 8 codes (as the fashion tokenizer)."""
    from vqgan import VQConfig, VQModel, save_vqgan
    torch.manual_seed(0)
    save_vqgan(VQModel(VQConfig(image_size=32, codebook_size=16, codebook_embed_dim=4, ch=8, ch_mult=(1, 1, 2),
                                num_res_blocks=1, z_channels=8, norm_groups=4)), path)
    return path


def tiny_vit(image_size=28):
    from teacher import ViTTeacher
    torch.manual_seed(0)
    return ViTTeacher('vit_small_patch14_dinov2', pretrained=False, image_size=image_size, embed_dim=32, depth=2,
                      num_heads=2)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """Tiny IDX files -> the images stage -> the encode stage (tiny tokenizer, tiny ViT teacher file)."""
    root = tmp_path_factory.mktemp('fashion')
    arrays = tiny_source(str(root / 'src'))
    cfg = fp.FashionConfig(source=str(root / 'src'), out_dir=str(root / 'data'), vqgan=tiny_vq32(str(root / 'vq.pt')),
                           teacher=str(root / 'vit.safetensors'), teacher_image_size=28, device='cpu')
    tiny_vit().save(cfg.teacher)
    fp.write_images(cfg, progress=False)
    meta = fp.encode_dataset(cfg, progress=False)
    return dict(cfg=cfg, arrays=arrays, meta=meta)


def test_images_stage_pads_and_captions(prepared):
    cfg, arrays = prepared['cfg'], prepared['arrays']
    for split, (images, labels) in arrays.items():
        out = np.load(os.path.join(cfg.out_dir, f'{split}_images.npy'))
        assert out.shape == (len(images), 32, 32, 3) and out.dtype == np.uint8
        assert np.array_equal(out[:, 2:30, 2:30, 1], images) and (out[:, :2] == 0).all() and (out[:, :, 30:] == 0).all()
        assert np.array_equal(out[..., 0], out[..., 2])
        with open(os.path.join(cfg.out_dir, f'{split}_captions.txt')) as f:
            assert f.read().splitlines() == [fp.PROMPTS[k] for k in labels]
    assert os.path.exists(os.path.join(cfg.out_dir, 'preview.png'))


def test_encode_stage_writes_the_contract(prepared):
    from data.common import open_prepared, decode_text
    from teacher import ViTTeacher, embed_dataset
    cfg = prepared['cfg']
    meta, train, val = open_prepared(cfg.out_dir)
    assert (len(train), len(val)) == (30, 20) and meta['grid'] == [8, 8] and meta['teacher_dim'] == 32
    assert train.codes.shape == (30, 64) and val.teacher.shape == (20, 32)
    assert decode_text(val.text[9]) == fp.PROMPTS[9]
    images = np.load(os.path.join(cfg.out_dir, 'val_images.npy'))
    ref = embed_dataset(ViTTeacher(weights=cfg.teacher, image_size=28), images, progress=False)
    assert np.allclose(np.asarray(val.teacher, np.float32), ref.astype(np.float32), atol=1e-3)
    assert meta['teacher']['kind'] == 'timm-vit' and meta['teacher']['sha256']


def test_images_stage_is_skipped_when_unchanged(prepared, capsys):
    fp.write_images(prepared['cfg'], progress=False)
    assert 'skipping' in capsys.readouterr().out


def test_tokenizer_trainer_reads_any_prepared_image_set(prepared, tmp_path):
    """The shapes tokenizer trainer on the fashion folder: image size from the data, 32 px -> 8 x 8 codes."""
    from data.shapes.train_tokenizer import VQTrainConfig, train
    from vqgan import load_vqgan
    cfg = VQTrainConfig(data_dir=prepared['cfg'].out_dir, out_dir=str(tmp_path / 'vq'), max_iters=3, batch_size=4,
                        codebook_size=16, ch=8, z_channels=8, norm_groups=4, eval_images=8, eval_interval=100,
                        warmup_iters=1, device='cpu')
    out = train(cfg, progress=False)
    vq = load_vqgan(out['ckpt'])
    assert vq.image_size == 32 and tuple(vq.grid) == (8, 8) and 0 < out['usage'] <= 1


def test_classifier_learns_and_reports_features(prepared, tmp_path):
    """On tiny data where the class is written in the pixels, the classifier's loss falls and it scores 1.0; its
    features are the penultimate layer and the saved file loads back to the same outputs."""
    from data.fashion import classifier as fc
    cfg = fc.ClassifierConfig(data_dir=prepared['cfg'].out_dir, out_dir=str(tmp_path / 'clf'), width=4, hidden=16,
                              epochs=200, batch_size=16, lr=1e-2, device='cpu')
    images = np.load(os.path.join(cfg.data_dir, 'train_images.npy'))
    labels = np.load(os.path.join(cfg.data_dir, 'train_labels.npy'))
    marked = (labels[:, None, None, None] * 25).astype(np.uint8) * np.ones_like(images)   # brightness = class
    d = str(tmp_path / 'marked')
    os.makedirs(d)
    for split in ('train', 'val'):
        np.save(os.path.join(d, f'{split}_images.npy'), marked)
        np.save(os.path.join(d, f'{split}_labels.npy'), labels)
    cfg.data_dir = d
    result = fc.train(cfg, progress=False)
    assert result['test_accuracy'] == 1.0
    model = fc.load_classifier(result['path'])
    logits, feats = fc.run(model, marked)
    assert logits.shape == (30, 10) and feats.shape == (30, 16)
    with torch.no_grad():
        assert np.allclose(feats, model.features(model.prepare(marked)).numpy(), atol=1e-5)


def test_frechet_distance_of_features_closed_form():
    """1-d features: d^2 = (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations (unbiased)."""
    from fid import frechet_distance_of_features
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (500, 1)), rng.normal(2, 3, (400, 1))
    expect = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert np.isclose(frechet_distance_of_features(a, b), expect, rtol=1e-9)
    c = rng.normal(size=(200, 4))
    assert abs(frechet_distance_of_features(c, c)) < 1e-8


def test_score_samples_both_frechet_distances(prepared):
    """Class accuracy against the prompts' classes, FD in the classifier's features and in the ViT's CLS space,
    each equal to the distance computed from the features directly, and 0 for the reference set itself."""
    from data.fashion import classifier as fc
    from data.fashion.evaluate import score_samples, vit_features
    from fid import frechet_distance, compute_statistics
    torch.manual_seed(0)
    clf = fc.FashionCNN(width=4, hidden=8).eval()
    vit = tiny_vit()
    images = np.load(os.path.join(prepared['cfg'].out_dir, 'val_images.npy'))
    labels = np.load(os.path.join(prepared['cfg'].out_dir, 'val_labels.npy'))
    ref_images = np.load(os.path.join(prepared['cfg'].out_dir, 'train_images.npy'))
    ref_feats, ref_cls = fc.run(clf, ref_images)[1], vit_features(vit, ref_images, progress=False)[0]
    out = score_samples(images, labels, clf, ref_feats, vit, ref_cls)
    assert out['class_accuracy'] == float((fc.run(clf, images)[0].argmax(1) == labels).mean())
    assert np.isclose(out['fd_classifier'], frechet_distance(*compute_statistics(fc.run(clf, images)[1]),
                                                             *compute_statistics(ref_feats)))
    with torch.no_grad():
        cls = vit.tokens(torch.from_numpy(images).permute(0, 3, 1, 2))[:, 0].numpy()
    assert np.isclose(out['fd_vit'], frechet_distance(*compute_statistics(cls), *compute_statistics(ref_cls)))
    same = score_samples(ref_images, np.zeros(len(ref_images)), clf, ref_feats, vit, ref_cls)
    assert abs(same['fd_classifier']) < 1e-6 and abs(same['fd_vit']) < 1e-6


def test_probes_against_brute_force():
    from data.fashion.evaluate import probe_scores
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16)) * 3
    ya, yb = np.arange(200) % 10, np.arange(100) % 10
    a, b = centres[ya] + rng.normal(size=(200, 16)), centres[yb] + rng.normal(size=(100, 16))
    s = probe_scores(a, ya, b, yb)
    an, bn = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    assert np.isclose(s['one_nn'], np.mean([ya[np.argmax(an @ v)] == y for v, y in zip(bn, yb)]))
    means = np.stack([an[ya == k].mean(0) for k in range(10)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    assert np.isclose(s['ncm'], np.mean((bn @ means.T).argmax(1) == yb))
    assert s['linear'] > 0.9
    noise = probe_scores(rng.normal(size=(200, 16)), ya, rng.normal(size=(100, 16)), yb)
    assert noise['linear'] < 0.4                                                # chance is 0.1


def test_tokenizer_ceiling_reports(prepared):
    from data.fashion import classifier as fc
    from data.fashion.evaluate import tokenizer_ceiling
    from vqgan import load_vqgan
    torch.manual_seed(0)
    out = tokenizer_ceiling(load_vqgan(prepared['cfg'].vqgan), fc.FashionCNN(width=4, hidden=8).eval(),
                            prepared['cfg'].out_dir)
    assert out['n'] == 20 and out['mse'] > 0 and 0 < out['codebook_usage'] <= 1
    assert np.isclose(out['psnr'], 10 * np.log10(4 / out['mse']))
    assert abs(out['test_images']['fd_classifier']) < 1e-6 and out['reconstruction']['fd_classifier'] > 0


@pytest.mark.skipif(not os.path.isdir(REAL), reason='Fashion-MNIST is not installed (apt-get install -y '
                                                   'dataset-fashion-mnist)')
def test_real_files_shapes_and_class_counts():
    data = fp.load_fashion(REAL)
    images, labels, _ = data['train']
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [6000] * 10
    images, labels, _ = data['val']
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


def test_encode_stage_is_skipped_when_unchanged(prepared, capsys):
    meta = fp.encode_dataset(prepared['cfg'], progress=False)
    assert 'skipping' in capsys.readouterr().out and meta == prepared['meta']


@pytest.mark.parametrize('at_encode', [True, False])
def test_patch_targets_of_the_vit(prepared, tmp_path, at_encode):
    """--patch_targets=True writes the ViT's patch tokens on the code grid, in the same pass as the globals (at the
    encode) or added to an encoded dir; they equal the teacher's tokens pooled to the grid, and the globals stay."""
    import shutil
    from data.common import open_patch_targets, read_meta
    from data.encode import resample_patch_grid
    from teacher import ViTTeacher
    cfg = prepared['cfg']
    out = str(tmp_path / 'data')
    shutil.copytree(cfg.out_dir, out)
    if at_encode:
        os.remove(os.path.join(out, 'meta.json'))
    cfg = fp.FashionConfig(**{**vars(cfg), 'out_dir': out, 'patch_targets': True})
    meta = fp.encode_dataset(cfg, progress=False)
    assert meta == read_meta(out) and meta['teacher_patch']['grid'] == [8, 8]
    assert meta['teacher_patch']['source_grid'] == [2, 2] and meta['teacher_patch']['dim'] == 32  # 28 px / 14
    patches = open_patch_targets(out, 'val', meta)
    assert patches.shape == (20, 64, 32) and patches.dtype == np.float16
    images = np.load(os.path.join(out, 'val_images.npy'))
    vit = ViTTeacher(weights=cfg.teacher, image_size=28)
    _, tokens = vit.embed(torch.from_numpy(images).permute(0, 3, 1, 2), return_tokens=True)  # (20, 4, 32)
    ref = resample_patch_grid(tokens, (2, 2), (8, 8)).numpy()                               # (20, 64, 32)
    assert np.allclose(np.asarray(patches, np.float32), ref, atol=2e-3)
    glob = [np.fromfile(os.path.join(d, 'val_teacher.bin'), np.float16).astype(np.float32)
            for d in (out, prepared['cfg'].out_dir)]
    assert np.allclose(*glob, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# the fashion world of scripts/experiment.py

def _experiment():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import experiment
    return experiment


def test_fashion_cells_and_plan(tmp_path, capsys):
    ex = _experiment()
    assert str(ex.Cell.parse('fashion:vit_shuffled:1:4:1')) == 'fashion:vit_shuffled:1:4:1'
    for bad in ('default:vit:1:4:1', 'fashion:scene:1:4:1'):
        with pytest.raises(ValueError, match='teacher one of'):
            ex.Cell.parse(bad)
    cfg = ex.ExperimentConfig(plan='fashion', out_dir=str(tmp_path), data_root=str(tmp_path / 'data'))
    runs = ex.planned_runs(cfg)
    assert len(runs) == 15 and {s for _, s, _ in runs} == {0, 1, 2} and {n for _, _, n in runs} == {3000}
    assert {c.teacher for c, _, _ in runs} == {'none', 'vit', 'clip', 'vit_shuffled', 'clip_shuffled'}
    assert ex.data_dir(cfg, ex.Cell.parse('fashion:none:0:4:1')).endswith('fashion_clip')
    steps = {name for name, _, _ in ex.prepare_steps(cfg, 'fashion', 'vit')}
    assert steps == {'images', 'tokenizer', 'classifier', 'teacher', 'encode', 'reference'}
    assert ex.print_plan(cfg, runs) > 15 * 3000 * ex.SEC_PER_STEP(4) / 60
    assert 'fashion_vit' in capsys.readouterr().out
    with pytest.raises(ValueError, match='--plan=fashion'):
        ex.planned_runs(ex.ExperimentConfig(plan='screen', worlds='fashion'))


def test_fashion_report_tables(tmp_path):
    ex = _experiment()
    rows = []
    for seed in range(3):
        for cell, acc in (('fashion:none:0:4:1', 0.7), ('fashion:vit:1:4:1', 0.72)):
            c = ex.Cell.parse(cell)
            rows.append(dict(cell=cell, world='fashion', teacher=c.teacher, seed=seed, step=3000,
                             prompt_acc=acc + 0.01 * seed, frechet_evaluator=5.0 - seed, val_ce=2.0,
                             fd_vit=100.0 - 3 * (c.teacher != 'none') + seed))
    summary = ex.summarise(rows, (3000,))
    table = summary['fashion@3000']
    assert np.isclose(table['fashion:vit:1:4:1']['paired']['prompt_acc'][0], 0.02)
    assert np.isclose(table['fashion:vit:1:4:1']['paired']['fd_vit'][0], -3.0)  # FD-ViT is paired too
    text = ex.markdown(summary)
    header = next(line for line in text.splitlines() if line.startswith('| cell'))
    assert header.split(' | ')[2:] == ['class acc.', 'vs baseline', 'FD (classifier)', 'vs baseline', 'val CE',
                                       'vs baseline', 'FD-ViT (CLS)', 'vs baseline |']
    assert '-3.0' in text and 'bg colour' not in text and 'GenEval' not in text
    # the global-vs-patch table of the fashion world names the same columns
    rows += [dict(r, cell='fashion:vit:0.5:4:1:patch', prompt_acc=0.75) for r in rows if r['teacher'] == 'vit']
    text = ex.target_markdown(ex.summarise(rows, (3000,)))
    assert '### global vs patch: fashion world, step 3000' in text and '| patch (w 0.5) |' in text
    assert 'class acc.' in text and 'FD-ViT (CLS)' in text and 'GenEval' not in text


def test_fashion_scorer_reference_and_ceiling(prepared, tmp_path):
    """The experiment's fashion scorer on tiny stand-ins: prompts -> classes, both FDs against the cached reference
    features of the test split (0 for the test images themselves), and the tokenizer ceiling file."""
    from data.fashion import classifier as fc
    from utils import atomic_torch_save
    ex = _experiment()
    root = tmp_path / 'data_root'
    root.mkdir()
    os.symlink(prepared['cfg'].out_dir, root / 'fashion_vit')
    cfg = ex.ExperimentConfig(plan='fashion', out_dir=str(tmp_path / 'out'), data_root=str(root),
                              fashion_vqgan=prepared['cfg'].vqgan, fashion_classifier=str(tmp_path / 'clf.pt'),
                              fashion_vit_samples=8, grid_per_prompt=2,
                              fashion_prompts=20)
    torch.manual_seed(0)
    clf = fc.FashionCNN(width=4, hidden=8)
    atomic_torch_save(dict(kind=fc.CLASSIFIER_KIND, model=clf.state_dict(), config=dict(width=4, hidden=8),
                           test_accuracy=0.5), cfg.fashion_classifier)
    os.makedirs(os.path.dirname(ex.fashion_vit_path(cfg)))
    tiny_vit(112).save(ex.fashion_vit_path(cfg))
    scorer = ex.FashionScorer(cfg, str(root / 'fashion_vit'))
    assert os.path.exists(ex.fashion_reference_path(cfg)) and scorer.ref['vit_cls'].shape == (20, 32)
    images = np.load(os.path.join(prepared['cfg'].out_dir, 'val_images.npy'))
    with open(os.path.join(prepared['cfg'].out_dir, 'val_captions.txt')) as f:
        prompts = f.read().splitlines()
    m = scorer.score(images, prompts)
    labels = np.load(os.path.join(prepared['cfg'].out_dir, 'val_labels.npy'))
    assert m['prompt_acc'] == float((fc.run(scorer.classifier, images)[0].argmax(1) == labels).mean())
    assert abs(m['frechet_evaluator']) < 1e-6 and abs(m['fd_vit']) < 1e-6
    ceiling = ex.tokenizer_ceiling(cfg, 'fashion')
    assert ceiling['n_prompts'] == 20 and 0 <= ceiling['prompt_acc'] <= 1 and ceiling['frechet_evaluator'] > 0
    assert os.path.exists(os.path.join(cfg.out_dir, 'ceiling_fashion.json'))


def test_fashion_run_end_to_end(prepared, tmp_path):
    """One fashion run of the experiment on the tiny prepared data: train.py for 2 steps, 20 samples scored by the
    fashion scorer, the row recorded with class accuracy and both FDs."""
    import json
    from data.fashion import classifier as fc
    from utils import atomic_torch_save
    ex = _experiment()
    root = tmp_path / 'data_root'
    root.mkdir()
    os.symlink(prepared['cfg'].out_dir, root / 'fashion_vit')
    cfg = ex.ExperimentConfig(plan='fashion', out_dir=str(tmp_path / 'out'), data_root=str(root), stages=(2,),
                              schedule_steps=2, full_score_steps=(2,), fashion_prompts=20,
                              fashion_vqgan=prepared['cfg'].vqgan, fashion_classifier=str(tmp_path / 'clf.pt'),
                              fashion_vit_samples=8, grid_per_prompt=2, record=str(tmp_path / 'record.jsonl'),
                              train_args='--n_head=2 --n_embd=32 --batch_size=4 --peak_flops=1e11 --eval_rows=20 '
                                         '--warmup_iters=1')
    torch.manual_seed(0)
    atomic_torch_save(dict(kind=fc.CLASSIFIER_KIND, model=fc.FashionCNN(4, 8).state_dict(),
                           config=dict(width=4, hidden=8), test_accuracy=0.5), cfg.fashion_classifier)
    os.makedirs(os.path.dirname(ex.fashion_vit_path(cfg)))
    tiny_vit(112).save(ex.fashion_vit_path(cfg))
    ex.run_one(cfg, ex.Cell.parse('fashion:vit:1:2:1'), seed=0, steps=2)
    rows = ex.read_jsonl(os.path.join(cfg.out_dir, 'results.jsonl'))
    assert len(rows) == 1 and rows[0]['n_prompts'] == 20 and rows[0]['world'] == 'fashion'
    assert 0 <= rows[0]['prompt_acc'] <= 1 and rows[0]['frechet_evaluator'] > 0 and rows[0]['fd_vit'] > 0
    assert rows[0]['n_fd_vit'] == 8
    json.dumps(rows[0])
    # the record (--record) holds the same row, with the draw it was scored on: the tokenizer's sha256
    assert ex.read_jsonl(cfg.record) == rows and rows[0]['draw'] == rows[0]['vqgan_sha256'][:12]
    # the side-by-side grid: a row per class prompt; the same run twice gives twice the same columns (same noise)
    cell = ex.Cell.parse('fashion:vit:1:2:1')
    path, grid = ex.side_by_side(cfg, [cell, cell])
    assert grid.shape == (10, 4, 32, 32, 3) and np.array_equal(grid[:, :2], grid[:, 2:]) and os.path.exists(path)
    assert not np.array_equal(grid[:, 0], grid[:, 1])  # two samples of a prompt draw different noise
