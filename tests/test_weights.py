"""Offline ImageNet weights, local weights files, and the m-per-class sampler."""
from __future__ import annotations

import bson
import numpy as np
import pytest
import torch
from conftest import shared_file

from retrieval.data.images import decode_image
from retrieval.model.network import create_backbone
from retrieval.train.sampler import MPerClassSampler

GRANNY_SMITH = 948  # ImageNet class index


@pytest.mark.parametrize("name,stages", [("efficientnet_lite0", (1, 2, 2, 3, 3, 4, 1)),
                                         ("efficientnet_lite2", (1, 3, 3, 4, 4, 5, 1))])
def test_efficientnet_lite_weights_load_strict_and_recognise_a_real_apple(name, stages):
    import timm

    from retrieval.model.weights import load_imagenet_state
    ref = timm.create_model(f"tf_{name}", pretrained=False)
    assert tuple(len(s) for s in ref.blocks) == stages  # lite2 repeats its middle stages more than lite0
    ref.load_state_dict(load_imagenet_state(name, stages), strict=True)
    ref.eval()
    ours, dim, mean, std = create_backbone(name, "imagenet", image_size=224)
    assert dim == 1280 and mean == (0.5, 0.5, 0.5)
    docs = bson.decode_file_iter(open(shared_file("grocery/test.bson"), "rb"))
    apple = next(d for d in docs if d["category_id"] == 1_000_000_001)  # class 1: Granny-Smith apples
    x = torch.from_numpy(decode_image(apple["imgs"][0]["picture"])).permute(2, 0, 1)[None].float()
    x = (torch.nn.functional.interpolate(x, size=224, mode="bilinear") / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits, feats = ref(x), ours.eval()(x)
    assert int(logits.argmax()) == GRANNY_SMITH
    assert torch.allclose(feats, ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5)


def test_pretrained_file_path_loads_the_saved_weights(tmp_path):
    import open_clip
    src = open_clip.create_model("tiny", force_image_size=32)
    path = tmp_path / "tiny_weights.pt"
    torch.save(src.state_dict(), path)
    tower, *_ = create_backbone("tiny", pretrained=str(path), image_size=32)
    for k, v in src.visual.state_dict().items():
        assert torch.equal(tower.state_dict()[k], v), k


def test_m_per_class_sampler_groups_and_splits_across_ranks():
    labels = np.repeat(np.arange(6), [10, 7, 3, 1, 8, 12])
    labels[0] = -100  # an undecodable picture is never drawn
    s = MPerClassSampler(labels, m=4, seed=1)
    idx = np.array(list(iter(s)))
    groups = labels[idx].reshape(-1, 4)
    assert (groups == groups[:, :1]).all() and (labels[idx] >= 0).all()
    assert set(groups[:, 0]) == set(range(6))  # small classes are drawn with replacement
    assert len(idx) == len(s)
    assert not np.array_equal(idx, np.array(list(iter(s))))  # a new order every epoch
    whole = {tuple(g) for g in np.array(list(iter(MPerClassSampler(labels, 4, seed=1)))).reshape(-1, 4).tolist()}
    shares = [np.array(list(iter(MPerClassSampler(labels, 4, seed=1, rank=r, world=2)))).reshape(-1, 4).tolist()
              for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(whole) // 2  # equal shares of one epoch's groups
    g0, g1 = {tuple(g) for g in shares[0]}, {tuple(g) for g in shares[1]}
    assert g0 | g1 <= whole and not g0 & g1
