"""Training augmentation (data/augment.py): the transforms, the per-item hook, --augment."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import train
from data import augment
from data.augment import (
    TRANSFORMS,
    Augmenter,
    binary,
    distort,
    fit_into,
    legible,
    low_res,
    parse_level,
    with_shares,
)
from data.dataset import FormulaDataset
from data.image import ImageError, ink_bbox
from data.vocab import Vocab
from model.checkpoint import load_checkpoint
from tests.conftest import TINY_MODEL
from training.config import parse_args


@pytest.fixture(scope="module")
def train_ds(tiny_dataset):
    vocab = Vocab.load(tiny_dataset / "vocab.json")
    return FormulaDataset(tiny_dataset / "shards" / "train", vocab)


def dark_on_light(img: np.ndarray) -> bool:
    """Paper (the most common level) clearly lighter than the darkest ink."""
    paper = np.bincount(img.ravel(), minlength=256).argmax()
    return img.dtype == np.uint8 and img.ndim == 2 and paper >= 150 and img.min() < paper - 60


@pytest.mark.parametrize("name,fn", [(n, f) for n, _, f in with_shares(0.5, 0.5)],
                         ids=lambda v: str(v))
def test_each_transform_changes_the_image_and_keeps_it_uint8_dark_on_white(train_ds, name, fn):
    for i in (0, len(train_ds) // 2, len(train_ds) - 1):
        img = train_ds[i][0]
        before = img.copy()
        out = fn(img, np.random.default_rng(i), 1.0)
        assert np.array_equal(img, before), f"{name} modified its input"
        assert dark_on_light(out), name
        assert out.shape != img.shape or not np.array_equal(out, img), f"{name} changed nothing"


def test_augmented_items_keep_their_bucket_shape_and_the_ink_stays_inside(train_ds):
    aug = Augmenter(1.0, seed=1)
    changed = 0
    for i in range(len(train_ds)):
        img = train_ds[i][0]
        out = aug(img, 0, i)
        assert out.shape == img.shape and out.dtype == np.uint8
        if not np.array_equal(out, img):
            changed += 1
            top, bottom, left, right = ink_bbox(out, threshold=250)
            # normalization leaves paper all around; the bucket's spare room is right/bottom
            assert top >= 1 and left >= 1 and dark_on_light(out), i
            assert (out[:, -1] >= 250).all() and (out[-1] >= 250).all(), i
    # at strength 1 most images are augmented; a minority is refused and left clean
    assert changed >= 0.5 * len(train_ds) and aug.fallbacks <= 0.25 * len(train_ds)


def test_the_same_seed_epoch_and_index_give_the_same_image(train_ds):
    a, b, c = Augmenter(1.0, seed=5), Augmenter(1.0, seed=5), Augmenter(1.0, seed=6)
    imgs = [train_ds[i][0] for i in range(10)]
    first = [a(img, 3, i) for i, img in enumerate(imgs)]
    assert all(np.array_equal(x, b(img, 3, i)) for i, (x, img) in enumerate(zip(first, imgs)))
    assert any(not np.array_equal(x, a(img, 4, i)) for i, (x, img) in enumerate(zip(first, imgs)))
    assert any(not np.array_equal(x, c(img, 3, i)) for i, (x, img) in enumerate(zip(first, imgs)))


def test_the_dataset_hook_follows_the_epoch_and_leaves_padding_entries_alone(tiny_dataset):
    vocab = Vocab.load(tiny_dataset / "vocab.json")
    ds = FormulaDataset(tiny_dataset / "shards" / "train", vocab, augment=Augmenter(1.0, 0))
    plain = FormulaDataset(tiny_dataset / "shards" / "train", vocab)
    epoch0 = [ds[i][0] for i in range(10)]
    ds.set_epoch(1)
    assert any(not np.array_equal(x, ds[i][0]) for i, x in enumerate(epoch0))
    assert any(not np.array_equal(x, plain[i][0]) for i, x in enumerate(epoch0))
    for i in range(10):  # a padding entry carries no targets: nothing to train, no work
        img, ids = ds[-1 - i]
        assert ids is None and np.array_equal(img, plain[i][0])


def test_low_res_shrinks_to_a_small_image_that_normalization_brings_back(train_ds):
    img = train_ds[len(train_ds) // 2][0]
    top, bottom, left, right = ink_bbox(img, threshold=250)
    factors = []
    for seed in range(12):
        small = low_res(img, np.random.default_rng(seed), 1.0)
        factors.append(small.shape[1] / img.shape[1])
    assert 0.59 <= min(factors) < 0.7 and max(factors) <= 0.86  # 0.6x-0.85x at full strength
    assert max(low_res(img, np.random.default_rng(0), 0.1).shape[1] / img.shape[1]
               for _ in range(3)) == pytest.approx(0.85, abs=0.01)  # the least it shrinks


@pytest.mark.parametrize("share", ["low_res", "binary"])
def test_a_share_adds_its_transform_and_none_keeps_older_runs_images(train_ds, share):
    assert with_shares() is TRANSFORMS and with_shares(0.0, 0.0) is TRANSFORMS
    assert [n for n, _, _ in with_shares(**{f"{share}_share": 0.3})][:2] == ["scale", share]
    assert [n for n, _, _ in with_shares(0.3, 0.2)][:3] == ["scale", "low_res", "binary"]
    old = Augmenter(0.75, 5)
    none, some = Augmenter(0.75, 5, **{share: 0.0}), Augmenter(0.75, 5, **{share: 1.0})
    imgs = [train_ds[i][0] for i in range(12)]
    assert all(np.array_equal(old(x, 0, i), none(x, 0, i)) for i, x in enumerate(imgs))
    assert any(not np.array_equal(old(x, 0, i), some(x, 0, i)) for i, x in enumerate(imgs))
    with pytest.raises(ValueError, match="share must be in"):
        Augmenter(0.5, 0, **{share: 1.5})


def test_binary_leaves_only_ink_and_paper_with_a_cut_that_keeps_strokes(train_ds):
    """Hard edges, as a rasterizer without anti-aliasing draws; the cut lies between half
    coverage and near the paper, so strokes keep at least their solid core and at most
    swallow their soft edge."""
    img = train_ds[len(train_ds) // 2][0]
    for seed in range(8):
        out = binary(img, np.random.default_rng(seed), 0.75)
        assert out.shape == img.shape and set(np.unique(out)) <= {0, 255}
        assert np.count_nonzero(img < 128) <= np.count_nonzero(out == 0)
        assert np.count_nonzero(out == 0) <= np.count_nonzero(img < 0.8 * 255 + 1)


def test_a_refused_normalization_falls_back_to_the_clean_image(train_ds, monkeypatch):
    def refuse(img, **k):
        raise ImageError("too many ink components (noise?)")

    monkeypatch.setattr(augment, "normalize_user_image", refuse)
    aug = Augmenter(1.0, seed=0)
    for i in range(10):
        img = train_ds[i][0]
        assert aug(img, 0, i) is img
    assert aug.fallbacks >= 5


def test_a_shrunk_or_blotted_result_is_not_legible(train_ds):
    img = train_ds[len(train_ds) // 2][0]
    assert legible(img, img)
    h, w = img.shape
    half = np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.Resampling.LANCZOS))
    assert not legible(img, np.pad(half, ((0, h - h // 2), (0, w - w // 2)),
                                   constant_values=255))
    blot = np.asarray(Image.fromarray(img).filter(ImageFilter.MinFilter(5)))
    assert not legible(img, blot)


def test_fit_into_pastes_top_left_shrinks_a_little_and_refuses_a_lot():
    small = np.zeros((10, 20), np.uint8)
    out = fit_into(small, (40, 120))
    assert out.shape == (40, 120) and (out[:10, :20] == 0).all() and (out[10:] == 255).all()
    assert (out[:, 20:] == 255).all()
    wide = np.zeros((20, 140), np.uint8)  # 120/140 = 0.86: shrunk
    assert fit_into(wide, (40, 120)).shape == (40, 120)
    assert fit_into(np.zeros((20, 200), np.uint8), (40, 120)) is None  # 0.6: refused


def test_distort_crops_the_bucket_padding_first(train_ds):
    img = train_ds[0][0]
    class NoDraw:  # every transform skipped: only the crop to the ink remains
        def random(self):
            return 1.0
    out = distort(img, NoDraw(), 1.0)
    top, bottom, left, right = ink_bbox(img, threshold=250)
    assert out.shape == (bottom - top, right - left)


def test_levels_parse_and_bad_ones_fail_clearly(capsys):
    assert parse_level("none") == 0.0 and parse_level("light") == 0.5
    assert parse_level("strong") == 1.0 and parse_level("0.3") == 0.3
    for bad in ("2", "-0.1", "nan", "heavy"):
        with pytest.raises(ValueError):
            parse_level(bad)
    with pytest.raises(SystemExit) as e:
        parse_args(["--data_path", "x", "--save_dir", "y", "--augment", "heavy"])
    assert e.value.code == 2 and "--augment" in capsys.readouterr().err
    for flag in ("--augment_low_res", "--augment_binary"):
        with pytest.raises(SystemExit) as e:
            parse_args(["--data_path", "x", "--save_dir", "y", flag, "2"])
        assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--augment_low_res", "--augment_binary"])
def test_a_share_without_augmentation_is_refused(tiny_dataset, tmp_path, capsys, flag):
    """It shares out augmented images: alone it would silently do nothing."""
    assert train.main(["--data_path", str(tiny_dataset), "--save_dir", str(tmp_path / "r"),
                       *COMMON, flag, "0.3"]) == 1
    assert f"{flag} shares out augmented images: it needs --augment" in capsys.readouterr().err


COMMON = [*TINY_MODEL, "--batch_size", "16", "--quiet", "--amp", "off"]


@pytest.fixture
def one_thread():
    """Training in-process with one thread, as the scripts' tests run (--threads 1), restored
    afterwards so that the rest of the session keeps pytest's setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(tiny_dataset, save_dir, *extra) -> dict:
    assert train.main(["--data_path", str(tiny_dataset), "--save_dir", str(save_dir),
                       *COMMON, *extra]) == 0
    return load_checkpoint(save_dir / "last.pt")


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_augment_none_trains_exactly_as_without_the_flag(tiny_dataset, tmp_path, one_thread):
    plain = run(tiny_dataset, tmp_path / "plain", "--workers", "0", "--max_steps", "3")
    none = run(tiny_dataset, tmp_path / "none", "--workers", "0", "--max_steps", "3",
               "--augment", "none")
    strong = run(tiny_dataset, tmp_path / "strong", "--workers", "0", "--max_steps", "3",
                 "--augment", "strong")
    assert same_weights(plain, none) and none["args"]["augment"] == 0.0
    assert not same_weights(plain, strong)  # the augmentation reaches the model


def test_augmented_runs_repeat_exactly_across_workers_and_resume(tiny_dataset, tmp_path,
                                                                one_thread):
    """The images depend on (seed, epoch, index) only: two loader workers draw them as the main
    process does, and a run resumed after epoch 1 (taking --augment from the checkpoint) sees
    the epoch-2 images of an uninterrupted run."""
    a = run(tiny_dataset, tmp_path / "a", "--workers", "0", "--augment", "strong",
            "--epoches", "2")
    b = tmp_path / "b"
    run(tiny_dataset, b, "--workers", "2", "--augment", "strong", "--epoches", "1")
    first = [list(csv.DictReader(open(d / "log.csv")))[0] for d in (tmp_path / "a", b)]
    assert first[0]["train_loss"] == first[1]["train_loss"]  # the same loss, epoch 1
    resumed = run(tiny_dataset, b, "--workers", "2", "--epoches", "2", "--from_check_point")
    assert resumed["args"]["augment"] == 1.0 and a["step"] == resumed["step"]
    assert same_weights(a, resumed)
