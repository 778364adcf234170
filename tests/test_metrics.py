"""The official AI4Arctic score against scikit-learn: random data, hand-made cases, streaming == pooling."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, r2_score

from seaice_nb.charts import UnknownChartError
from seaice_nb.core import DataError
from seaice_nb.charts import CHARTS, N_CLASSES
from seaice_nb.evaluation.metrics import (
    ConditionAccumulator,
    ScoreAccumulator,
    combine_scores,
    confusion_matrix,
    f1_from_confusion,
    official_score,
    r2_from_confusion,
    pixel_conditions,
)


def sklearn_score(true, pred):
    """The official scoring code path: pool, drop 255, sklearn metrics, x100, round 3, weighted combination."""
    out = {}
    for c in CHARTS:
        t = np.concatenate([x.ravel() for x in true[c]])
        p = np.concatenate([x.ravel() for x in pred[c]])
        keep = t != 255
        v = (
            r2_score(t[keep], p[keep])
            if c == 'sic'
            else f1_score(t[keep], p[keep], average='weighted', zero_division=0)
        )
        out[c] = round(v * 100, 3)
    out['combined'] = round((2 * out['sic'] + 2 * out['sod'] + out['floe']) / 5, 3)
    return out


def random_scenes(rng, n_scenes, shape, p_ignore=0.3, p_right=0.5, drop_classes=()):
    true, pred = {}, {}
    for c in CHARTS:
        k = N_CLASSES[c]
        ts = [rng.integers(0, k, shape) for _ in range(n_scenes)]
        for t in ts:
            for d in drop_classes:
                t[t == d] = 0
            t[rng.random(shape) < p_ignore] = 255
        true[c] = ts
        pred[c] = [
            np.where(rng.random(shape) < p_right, np.where(t == 255, 0, t), rng.integers(0, k, shape))
            for t in ts
        ]
    return true, pred


@pytest.mark.parametrize('seed', range(12))
def test_random_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    true, pred = random_scenes(
        rng,
        n_scenes=rng.integers(1, 4),
        shape=(int(rng.integers(5, 60)), int(rng.integers(5, 60))),
        p_ignore=rng.random() * 0.6,
        p_right=rng.random(),
        drop_classes=(3,) if seed % 3 == 0 else (),
    )
    assert official_score(true, pred) == sklearn_score(true, pred)


def test_streaming_equals_pooled_and_raw_metrics_agree():
    rng = np.random.default_rng(1)
    true, pred = random_scenes(rng, 5, (37, 41))
    acc = ScoreAccumulator()
    for i in range(5):  # stream in uneven pieces, some as torch tensors
        for rows in (slice(0, 10), slice(10, 11), slice(11, None)):
            t = {c: true[c][i][rows] for c in CHARTS}
            p = {c: pred[c][i][rows] for c in CHARTS}
            if i % 2:
                t, p = (
                    {c: torch.from_numpy(v) for c, v in t.items()},
                    {c: torch.from_numpy(v) for c, v in p.items()},
                )
            acc.update(t, p)
    assert acc.scores() == sklearn_score(true, pred)
    for c in CHARTS:  # unrounded values too
        tt = np.concatenate([x.ravel() for x in true[c]])
        pp = np.concatenate([x.ravel() for x in pred[c]])
        k = tt != 255
        ref = r2_score(tt[k], pp[k]) if c == 'sic' else f1_score(tt[k], pp[k], average='weighted')
        got = r2_from_confusion(acc.cms[c]) if c == 'sic' else f1_from_confusion(acc.cms[c])
        assert got == pytest.approx(ref, abs=1e-12)
    # merging two half accumulators (what an all-reduce does) gives the same
    a, b = ScoreAccumulator(), ScoreAccumulator()
    for i in range(5):
        (a if i < 2 else b).update({c: true[c][i] for c in CHARTS}, {c: pred[c][i] for c in CHARTS})
    assert a.merge(b).scores() == acc.scores()


def test_hand_made_cases():
    # perfect prediction: 100 everywhere
    t = {'sic': np.array([0, 5, 10, 255]), 'sod': np.array([0, 1, 5, 255]), 'floe': np.array([0, 2, 6, 255])}
    p = {'sic': np.array([0, 5, 10, 3]), 'sod': np.array([0, 1, 5, 4]), 'floe': np.array([0, 2, 6, 1])}
    assert official_score(t, p) == {'sic': 100.0, 'sod': 100.0, 'floe': 100.0, 'combined': 100.0}
    # SIC: reference [0, 10], prediction [0, 5] -> ss_res 25, ss_tot 50 -> R2 0.5
    s = official_score({'sic': np.array([0, 10])}, {'sic': np.array([0, 5])}, charts=['sic'])
    assert s['sic'] == 50.0 and s['combined'] == 50.0
    # SOD: reference [0,0,0,1], prediction [0,0,1,1] -> F1 class0 0.8 (w 3), class1 2/3 (w 1) -> 0.76667
    s = official_score({'sod': np.array([0, 0, 0, 1])}, {'sod': np.array([0, 0, 1, 1])}, charts=['sod'])
    assert s['sod'] == round((3 * 0.8 + 2 / 3) / 4 * 100, 3) == 76.667
    # a class only predicted (never in the reference) has zero weight but lowers precision elsewhere
    s = official_score({'floe': np.array([1, 1, 1, 1])}, {'floe': np.array([1, 1, 1, 6])}, charts=['floe'])
    assert s['floe'] == round(2 * 3 / (2 * 3 + 1) * 100, 3)
    # constant reference: sklearn's force_finite convention
    assert (
        official_score({'sic': np.array([4, 4])}, {'sic': np.array([4, 4])}, charts=['sic'])['sic'] == 100.0
    )
    assert official_score({'sic': np.array([4, 4])}, {'sic': np.array([4, 5])}, charts=['sic'])['sic'] == 0.0
    # combined weights 2/2/1 applied to the rounded scores, then rounded
    assert combine_scores({'sic': 90.0, 'sod': 80.0, 'floe': 70.0}) == 82.0
    assert combine_scores({'sic': 1.0005, 'sod': 0.0, 'floe': 0.0}) == 0.4


def test_all_ignored_and_bad_input():
    s = official_score({c: np.full(4, 255) for c in CHARTS}, {c: np.zeros(4, int) for c in CHARTS})
    assert all(np.isnan(s[c]) for c in CHARTS) and np.isnan(s['combined'])
    with pytest.raises(DataError, match=r'sic: reference shape \(3,\) != prediction shape \(4,\)'):
        confusion_matrix(np.zeros(3), np.zeros(4), 11, 'sic')
    with pytest.raises(DataError, match='floe: predicted classes must be 0..6, got 0..7'):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]), 7, 'floe')


def test_official_names_and_missing_or_unknown_charts():
    "The official upper-case keys score exactly as the project's; unknown keys and missing charts raise (issue 14)."
    rng = np.random.default_rng(5)
    true, pred = random_scenes(rng, 2, (15, 17))
    want = sklearn_score(true, pred)
    up = lambda d: {c.upper(): v for c, v in d.items()}
    assert official_score(up(true), up(pred)) == want == official_score(true, up(pred))
    acc = ScoreAccumulator()
    for i in range(2):
        acc.update({c.upper(): true[c][i] for c in CHARTS}, {c: pred[c][i] for c in CHARTS})
    assert acc.scores() == want
    with pytest.raises(UnknownChartError, match="reference: unknown chart 'Sea_Ice'"):
        official_score({'Sea_Ice': true['sic']}, pred)
    with pytest.raises(DataError, match='prediction has no floe chart .*needs all three'):
        official_score(up(true), {c: pred[c] for c in ('sic', 'sod')})
    with pytest.raises(DataError, match='reference has no sod chart'):
        ScoreAccumulator().update(
            {'SIC': true['sic'][0], 'FLOE': true['floe'][0]}, {c: pred[c][0] for c in CHARTS}
        )
    with pytest.raises(DataError, match="chart 'sic' is given twice"):
        official_score({**true, 'SIC': true['sic']}, pred)
    with pytest.raises(DataError, match='2 reference scenes but 1 prediction'):
        official_score(true, {**pred, 'sic': pred['sic'][:1]})
    # naming the charts scores only those; combined is then their 2/2/1 mean, not the leaderboard number
    s = official_score({'SIC': true['sic']}, {'sic': pred['sic']}, charts=['SIC'])
    assert s == {'sic': want['sic'], 'combined': want['sic']}
    assert ScoreAccumulator(['sod']).update({'sod': true['sod'][0]}, {'SOD': pred['sod'][0]}).n_pixels() == {
        'sod': int((true['sod'][0] != 255).sum())
    }


def test_masked_predictions_scored_as_the_official_code():
    "A package's 255 on a scored pixel counts as the value 255 (R²) and a wrong label (F1), as sklearn on the raw arrays."
    rng = np.random.default_rng(9)
    true, pred = random_scenes(rng, 2, (20, 30))
    for c in CHARTS:
        for p in pred[c]:
            p[rng.random(p.shape) < 0.05] = 255
    with pytest.raises(DataError, match=r'predicted classes must be 0\.\.10, got 0\.\.255'):
        ScoreAccumulator().update({c: true[c][0] for c in CHARTS}, {c: pred[c][0] for c in CHARTS})
    acc = ScoreAccumulator(allow_masked=True)
    for i in range(2):
        acc.update(
            {c: true[c][i] for c in CHARTS},
            {c: torch.from_numpy(pred[c][i]) if i else pred[c][i] for c in CHARTS},
        )
    assert acc.scores() == sklearn_score(true, pred)
    assert acc.scores()['sic'] < 0  # a few masked pixels wreck R²: the issue-14 failure
    assert all(n > 0 for n in acc.n_masked().values())
    with pytest.raises(DataError, match=r'0\.\.10 or 255, got 11\.\.11'):
        confusion_matrix(np.array([0, 1]), np.array([11, 255]), 11, 'sic', masked=True)


def test_condition_breakdown_partitions_the_pool():
    rng = np.random.default_rng(3)
    true, pred = random_scenes(rng, 3, (20, 20))
    ca = ConditionAccumulator()
    zones = [rng.integers(0, 11, (20, 20)) for _ in range(3)]
    for i in range(3):
        ca.update(
            {c: true[c][i] for c in CHARTS},
            {c: pred[c][i] for c in CHARTS},
            scene={'month': f"0{i + 1}"},
            pixel=pixel_conditions(distance_zone=zones[i], incidence_deg=rng.uniform(18, 48, (20, 20))),
        )
    rows = ca.table()
    for cond in (
        'month',
        'distance_to_land',
        'incidence_angle',
    ):  # every pixel in exactly one value of each condition
        assert sum(r['n_sod'] for r in rows if r['condition'] == cond) == rows[0]['n_sod']
    # a condition value's score is the sklearn score of exactly its pixels
    sel = [z == 4 for z in zones]
    sub_t = {c: [t[m] for t, m in zip(true[c], sel)] for c in CHARTS}
    sub_p = {c: [p[m] for p, m in zip(pred[c], sel)] for c in CHARTS}
    row = next(r for r in rows if r['condition'] == 'distance_to_land' and r['value'] == '2-4 km')
    assert {k: row[k] for k in ('sic', 'sod', 'floe', 'combined')} == sklearn_score(sub_t, sub_p)


def test_chart_constants_have_one_home():
    "Issue 17: class counts and chart names are defined in seaice_nb.charts only; the old names still import."
    import re
    from pathlib import Path
    import seaice_nb
    from seaice_nb import charts
    from seaice_nb.evaluation import metrics
    from seaice_nb.data import scenes, preprocess
    from seaice_nb.models import losses

    pat = re.compile(
        r"^\s*(CHARTS|N_CLASSES|CHART_VARS|CHART_CLASSES|CLASS_TABLES)\s*(:[^=]*)?=\s*[({]|'(sic|SIC)': 11\b",
        re.M,
    )
    root = Path(seaice_nb.__file__).parent
    homes = sorted(
        str(p.relative_to(root))
        for p in root.rglob('*.py')
        if p.name != '_modidx.py' and pat.search(p.read_text())
    )
    assert homes == ['charts.py'], homes
    assert metrics.N_CLASSES is scenes.N_CLASSES is losses.CHART_CLASSES is charts.N_CLASSES
    assert preprocess.CHARTS is metrics.CHARTS is charts.CHARTS and scenes.CHART_VARS == (
        'SIC',
        'SOD',
        'FLOE',
    )
