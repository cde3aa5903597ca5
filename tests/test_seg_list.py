"""dataset.seg_list: the segmenter trains on the pseudo labels of its own list (the references' train_aug),
while seeds and pseudo labels are still scored on the infer list."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advcam.utils.errors import AdvcamError

from conftest import TINY


def _cfg(*extra: str):
    from advcam import config

    return config.load(None, [*TINY, "cam.method=cam", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One classifier; cams + refine once with the default seg list (= infer) and once with train_aug."""
    from advcam.steps import cams, prepare, refine, train_cls

    root = tmp_path_factory.mktemp("seg_list")
    out = {}
    for name, extra in (("infer", ()), ("aug", ("dataset.seg_list=train_aug",))):
        cfg = _cfg(*extra)
        d = root / name
        prepare.run(cfg, d / "data")
        if name == "infer":
            train_cls.run(cfg, d / "data", root / "cls.pt", root / "cls.csv")
        cams.run(cfg, d / "data", root / "cls.pt", d / "cams", d / "seeds.json", d / "curve.csv")
        refine.run(cfg, d / "data", d / "cams", d / "pseudo", d / "pseudo.json")
        out[name] = (cfg, d)
    return out


def test_seg_list_gets_maps_and_labels_but_scores_stay_on_the_infer_list(runs):
    from advcam.data import load_info

    _, plain = runs["infer"]
    _, aug = runs["aug"]
    info = load_info(aug / "data")
    infer, seg = info.lists["infer"], info.lists["seg"]
    assert len(infer) == 10 and len(seg) == 24 and set(infer) < set(seg)
    assert load_info(plain / "data").lists["seg"] == infer  # null = the infer list
    assert sorted(p.stem for p in (aug / "cams").glob("*.npz")) == sorted(seg)
    assert sorted(p.stem for p in (aug / "pseudo").glob("*.png")) == sorted(seg)
    assert sorted(p.stem for p in (plain / "cams").glob("*.npz")) == sorted(infer)
    for name in ("seeds.json", "pseudo.json"):  # per-image results: the extra images change no score
        a, b = json.loads((plain / name).read_text()), json.loads((aug / name).read_text())
        assert a == b and a["num_images"] == 10
    for image_id in infer:
        np.testing.assert_array_equal(np.array(Image.open(plain / "pseudo" / f"{image_id}.png")),
                                      np.array(Image.open(aug / "pseudo" / f"{image_id}.png")))


def test_train_seg_trains_on_the_seg_list(runs, tmp_path: Path, monkeypatch):
    from advcam.data import load_info
    from advcam.steps import train_seg

    cfg, aug = runs["aug"]
    seg = load_info(aug / "data").lists["seg"]
    seen = {}

    def spy(model, dataset, **kw):
        seen["ids"] = list(dataset.ids)
        return []

    monkeypatch.setattr(train_seg, "train_segmenter", spy)
    train_seg.run(cfg, aug / "data", aug / "pseudo", tmp_path / "seg.pt", tmp_path / "seg.csv")
    assert seen["ids"] == seg
    victim = next(i for i in seg if i not in load_info(aug / "data").lists["infer"])
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for image_id in seg:
        if image_id != victim:
            (pseudo / f"{image_id}.png").write_bytes((aug / "pseudo" / f"{image_id}.png").read_bytes())
    with pytest.raises(AdvcamError, match=victim):  # a seg-only image without its pseudo label stops the stage
        train_seg.run(cfg, aug / "data", pseudo, tmp_path / "seg.pt", tmp_path / "seg.csv")


def test_unknown_seg_list_is_named(tmp_path: Path):
    from advcam.steps import prepare

    with pytest.raises(AdvcamError, match="nope"):
        prepare.run(_cfg("dataset.seg_list=nope"), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_folder_prepared_before_the_seg_role_reads_as_seg_equals_infer(runs, tmp_path: Path):
    import shutil

    from advcam.data import load_info

    _, plain = runs["infer"]
    old = tmp_path / "old"
    shutil.copytree(plain / "data", old)
    (old / "lists" / "seg.txt").unlink()
    info = load_info(old)
    assert info.lists["seg"] == info.lists["infer"] and info.map_ids() == info.lists["infer"]
    (old / "lists" / "infer.txt").unlink()  # the required roles still are required, by name
    with pytest.raises(AdvcamError, match="lists/infer.txt"):
        load_info(old)


def test_stages_refuse_params_that_name_other_lists_than_the_prepared_folder(runs, tmp_path: Path):
    """A stage reads its images from the prepared folder's lists: `--set dataset.seg_list=train_aug` on a folder
    prepared for the infer list stops with a message naming the key and the folder, instead of being ignored."""
    from advcam.steps import cams, evaluate, refine, train_cls, train_seg

    plain_cfg, plain = runs["infer"]
    aug_cfg, aug = runs["aug"]
    with pytest.raises(AdvcamError, match=r"train-seg: dataset.seg_list gives the seg list 'train_aug', but .* was "
                                          r"prepared with 'train'"):
        train_seg.run(aug_cfg, plain / "data", plain / "pseudo", tmp_path / "seg.pt", tmp_path / "seg.csv")
    calls = [("train-cls", lambda c, d: train_cls.run(c, d, tmp_path / "c.pt", tmp_path / "c.csv")),
             ("cams", lambda c, d: cams.run(c, d, tmp_path / "c.pt", tmp_path / "cams", tmp_path / "s.json",
                                            tmp_path / "s.csv")),
             ("refine", lambda c, d: refine.run(c, d, aug / "cams", tmp_path / "pseudo", tmp_path / "p.json")),
             ("evaluate", lambda c, d: evaluate.run(c, d, tmp_path / "seg.pt", aug / "cams", aug / "pseudo",
                                                    tmp_path / "m.json", tmp_path / "plots"))]
    for what, call in calls:
        with pytest.raises(AdvcamError, match=rf"^{what}: dataset.seg_list gives the seg list 'train'"):
            call(plain_cfg, aug / "data")
    with pytest.raises(AdvcamError, match=r"dataset.val_list gives the val list 'train'"):
        train_cls.run(_cfg("dataset.val_list=train"), plain / "data", tmp_path / "c.pt", tmp_path / "c.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
