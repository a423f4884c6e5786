import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from mushroomclip.evaluation.reporting import write_results
from mushroomclip.metrics import classification_metrics, format_report
from mushroomclip.taxonomy import load_taxonomy

HEADER = "label,kingdom,phylum,class,order,family,genus,common_name,edibility,lichen,synonym_of\n"
# A hand-checkable world: A1/A2 share a genus, B1 another family of the same order, C1 another phylum.
TOY = HEADER + (
    "Ab one,Fungi,Basidiomycota,Agaricomycetes,Agaricales,Aaceae,Ab,a-one,deadly,no,\n"
    "Ab two,Fungi,Basidiomycota,Agaricomycetes,Agaricales,Aaceae,Ab,a-two,edible,no,\n"
    "Bb one,Fungi,Basidiomycota,Agaricomycetes,Agaricales,Baceae,Bb,b-one,poisonous,no,\n"
    "Cc one,Fungi,Ascomycota,Pezizomycetes,Pezizales,Caceae,Cc,c-one,edible,no,\n"
)


def random_case(seed: int, n: int = 400, num_classes: int = 30):
    """Truth drawn from a subset of classes; scores favour an extra class absent from the truth."""
    rng = np.random.default_rng(seed)
    present = rng.choice(num_classes, size=12, replace=False)
    y = rng.choice(present, size=n)
    scores = rng.random((n, num_classes))
    scores[np.arange(n), y] += rng.random(n) * 1.2  # better than chance, far from perfect
    absent = np.setdiff1d(np.arange(num_classes), present)
    scores[:, absent[0]] += 0.25  # a class that is only ever predicted
    scores[:, absent[1:6]] = -1.0  # classes neither true nor predicted
    return y, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn_with_missing_classes(seed):
    y, scores = random_case(seed)
    pred = scores.argmax(1)
    assert len(np.setdiff1d(np.arange(30), np.union1d(y, pred))) > 0  # some classes absent from both
    assert len(np.setdiff1d(pred, y)) > 0  # some classes only predicted
    m = classification_metrics(y, scores, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about the only-predicted classes
        assert m["oa"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["mf1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
        assert m["miou"] == pytest.approx(skm.jaccard_score(y, pred, average="macro"))
        assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert m["macro_precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
        assert m["top5"] == pytest.approx(skm.top_k_accuracy_score(y, scores, k=5, labels=np.arange(30)))
        per_f1 = skm.f1_score(y, pred, average=None, labels=np.union1d(y, pred))
    assert [v["f1"] for v in m["per_class"].values()] == pytest.approx(per_f1.tolist())
    assert np.array_equal(m["confusion"], skm.confusion_matrix(y, pred, labels=np.arange(30)))


def test_classes_absent_from_truth_and_prediction_do_not_change_macro_means():
    y, scores = random_case(3, num_classes=30)
    small = classification_metrics(y, scores, 30)
    padded = np.concatenate([scores, np.full((len(y), 139), -1.0)], axis=1)  # 139 never-seen classes
    big = classification_metrics(y, padded, 169)
    for key in ("oa", "top5", "mf1", "miou", "balanced_acc"):
        assert big[key] == pytest.approx(small[key])
    assert big["num_classes_present"] == small["num_classes_present"]


def test_predictions_alone_give_everything_but_top5():
    y, scores = random_case(4)
    from_pred = classification_metrics(y, scores.argmax(1), 30)
    from_scores = classification_metrics(y, scores, 30)
    assert from_pred["top5"] is None
    assert from_pred["miou"] == from_scores["miou"] and from_pred["oa"] == from_scores["oa"]


def test_rank_accuracy_and_safety_on_a_hand_checked_case(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text(TOY)
    tax = load_taxonomy(path)
    A1, A2, B1, C1 = 0, 1, 2, 3
    y_true = [A1, A1, A1, A1, B1, B1, C1, A2]
    y_pred = [A1, A2, A2, B1, A2, B1, A1, A2]
    m = classification_metrics(np.array(y_true), np.array(y_pred), 4, taxonomy=tax)
    assert m["oa"] == pytest.approx(3 / 8)  # A1->A1, B1->B1, A2->A2
    # genus right: A1->A1, A1->A2 x2, B1->B1, A2->A2 = 5 of 8; family the same; order: all but C1->A1.
    assert m["rank_accuracy"]["genus"] == pytest.approx(5 / 8)
    assert m["rank_accuracy"]["family"] == pytest.approx(5 / 8)
    assert m["rank_accuracy"]["order"] == pytest.approx(7 / 8)
    assert m["rank_accuracy"]["phylum"] == pytest.approx(7 / 8)
    # errors: A1->A2 (depth 6) x2, A1->B1 (4), B1->A2 (4), C1->A1 (1): mean depth 21/5, severity 7 - that
    assert m["mistake_lca_depth"] == pytest.approx(21 / 5)
    assert m["mistake_severity"] == pytest.approx(7 - 21 / 5)
    # dangerous = the 4 deadly A1 + 2 poisonous B1; called edible: A1->A2 x2, B1->A2 = 3 of 6
    assert m["dangerous_images"] == 6
    assert m["dangerous_as_edible"] == pytest.approx(3 / 6)
    assert m["deadly_images"] == 4 and m["deadly_recall"] == pytest.approx(1 / 4)
    assert "dangerous->edible  50.0" in format_report(m)


def test_safety_metrics_are_none_without_dangerous_images(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text(TOY)
    m = classification_metrics(np.array([1, 3]), np.array([1, 3]), 4, taxonomy=load_taxonomy(path))
    assert m["dangerous_as_edible"] is None and m["deadly_recall"] is None and m["mistake_severity"] is None


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    y, scores = random_case(5, n=600)
    a = classification_metrics(y, scores, 30, bootstrap=200, seed=7)
    b = classification_metrics(y, scores, 30, bootstrap=200, seed=7)
    assert a["ci"] == b["ci"]
    for key in ("oa", "mf1", "miou"):
        lo, hi = a["ci"][key]
        assert lo < a[key] < hi and hi - lo < 0.2


@pytest.mark.parametrize(
    ("y", "values", "message"),
    [
        ([0, 1, 2], np.array([0, 1, 5]), r"predictions must be integer class ids in \[0, 3\)"),
        ([0, 1, 3], np.array([0, 1, 2]), r"y_true must be integer class ids"),
        ([0, 1, 2], np.zeros((3, 4)), r"scores must have shape \(N, num_classes\) = \(3, 3\)"),
        ([0, 1, 2], np.array([0, 1]), "expected 3 predictions"),
    ],
)
def test_bad_inputs_are_clear_errors(y, values, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(np.array(y), values, 3)


def test_write_results_saves_metrics_with_provenance_and_figures(tmp_path):
    tax = load_taxonomy()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    m = classification_metrics(y, rng.random((200, 169)), 169, taxonomy=tax)
    path = write_results(tmp_path / "run", m, tax, config={"model": "x"}, seed=3, name="x")
    record = json.loads(path.read_text())
    assert record["metrics"]["miou"] == pytest.approx(m["miou"])
    assert record["seed"] == 3 and record["config"] == {"model": "x"}
    assert record["versions"]["numpy"] == np.__version__ and "git_commit" in record
    assert record["taxonomy_sha256"] == tax.fingerprint
    for png in ("confusion.png", "rank_accuracy.png"):
        assert (tmp_path / "run" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
