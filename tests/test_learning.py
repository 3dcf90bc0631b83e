"""What each learned part adds, checked against values computed independently here: LP-FT and its frozen
baselines, the BN-neck, GeM pooling, stage freezing, temperature scaling, and the fusion rules."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.infer.scoring.calibrate import GAMMAS, TEMPERATURES, calibrate, fit_temperature
from retrieval.infer.scoring.candidates import Candidates, class_sizes
from retrieval.infer.scoring.fused import FEATURES, FusedClassifier, load_fusion
from retrieval.model.config import ModelConfig
from retrieval.model.network import EmbeddingNet, GeM
from retrieval.train.config import PRETRAINED_RECIPE, LossSettings, TrainConfig
from retrieval.train.probe import Features, fit_new_layers, frozen_baseline


def _clusters(n_per: int, n_classes: int, dim: int, spread: float, seed: int, imgs: int = 1) -> Features:
    """Gaussian clusters: ``imgs`` images a product, ``n_per`` products a class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * 3
    y = torch.arange(n_classes).repeat_interleave(n_per * imgs)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    owner = torch.arange(n_classes * n_per).repeat_interleave(imgs)
    return Features(x, y, owner, n_classes * n_per)


def _knn_by_hand(train: Features, val: Features, k: int = 20, tau: float = 0.05) -> float:
    """Cosine kNN over product means, a plain loop (the oracle for frozen_baseline's kNN)."""
    def means(f: Features):
        out = {}
        for i in range(len(f.x)):
            v = f.x[i] / f.x[i].norm()
            out.setdefault(int(f.owner[i]), []).append((v, int(f.y[i])))
        keys = sorted(out)
        vecs = np.stack([np.mean([v.numpy() for v, _ in out[p]], 0) for p in keys])
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True), np.array([out[p][0][1] for p in keys])
    tx, ty = means(train)
    qx, qy = means(val)
    hits = 0
    for q, y in zip(qx, qy, strict=True):
        s = tx @ q
        top = np.argsort(-s)[:k]
        votes: dict[int, float] = {}
        for j in top:
            votes[int(ty[j])] = votes.get(int(ty[j]), 0.0) + float(np.exp((s[j] - s[top[0]]) / tau))
        hits += max(votes, key=votes.get) == y
    return hits / len(qy)


def test_linear_probe_step_fits_the_new_layers_and_reports_frozen_baselines():
    torch.manual_seed(0)
    net = EmbeddingNet(ModelConfig("tiny", None, 32, 16, 5))
    train, val = _clusters(30, 5, net.proj[0].in_features, 2.0, 1, imgs=2), _clusters(8, 5, net.proj[0].in_features,
                                                                                        2.0, 1, imgs=2)
    before = [p.detach().clone() for p in net.backbone.parameters()]
    acc = fit_new_layers(net, train, LossSettings(), epochs=20)
    assert acc > 0.95
    # the backbone untouched
    assert all(torch.equal(a, b) for a, b in zip(before, net.backbone.parameters(), strict=True))
    base = frozen_baseline(net, train, val, val.y[val.owner.unique_consecutive(return_counts=True)[1].cumsum(0) - 1]
                           .numpy())
    assert base.knn == pytest.approx(_knn_by_hand(train, val))
    net.eval()
    with torch.no_grad():  # the probe's accuracy: mean of image probabilities per product, by hand
        probs = net.head(net.neck(val.x)[1]).softmax(-1).numpy()
    per_product = np.stack([probs[val.owner.numpy() == p].mean(0) for p in range(val.n_products)])
    truth = np.array([int(val.y[val.owner == p][0]) for p in range(val.n_products)])
    assert base.linear_probe == pytest.approx(float((per_product.argmax(1) == truth).mean()))
    assert base.linear_probe > 0.9
    # a logit-adjusted probe is scored with its prior given back: a prior that swamps the logits picks class 3
    swamp = torch.tensor([0.0, 0.0, 0.0, 1e4, 0.0])
    shifted = frozen_baseline(net, train, val, truth, swamp)
    assert shifted.linear_probe == pytest.approx(float((truth == 3).mean())) and shifted.knn == base.knn


def test_lp_ft_run_applies_the_recipe_and_writes_the_frozen_baseline(small_data, tmp_path):
    """train() with a pretrained backbone (a local weights file) and --lp-epochs: frozen_baseline.json holds
    the kNN of the frozen tower (recomputed here by hand)."""
    import open_clip

    from retrieval.data.offsets import RecordReader, load_offsets
    from retrieval.train.probe import frozen_features
    from retrieval.train.run import train
    torch.manual_seed(0)
    src = open_clip.create_model("tiny", force_image_size=32)
    weights = tmp_path / "tiny.pt"
    torch.save(src.state_dict(), weights)
    # 200 LP epochs (one step each over the 182 cached features): enough for the probe to learn
    cfg = TrainConfig.build(pretrained=str(weights), image_size=32, embed_dim=16, batch_size=16, workers=0,
                            val_fraction=0.2, max_steps=1, lr=0.0, lp_epochs=200, warmup_fraction=0.5)
    assert cfg.schedule.lp_epochs == 200 and cfg.data.crop_min == PRETRAINED_RECIPE["crop_min"]  # recipe defaults
    res = train(small_data["train.bson"], tmp_path / "run", cfg, small_data["category_names.csv"], progress=False)
    saved = json.loads((tmp_path / "run" / "frozen_baseline.json").read_text())
    assert saved["knn"] == pytest.approx(res.frozen.knn) and saved["lp_epochs"] == 200
    # the kNN baseline, by hand, from the frozen tower's own features
    net = EmbeddingNet(ModelConfig("tiny", str(weights), 32, 16, 6))
    table = load_offsets(small_data["train.bson"])
    split = np.load(tmp_path / "run" / "split.npz")
    reader = RecordReader(small_data["train.bson"], table)
    cats = sorted(set(table["category_id"].tolist()))
    lab = lambda rows: np.array([cats.index(c) for c in table["category_id"][rows]])  # noqa: E731
    tr = frozen_features(net, reader, split["train_rows"], lab(split["train_rows"]), workers=0)
    va = frozen_features(net, reader, split["val_rows"], lab(split["val_rows"]), workers=0)
    assert saved["knn"] == pytest.approx(_knn_by_hand(tr, va))
    # the probe: a share of the validation products, and far above what always answering the validation split's
    # largest class scores (0.43 here; the fitted probe scores 0.73-0.87 over tower seeds, an unfitted one ~0.2)
    n_val = len(split["val_rows"])
    assert saved["val_products"] == n_val and round(saved["linear_probe"] * n_val, 6).is_integer()
    majority = np.bincount(lab(split["val_rows"])).max() / n_val
    assert saved["linear_probe"] >= majority + 0.2, (saved["linear_probe"], majority)


def test_bn_neck_classifies_the_normalised_feature_and_embeds_it():
    torch.manual_seed(0)
    net = EmbeddingNet(ModelConfig("tiny", None, 32, 8, 3)).eval()
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    pooled = net.pooled(x)
    f, z = net.neck(pooled)
    bn = net.proj[1]
    by_hand = (f - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(z, by_hand, atol=1e-5)
    emb, logits, _ = net(x)
    assert torch.allclose(emb, z / z.norm(dim=1, keepdim=True), atol=1e-5)
    assert torch.allclose(logits, z @ net.head.weight.T + net.head.bias, atol=1e-5)


def test_gem_is_average_pooling_at_p1_and_tends_to_max_pooling():
    x = torch.rand(2, 3, 5, 5) + 0.1
    gem = GeM(1.0)
    assert torch.allclose(gem(x), x.mean(dim=(2, 3)), atol=1e-6)
    gem = GeM(200.0)  # (mean x^p)^(1/p) >= max / 25^(1/p): within 2% of max pooling over 5 x 5
    assert torch.allclose(gem(x), x.amax(dim=(2, 3)), rtol=0.02)
    net = EmbeddingNet(ModelConfig("tiny", None, 32, 8, 3, pool="gem"))
    assert isinstance(net.backbone.trunk.global_pool, GeM)
    assert net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))[0].shape == (2, 8)


def test_frozen_stages_do_not_move_and_keep_their_statistics():
    torch.manual_seed(0)
    net = EmbeddingNet(ModelConfig("tiny", None, 32, 8, 3))
    n = net.freeze_blocks(1)
    trunk = net.backbone.trunk
    frozen = [trunk.conv1, trunk.bn1, trunk.layer1]  # the tiny tower is a ResNet
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
    later = {k: v.clone() for k, v in net.proj.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    _, logits, _ = net(torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8))
    torch.nn.functional.cross_entropy(logits, torch.arange(8) % 3).backward()
    opt.step()
    assert n > 0 and not any(p.requires_grad for m in frozen for p in m.parameters())
    for m, b in zip(frozen, before, strict=True):  # weights and batch-norm running statistics alike
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())
    assert any(not torch.equal(v, later[k]) for k, v in net.proj.state_dict().items())


def _cands(head: np.ndarray, sims: np.ndarray, labels: np.ndarray) -> Candidates:
    return Candidates.build(head, (sims, labels), np.ones(len(head), bool), m=head.shape[1])


def test_temperature_is_the_nll_minimiser_over_the_grid():
    rng = np.random.default_rng(0)
    n, c = 400, 6
    y = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), y] += 1.0
    logits *= 4  # an over-confident head: the best temperature is above 1
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cand = _cands(p, np.zeros((n, 1)), -np.ones((n, 1), np.int64))

    def nll(t):  # dense softmax of log p / t: the oracle
        s = np.log(p) / t
        s -= s.max(1, keepdims=True)
        return float(-(s[np.arange(n), y] - np.log(np.exp(s).sum(1))).mean())

    t = fit_temperature(cand, y)
    assert t == min(TEMPERATURES, key=nll) and t > 1


def test_fused_rule_matches_the_formula_by_hand():
    head = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    sims = np.array([[0.9, 0.8, 0.7], [0.95, 0.5, 0.4]])
    labels = np.array([[1, 1, 0], [2, 0, 2]])
    c = _cands(head, sims, labels)
    for alpha, k, tau in ((0.3, 3, 0.1), (0.8, 2, 0.05), (0.0, 3, 0.07)):
        clf = FusedClassifier(alpha, k, tau, beta=0.0)
        for i in range(2):
            w = {}
            for j in range(k):
                w[labels[i, j]] = w.get(labels[i, j], 0) + np.exp((sims[i, j] - sims[i, 0]) / tau)
            total = sum(w.values())
            fused = [alpha * head[i, cl] + (1 - alpha) * w.get(cl, 0) / total for cl in range(3)]
            assert clf.predict_candidates(c)[0][i, 0] == int(np.argmax(fused))
            got = clf.candidate_scores(c)[i]
            np.testing.assert_allclose(sorted(got[np.isfinite(got)]), sorted(fused), atol=1e-5)


def test_learnt_fusion_wins_where_trust_depends_on_closeness_and_not_on_noise():
    """The kNN is right when its nearest neighbour is close, the head otherwise: no fixed alpha gets both,
    a rule with a closeness feature does, and cross-validation says so."""
    rng = np.random.default_rng(1)
    n, c = 600, 8
    y = rng.integers(0, c, n)
    close = rng.random(n) < 0.5
    wrong = (y + 1 + rng.integers(0, c - 1, n)) % c
    knn_class = np.where(close, y, wrong)
    head_class = np.where(close, wrong, y)
    head = np.full((n, c), 0.02)
    head[np.arange(n), head_class] = 0.55 + 0.1 * rng.random(n)
    head[np.arange(n), knn_class] += 0.25
    head /= head.sum(1, keepdims=True)
    sims = np.where(close, 0.95, 0.5)[:, None] - 0.01 * np.arange(5)[None]
    labels = np.repeat(knn_class[:, None], 5, 1)
    cal = calibrate(_cands(head, sims, labels), y, fallback=0)
    grid_best = max(g["accuracy"] for g in cal.grid)
    pred = cal.classifier.predict_candidates(_cands(head, sims, labels))[0][:, 0]
    assert cal.classifier.rule == "learnt" and cal.cv_learnt > cal.cv_grid + 0.1
    assert float((pred == y).mean()) > grid_best + 0.1  # accuracy recomputed from the labels
    # pure noise: nothing to learn, the learnt rule must not beat the grid by fitting noise
    y2 = rng.integers(0, c, n)
    cal2 = calibrate(_cands(head, sims, labels), y2, fallback=0)
    assert cal2.cv_learnt <= cal2.cv_grid + 0.05


def test_long_tail_features_match_the_formula_by_hand():
    from index import VectorIndex
    index = VectorIndex.create(4, "Flat")
    vecs = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
    index.add(vecs, np.array([2, 2, 2, 0, -1, 2, 0, 2]))  # class 0: 2 products, 1: none, 2: 5; one unlabelled
    sizes = class_sizes(index)
    assert list(sizes) == [2, 0, 5] and class_sizes(index) is sizes  # counted once per labels array
    index.add(vecs[:1], np.array([1]))
    assert list(class_sizes(index)) == [2, 1, 5]  # an add replaces the labels: counted again
    head = np.array([[0.5, 0.3, 0.2]])
    c = Candidates.build(head, (np.array([[0.9, 0.8]]), np.array([[2, 0]])), np.ones(1, bool), m=3, sizes=sizes)
    f = FusedClassifier(k=2, tau=0.1).features(c)[0]
    w = {2: 1.0, 0: float(np.exp((0.8 - 0.9) / 0.1))}
    assert sorted(c.classes[0][c.classes[0] >= 0]) == [0, 1, 2]
    assert not f[c.classes[0] < 0].any()  # padding scores nothing
    for j, cls in enumerate(c.classes[0]):
        if cls < 0:
            continue
        n = {0: 2, 1: 0, 2: 5}[int(cls)]
        knn = w.get(int(cls), 0.0) / sum(w.values())
        assert f[j, FEATURES.index("log_size")] == pytest.approx(np.log(1 + n))
        assert f[j, FEATURES.index("knn_rare")] == pytest.approx(knn / np.sqrt(1 + n), rel=1e-5)


def test_class_size_rule_wins_where_the_head_leans_to_big_classes_and_not_on_noise():
    """The head prefers a big class over the true small one (0.45 vs 0.35) and the neighbours say nothing:
    only a rule that sees the class's size (a logit adjustment) gets the small classes right, and it must
    still get the big ones right; cross-validation picks it. On noise labels it must not win by fitting."""
    rng = np.random.default_rng(2)
    n, big, small = 800, 5, 5
    sizes = np.array([1000.0] * big + [3.0] * small)
    y = np.where(rng.random(n) < 0.5, rng.integers(0, big, n), big + rng.integers(0, small, n))
    other = np.where(y < big, (y + 1 + rng.integers(0, big + small - 1, n)) % (big + small), rng.integers(0, big, n))
    head = np.full((n, big + small), 0.01)
    head[np.arange(n), y] = np.where(y < big, 0.6, 0.35)
    head[np.arange(n), other] = np.where(y < big, 0.2, 0.45)
    head /= head.sum(1, keepdims=True)
    none = -np.ones((n, 3), np.int64)

    def cands() -> Candidates:
        return Candidates.build(head, (np.zeros((n, 3)), none), np.ones(n, bool), m=head.shape[1], sizes=sizes)
    cal = calibrate(cands(), y, fallback=0)
    assert cal.chosen == "learnt_tail" and cal.cv["learnt_tail"] > max(cal.cv["learnt"], cal.cv["grid"]) + 0.3
    small_rows = y >= big
    assert (cal.oof["learnt_tail"][small_rows] == y[small_rows]).mean() > 0.95  # out of fold, from the labels
    assert (cal.oof["learnt"][small_rows] == y[small_rows]).mean() < 0.05
    assert cal.classifier.coefficients[FEATURES.index("log_size")] < 0  # big classes pushed down: an adjustment
    noise = calibrate(cands(), rng.integers(0, big + small, n), fallback=0)
    assert noise.cv[noise.chosen] <= noise.cv["grid"] + 0.05


def test_a_calibration_saved_before_the_long_tail_features_loads_with_them_off(tmp_path):
    from retrieval.rundir import RunDir
    run = RunDir(tmp_path)
    base = [0.5, 0.4, 1.0, 0.1, 0.2, 0.3]
    for old in (base, base + [-0.2, 0.7]):  # saved before the size features, before the prototype ones
        run.write_calibration({"alpha": 0.5, "k": 10, "tau": 0.05, "beta": 1.0, "temperature": 1.0, "weights": old})
        clf = load_fusion(run, fallback=0)
        assert list(clf.coefficients) == pytest.approx(old + [0.0] * (len(FEATURES) - len(old)))
        assert not clf.uses_prototypes
    old = base + [-0.2, 0.7, 0.3]  # saved before the prototype vote: its cosine feature kept, the vote off
    run.write_calibration({"alpha": 0.5, "k": 10, "tau": 0.05, "beta": 1.0, "temperature": 1.0, "weights": old})
    assert list(load_fusion(run, fallback=0).coefficients) == pytest.approx(old + [0.0])
    run.write_calibration({"alpha": 0.5, "k": 10, "tau": 0.05, "beta": 1.0, "temperature": 1.0})  # an old grid
    assert load_fusion(run, fallback=0).gamma == 0 and not load_fusion(run, fallback=0).uses_prototypes
    from retrieval.infer.scoring.fused import FusionOverrides
    run.write_calibration({"alpha": 0.5, "k": 10, "tau": 0.05, "beta": 1.0, "temperature": 1.0, "gamma": 0.25,
                           "weights": old + [0.4]})
    assert load_fusion(run, 0).rule == "learnt" and not FusionOverrides(k=5).grid_given
    head_only = load_fusion(run, 0, FusionOverrides(alpha=1.0, beta=0.0))  # a given weight: the grid rule
    assert head_only.rule == "grid" and head_only.gamma == 0.25 and FusionOverrides(alpha=1.0).grid_given
    no_vote = load_fusion(run, 0, FusionOverrides(gamma=0.0))
    assert no_vote.rule == "grid" and not no_vote.uses_prototypes and (no_vote.alpha, no_vote.beta) == (0.5, 1.0)
    with pytest.raises(Exception, match="fusion weights must be"):
        FusedClassifier(weights=tuple(old[:5]))


def test_auto_lp_ft_is_on_for_short_budgets_only():
    from retrieval.errors import UserError
    from retrieval.train.config import AUTO_LP_EPOCHS, ScheduleSettings, lp_epochs_for
    auto = dict(lp_epochs=-1)
    assert lp_epochs_for(ScheduleSettings(epochs=2, **auto), 100) == AUTO_LP_EPOCHS
    assert lp_epochs_for(ScheduleSettings(epochs=3, **auto), 100) == 0
    assert lp_epochs_for(ScheduleSettings(epochs=8, max_steps=150, **auto), 100) == AUTO_LP_EPOCHS  # 1.5 passes
    assert lp_epochs_for(ScheduleSettings(epochs=1, max_steps=250, **auto), 100) == 0  # 2.5 passes
    assert lp_epochs_for(ScheduleSettings(epochs=1, lp_epochs=0), 100) == 0  # given values are kept
    assert lp_epochs_for(ScheduleSettings(epochs=8, lp_epochs=7), 100) == 7
    with pytest.raises(UserError, match="lp_epochs"):
        TrainConfig.build(lp_epochs=-2)


def test_without_lp_ft_the_baseline_is_measured_and_the_new_layers_are_put_back(small_data, tmp_path):
    import open_clip

    from retrieval.model.export import load_model_file
    from retrieval.train.run import train
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("tiny", force_image_size=32).state_dict(), weights)
    heads = {}
    for name, extra in (("measured", {}), ("plain", {"frozen_baseline": False})):
        cfg = TrainConfig.build(pretrained=str(weights), image_size=32, embed_dim=16, batch_size=16, workers=0,
                                val_fraction=0.2, max_steps=1, lr=0.0, lp_epochs=0, **extra)
        train(small_data["train.bson"], tmp_path / name, cfg, small_data["category_names.csv"], progress=False)
        heads[name] = load_model_file(tmp_path / name / "model.pt").net.head.weight
    assert (tmp_path / "measured" / "frozen_baseline.json").exists()
    assert not (tmp_path / "plain" / "frozen_baseline.json").exists()
    assert torch.equal(heads["measured"], heads["plain"])  # the probe fitted for the report was not kept


def test_class_size_arcface_margins_match_the_formula_by_hand():
    """Margins run from margin_min (largest class) to margin (smallest), linear in n ** -0.25; the loss is the
    cross-entropy of scaled cosines with cos(theta + m_y) at the target, computed here by hand (one sub-center)."""
    from retrieval.train.losses import ClassSizeSubCenterArcFace, MetricLoss
    counts = np.array([256, 16, 1])
    loss = ClassSizeSubCenterArcFace(counts, 10.0, num_classes=3, embedding_size=4, margin=30.0, scale=8.0,
                                     sub_centers=1)
    r = counts ** -0.25
    want_m = np.radians(10 + (r - r.min()) / (r.max() - r.min()) * 20)
    assert np.allclose(loss.class_margin.numpy(), want_m, atol=1e-6) and loss.class_margin[0] < loss.class_margin[2]
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 2, 0])
    with torch.no_grad():
        loss.W.copy_(torch.randn(4, 3, generator=g))
    cos = (torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(loss.W, dim=0)).detach()
    logits = cos.clone().double()
    for i, y in enumerate(labels.tolist()):
        logits[i, y] = np.cos(np.arccos(float(cos[i, y])) + want_m[y])
    want = torch.nn.functional.cross_entropy(8.0 * logits, labels)
    assert abs(float(loss(emb, labels)) - float(want)) < 1e-4
    # the setting reaches the loss through the config; equal margins are plain SubCenterArcFace
    cfg = TrainConfig.build(metric_loss="subcenter_arcface", arcface_margin_min=10.0).loss
    assert isinstance(MetricLoss(cfg, 3, 4, counts).loss, ClassSizeSubCenterArcFace)
    with pytest.raises(ValueError, match="per class"):  # no silent stand-in for the class sizes
        MetricLoss(cfg, 3, 4)
    with pytest.raises(Exception, match="arcface_margin_min"):
        TrainConfig.build(arcface_margin_min=40.0)


def test_prototype_candidates_and_feature_match_the_formula_by_hand():
    from index import class_sums, prototypes
    from retrieval.infer.scoring.candidates import PROTO_TOP
    from retrieval.infer.scoring.fused import PROTO_SHARE_TAU, PROTO_TAU
    rng = np.random.default_rng(3)
    vecs, lab = rng.normal(size=(30, 4)), rng.integers(-1, 6, 30)
    lab[lab == 4] = 5  # class 4 has no product
    sums = class_sums([vecs[:11], vecs[11:]], lab)
    for cls in range(6):
        assert np.allclose(sums[cls], vecs[lab == cls].sum(0))  # summed across blocks, unlabelled left out
    protos = prototypes(sums)
    assert not protos[4].any() and np.allclose(np.linalg.norm(protos[[0, 1, 2, 3, 5]], axis=1), 1)
    n_cls = 12
    head = np.full((1, n_cls), 1.0 / n_cls)
    head[0, :3] = [0.5, 0.3, 0.1]
    proto_sims = rng.uniform(-0.2, 0.2, (1, n_cls))
    proto_sims[0, [7, 9, 10, 11, 8]] = [0.9, 0.8, 0.7, 0.6, 0.5]
    c = Candidates.build(head, (np.array([[0.9]]), np.array([[2]])), np.ones(1, bool), m=3, proto_sims=proto_sims)
    got = set(c.classes[0][c.classes[0] >= 0].tolist())
    assert got == {0, 1, 2} | {7, 9, 10, 11, 8}  # head's top 3, the neighbour's class, the 5 nearest prototypes
    assert PROTO_TOP == 5
    plain = c.without_proto()  # what a rule without prototypes sees: the prototypes' own classes are gone
    assert set(plain.classes[0][plain.classes[0] >= 0].tolist()) == {0, 1, 2} and plain.proto is None
    assert np.allclose(plain.head[0][plain.classes[0] >= 0], head[0, plain.classes[0][plain.classes[0] >= 0]])
    near_head = proto_sims.copy()
    near_head[0, 1] = 0.95  # the nearest prototype is also a head candidate: it stays for every rule
    both = Candidates.build(head, (np.array([[0.9]]), np.array([[2]])), np.ones(1, bool), m=3, proto_sims=near_head)
    kept = both.without_proto().classes[0]
    assert set(kept[kept >= 0].tolist()) == {0, 1, 2}
    assert set(both.classes[0][both.proto_only[0]].tolist()) == {7, 9, 10, 11}
    f = FusedClassifier(k=1, tau=0.1, weights=(0,) * (len(FEATURES) - 1) + (1.0,)).features(c)[0]
    cands = [int(x) for x in c.classes[0] if x >= 0]
    vote = {cl: np.exp(proto_sims[0, cl] / PROTO_SHARE_TAU) for cl in cands}  # the prototype vote, by hand
    for j, cls in enumerate(c.classes[0]):
        want = proto_sims[0, cls] / PROTO_TAU if cls >= 0 else 0.0
        assert f[j, FEATURES.index("proto")] == pytest.approx(want, rel=1e-5)
        want = vote[cls] / sum(vote.values()) if cls >= 0 else 0.0
        assert f[j, FEATURES.index("proto_share")] == pytest.approx(want, rel=1e-4, abs=1e-7)
    # the grid rule with the vote: alpha * head + (1 - alpha) * kNN + gamma * vote (the kNN: class 2 alone)
    grid = FusedClassifier(0.4, 1, 0.1, 0.0, gamma=0.5)
    assert grid.uses_prototypes and grid.rule == "grid" and not FusedClassifier(0.4, 1, 0.1, 0.0).uses_prototypes
    hp = {cl: head[0, cl] for cl in cands}
    hand = {cl: 0.4 * hp[cl] / sum(hp.values()) + 0.6 * (cl == 2) + 0.5 * vote[cl] / sum(vote.values())
            for cl in cands}
    got = grid.candidate_scores(c)[0]
    assert {int(cl): float(v) for cl, v in zip(c.classes[0], got, strict=True) if cl >= 0} == \
        pytest.approx(hand, rel=1e-4)
    assert grid.predict_candidates(c)[0][0, 0] == max(hand, key=hand.get)


def test_prototype_rule_wins_for_small_classes_the_others_miss_and_not_on_noise():
    """Every product looks the same to the head, the neighbours and the class sizes: a big class leads (head
    0.4, every neighbour) and three small classes follow (head 0.2 each). For big classes the leader is right;
    for small ones one of the followers is, and the product lies nearest its class's prototype. Only the rule
    with the prototype feature gets both, and cross-validation picks it; on noise labels it must not win."""
    rng = np.random.default_rng(4)
    n, big, small = 800, 5, 20
    n_cls = big + small
    sizes = np.array([1000.0] * big + [3.0] * small)
    y = np.where(rng.random(n) < 0.5, rng.integers(0, big, n), big + rng.integers(0, small, n))
    lead = np.where(y < big, y, rng.integers(0, big, n))
    head = np.full((n, n_cls), 0.01)
    head[np.arange(n), lead] = 0.4
    for i in range(n):
        follow = big + rng.choice(small, 3, replace=False)
        if y[i] >= big and y[i] not in follow:
            follow[0] = y[i]
        head[i, follow] = 0.2
    head /= head.sum(1, keepdims=True)
    sims = np.full((n, 3), 0.8) - 0.01 * np.arange(3)
    labels = np.repeat(lead[:, None], 3, 1)
    proto_sims = rng.uniform(0.2, 0.5, (n, n_cls))
    proto_sims[np.arange(n), y] = 0.7

    def cands() -> Candidates:
        return Candidates.build(head, (sims, labels), np.ones(n, bool), m=5, sizes=sizes, proto_sims=proto_sims)
    cal = calibrate(cands(), y, fallback=0)
    assert cal.gamma > 0  # the grid rule casts the prototype vote where there are prototypes
    for rule in ("grid", "learnt_proto"):  # the rules that see the prototypes get both kinds of class
        assert cal.cv[rule] > max(cal.cv["learnt"], cal.cv["learnt_tail"]) + 0.3
        assert (cal.oof[rule][y >= big] == y[y >= big]).mean() > 0.9  # out of fold, from the labels
        assert (cal.oof[rule][y < big] == y[y < big]).mean() > 0.9
    assert cal.cv["learnt"] < 0.75 and cal.cv["learnt_tail"] < 0.75  # blind to what tells the followers apart
    assert (cal.oof["learnt_tail"][y >= big] == y[y >= big]).mean() < 0.05
    assert cal.chosen in ("grid", "learnt_proto") and cal.classifier.uses_prototypes
    noise = calibrate(cands(), rng.integers(0, n_cls, n), fallback=0)
    assert noise.cv[noise.chosen] <= noise.cv["learnt"] + 0.05
    # no neighbours, the head right by a little, the nearest prototype the head's second class: any vote is wrong
    m_head = np.full((n, n_cls), 0.38 / (n_cls - 2))
    m_head[np.arange(n), y] = 0.32
    m_head[np.arange(n), (y + 1) % n_cls] = 0.3
    misleading = proto_sims.copy()
    misleading[np.arange(n), y] = 0.3
    misleading[np.arange(n), (y + 1) % n_cls] = 0.7
    none = np.full((n, 3), -1)
    wrong = calibrate(Candidates.build(m_head, (sims, none), np.ones(n, bool), m=5, sizes=sizes, proto_sims=misleading),
                      y, fallback=0)
    assert wrong.gamma == 0 and wrong.cv["grid"] == 1.0 and wrong.best(gamma=max(GAMMAS))["accuracy"] == 0.0
    agree = calibrate(Candidates.build(head, (sims, labels), np.ones(n, bool), m=5, sizes=sizes, proto_sims=misleading),
                      lead, fallback=0)  # the unanimous neighbours outvote any vote: a tie, and the vote is kept
    assert agree.cv["grid"] == 1.0 and agree.gamma == max(GAMMAS) == agree.best(gamma=max(GAMMAS))["gamma"]
    no_proto = calibrate(Candidates.build(head, (sims, labels), np.ones(n, bool), m=5, sizes=sizes), y, fallback=0)
    assert "learnt_proto" not in no_proto.cv and no_proto.gamma == 0  # without prototypes: no prototype vote
    assert no_proto.cv["grid"] < 0.75
    for rule in ("learnt", "learnt_tail"):  # scored on the candidates predict gives them: no prototype's class
        assert cal.cv[rule] == no_proto.cv[rule] and np.array_equal(cal.oof[rule], no_proto.oof[rule])


def test_rules_without_prototypes_score_the_candidates_predict_gives_them():
    """A product with no neighbour and a flat head: every candidate ties under the kNN-only rule, so the first
    listed class wins. Prototype-only classes (0-4 here) come first in the list; evaluate must not let them win
    for a rule that predict runs without prototypes (predict never adds them there): the same answer as
    candidates built without any prototype."""
    from retrieval.infer.scoring.streamed import score_part
    n_cls = 10
    head = np.zeros((1, n_cls))
    head[0, [5, 6]] = 0.5
    sims, labels = np.zeros((1, 2)), np.full((1, 2), -1)
    proto_sims = np.zeros((1, n_cls))
    proto_sims[0, :5] = 0.9
    with_p = Candidates.build(head, (sims, labels), np.ones(1, bool), m=2, proto_sims=proto_sims)
    without = Candidates.build(head, (sims, labels), np.ones(1, bool), m=2)
    assert with_p.classes[0][with_p.classes[0] >= 0].min() == 0  # a prototype-only class is listed first
    knn = FusedClassifier(0.0, 2, 0.1, 0.0, 0)
    fused = FusedClassifier(1.0, 2, 0.1, 0.0, 0)
    got, want = score_part(with_p, fused, knn, knn, 3), score_part(without, fused, knn, knn, 3)
    assert got.knn.tolist() == want.knn.tolist() == [5]
    assert np.array_equal(got.classes, want.classes) and np.allclose(got.probs, want.probs)


def test_logit_adjusted_loss_matches_the_formula_by_hand():
    """Menon et al.'s loss: cross-entropy of ``logits + tau * log(prior)``, the prior from training products per
    class (a class without products counts one), computed here by hand; and the frozen probe is scored with
    the prior given back (its posterior at the training skew)."""
    from retrieval.data.categories import CategoryTable
    from retrieval.train.losses import log_prior
    from retrieval.train.module import RetrievalModule
    counts = np.array([100, 10, 0])
    want_prior = np.log(np.array([100, 10, 1]) / 111)
    assert np.allclose(log_prior(counts, 0.7).numpy(), 0.7 * want_prior, atol=1e-6)
    cfg = TrainConfig.build(logit_adjust=1.0, metric_loss="none", label_smoothing=0.0)
    net = EmbeddingNet(ModelConfig("tiny", None, 32, 16, 3)).eval()
    module = RetrievalModule(net, cfg, CategoryTable.from_ids([7, 8, 9]), {}, counts)
    images, y = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 0, 1])
    with torch.no_grad():
        logits = net.head(net.neck(net.pooled(images))[1]).double()
        want = -torch.log_softmax(logits + torch.from_numpy(want_prior), 1)[torch.arange(6), y].mean()
        got = module.training_step((images, y, y, y), 0)
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    plain = RetrievalModule(net, TrainConfig.build(metric_loss="none", label_smoothing=0.0), module.categories, {},
                            counts)
    with torch.no_grad():
        assert float(plain.training_step((images, y, y, y), 0)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-4)
    with pytest.raises(ValueError, match="per class"):
        RetrievalModule(net, cfg, module.categories, {}, None)
