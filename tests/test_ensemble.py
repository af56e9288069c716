"""Ensembles of saved predictions: methods on tiny cases, refusals, the select/report protocol, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from builders import WNIDS, WORDS
from transferlab.artifacts.predictions import read_predictions, write_predictions
from transferlab.cli import main
from transferlab.ensembles import (
    EnsembleConfig,
    apply_ensemble,
    fit_ensemble,
    fit_greedy,
    fit_mixture_weights,
    fit_temperature,
    load_fitted,
    load_members,
    run_ensemble,
    stratified_select_mask,
)
from transferlab.errors import ConfigError, DataError
from transferlab.metrics import log_softmax, nll, topk_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

N, C = 240, 5
CLASS_IDS = tuple(f"c{i}" for i in range(C))


def _targets(n: int = N, c: int = C, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, n)


def _member(t: np.ndarray, acc: float, conf: float, seed: int, c: int = C) -> np.ndarray:
    """Logits right on about ``acc`` of the samples (else a random class), with margin ``conf``."""
    rng = np.random.default_rng(seed)
    n = len(t)
    pred = np.where(rng.random(n) < acc, t, rng.integers(0, c, n))
    z = rng.normal(0.0, 0.5, (n, c))
    z[np.arange(n), pred] += conf
    return z


def _write(path: Path, logits: np.ndarray, t: np.ndarray, ids: list[str] | None = None, classes=CLASS_IDS) -> Path:
    ids = ids if ids is not None else [f"val/images/val_{i}.JPEG" for i in range(len(t))]
    write_predictions(path, logits, t, ids, tuple(classes))
    return path


def _log_p(p: list[list[float]]) -> np.ndarray:
    return np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-12, None))


# --------------------------------------------------------------------------------------------------
# Methods on tiny cases


def test_vote_majority_wins_and_ties_go_to_summed_probability() -> None:
    a = _log_p([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0], [0.5, 0.1, 0.4]])
    b = _log_p([[0.1, 0.9, 0.0], [0.45, 0.55, 0.0], [0.5, 0.1, 0.4]])
    c = _log_p([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    t = np.array([1, 0, 0])
    # two members, one vote each: summed probability decides (row 0: class 1 1.3 > 0.7; row 1: class 0 1.35)
    two = fit_ensemble(np.stack([a, b]), t, "vote").log_probs(np.stack([a, b]))
    assert np.argmax(two, axis=1)[:2].tolist() == [1, 0]
    np.testing.assert_allclose(np.exp(two).sum(axis=1), 1.0)
    # three members: on row 2 members a and b vote 0 and c votes 2 with certainty. Summed probability
    # favours class 2 (1.8 vs 1.0) - the mean would pick it - but the majority is 0.
    three = np.stack([a, b, c])
    vote = fit_ensemble(three, t, "vote").log_probs(three)
    mean = fit_ensemble(three, t, "mean").log_probs(three)
    assert np.argmax(vote[2]) == 0 and np.argmax(mean[2]) == 2
    # (votes + mean p) / (M + 1): row 2 class 0 = (2 + 1/3) / 4
    assert math.exp(vote[2, 0]) == pytest.approx((2 + (0.5 + 0.5 + 1e-12) / 3) / 4, rel=1e-6)


def test_mean_averages_probabilities() -> None:
    p1 = _log_p([[0.2, 0.8], [0.5, 0.5]])
    p2 = _log_p([[0.6, 0.4], [0.1, 0.9]])
    fitted = fit_ensemble(np.stack([p1, p2]), np.array([0, 1]), "mean")
    np.testing.assert_allclose(np.exp(fitted.log_probs(np.stack([p1, p2]))), [[0.4, 0.6], [0.3, 0.7]], rtol=1e-9)
    np.testing.assert_allclose(fitted.weights, [0.5, 0.5])


def test_weighted_puts_the_weight_on_the_perfect_member() -> None:
    t = _targets()
    perfect = np.zeros((N, C))
    perfect[np.arange(N), t] = 5.0
    noise = np.random.default_rng(3).normal(0, 1, (N, C))
    w = fit_ensemble(np.stack([noise, perfect]), t, "weighted").weights
    assert w is not None
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[1] > 0.999 and w[0] < 1e-3


def test_weighted_matches_a_hand_solved_mixture() -> None:
    # Member 0 gives the target probability 1 on rows 0-2 and ~0 on row 3; member 1 gives 0.5 everywhere.
    # NLL(w) = -[3 log(w + (1-w)/2) + log((1-w)/2)] / 4; d/dw = 0 <=> 3/(1+w) = 1/(1-w) <=> w = 1/2.
    lp = np.log(np.array([[[1.0, 1e-300]] * 3 + [[1.0, 1e-300]], [[0.5, 0.5]] * 4]))
    w = fit_mixture_weights(lp, np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-6)


def test_greedy_picks_the_good_members_and_repeats_them() -> None:
    t = _targets(400)
    good = _member(t, 0.8, 2.0, seed=1)
    also_good = _member(t, 0.7, 2.0, seed=2)
    noise = np.random.default_rng(3).normal(0, 1, (400, C))
    lp = log_softmax(np.stack([noise, good, also_good]))
    counts, history = fit_greedy(lp, t, metric="nll", rounds=25)
    assert history[0]["added"] == 1  # started from the best single member
    assert counts[0] == 0 and counts[1] >= 2 and counts[2] >= 1
    assert counts[1] > counts[2]
    assert len(history) == 26
    fitted = fit_ensemble(np.stack([noise, good, also_good]), t, "greedy")
    np.testing.assert_allclose(fitted.weights, counts / counts.sum())
    acc_counts, _ = fit_greedy(lp, t, metric="accuracy", rounds=25)
    assert acc_counts[0] == 0 and acc_counts[1] >= 1
    # zero rounds: the best member alone
    assert fit_greedy(lp, t, rounds=0)[0].tolist() == [0, 1, 0]


def test_stack_beats_a_bad_member_and_learns_a_relabelling() -> None:
    t = _targets(400)
    good = _member(t, 0.7, 2.0, seed=1)
    shifted = 4.0 * np.eye(C)[(t + 1) % C]  # always names the next class: useless as is, perfect once relabelled
    members = np.stack([good, shifted])
    fit, rep = slice(0, 200), slice(200, 400)
    stack = fit_ensemble(members[:, fit], t[fit], "stack")
    lp = stack.log_probs(members[:, rep])
    assert topk_accuracy(lp, t[rep]) > 0.95
    assert topk_accuracy(shifted[rep], t[rep]) == 0.0 and topk_accuracy(good[rep], t[rep]) < 0.85
    assert nll(lp, t[rep]) < nll(good[rep], t[rep]) < nll(shifted[rep], t[rep])
    assert stack.coef is not None and stack.coef.shape == (C, 2 * C) and stack.intercept.shape == (C,)


def test_temperature_scaling_fixes_an_overconfident_member() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (2000, C))
    p = np.exp(log_softmax(z))
    t = np.array([rng.choice(C, p=row) for row in p])  # z is calibrated by construction
    over = 4.0 * z
    temp = fit_temperature(over, t)
    assert 3.0 < temp < 5.0
    assert nll(over / temp, t) < nll(over, t) - 0.2
    fitted = fit_ensemble(np.stack([over, z]), t, "mean", temperature=True)
    assert fitted.temperatures is not None and 0.7 < fitted.temperatures[1] < 1.4
    # top-1 is unchanged by a temperature
    np.testing.assert_array_equal(np.argmax(over / temp, axis=1), np.argmax(over, axis=1))


def test_stratified_split_is_balanced_seeded_and_label_only() -> None:
    t = np.repeat(np.arange(4), [10, 7, 1, 2])
    m = stratified_select_mask(t, 0.5, seed=0)
    # floor(n_c / 2) = 5, 3, 0, 1 per class; the tenth goes to class 1 or 2 (remainder 0.5 each, seeded)
    per = [int(m[t == c].sum()) for c in range(4)]
    assert m.sum() == 10 and per[0] == 5 and per[3] == 1 and per[1] + per[2] == 4 and per[1] in (3, 4)
    np.testing.assert_array_equal(m, stratified_select_mask(t, 0.5, seed=0))
    assert not np.array_equal(m, stratified_select_mask(t, 0.5, seed=1))


# --------------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture
def three_files(tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    t = _targets()
    paths = [
        _write(tmp_path / "a.npz", _member(t, 0.8, 2.0, seed=1), t),
        _write(tmp_path / "b.npz", _member(t, 0.7, 2.0, seed=2), t),
        _write(tmp_path / "c.npz", _member(t, 0.6, 2.0, seed=3), t),
    ]
    return paths, t


def test_mismatched_members_are_refused_naming_the_member(tmp_path: Path) -> None:
    t = _targets(20)
    z = _member(t, 0.8, 2.0, seed=1, c=C)
    ids = [f"s{i}" for i in range(20)]
    a = _write(tmp_path / "a.npz", z, t, ids)
    reordered = _write(tmp_path / "order.npz", z[::-1], t[::-1], ids[::-1])
    with pytest.raises(DataError, match=r"order\.npz.*different order"):
        load_members([a, reordered])
    other = _write(tmp_path / "other.npz", z, t, [f"x{i}" for i in range(20)])
    with pytest.raises(DataError, match=r"other\.npz.*not in the first"):
        load_members([a, other])
    fewer = _write(tmp_path / "fewer.npz", z[:10], t[:10], ids[:10])
    with pytest.raises(DataError, match=r"fewer\.npz has 10 samples instead of 20"):
        load_members([a, fewer])
    perm = _write(tmp_path / "perm.npz", z, t, ids, classes=CLASS_IDS[::-1])
    with pytest.raises(DataError, match=r"perm\.npz.*same classes in a different order"):
        load_members([a, perm])
    more = _write(tmp_path / "more.npz", np.c_[z, z[:, :1]], t, ids, classes=(*CLASS_IDS, "extra"))
    with pytest.raises(DataError, match=r"more\.npz has 6 classes instead of 5"):
        load_members([a, more])
    relabelled = _write(tmp_path / "lab.npz", z, (t + 1) % C, ids)
    with pytest.raises(DataError, match=r"lab\.npz disagrees .* labels"):
        load_members([a, relabelled])
    with pytest.raises(DataError, match="no such file"):
        load_members([a, tmp_path / "missing.npz"])


def test_run_directory_members(tmp_path: Path, three_files) -> None:
    paths, t = three_files
    run = tmp_path / "run1"
    _write(run / "predictions" / "val.npz", read_predictions(paths[0]).logits, t)
    members = load_members([run, paths[1]])
    assert members[0].name == "run1"
    with pytest.raises(DataError, match="pass --split val"):
        load_members([run, paths[1]], split="test")


# --------------------------------------------------------------------------------------------------
# The protocol: nothing fitted depends on the report half


def _fitted_state(out: Path) -> dict:
    doc = json.loads((out / "weights.json").read_text())
    state = {k: doc[k] for k in ("method", "temperatures", "weights", "protocol")}
    state["greedy"] = doc.get("greedy")
    if doc["method"] == "stack":
        with np.load(out / "stack.npz") as z:
            state["coef"], state["intercept"] = z["coef"].tolist(), z["intercept"].tolist()
    return state


@pytest.mark.parametrize("method", ["weighted", "greedy", "stack"])
def test_report_labels_and_logits_do_not_touch_anything_fitted(tmp_path: Path, three_files, method: str) -> None:
    paths, t = three_files
    mask = stratified_select_mask(t, 0.5, seed=0)
    cfg = EnsembleConfig(
        members=tuple(map(str, paths)), out=tmp_path / "o1", method=method, temperature=True, n_boot=50
    )
    m1 = run_ensemble(cfg, select_mask=mask)
    # corrupt the report half of every member: labels permuted and replaced, logits replaced by noise
    rng = np.random.default_rng(123)
    bad_t = t.copy()
    bad_t[~mask] = rng.integers(0, C, int((~mask).sum()))
    corrupted = []
    for p in paths:
        z = read_predictions(p).logits.astype(np.float64)
        z[~mask] = rng.normal(0, 3, (int((~mask).sum()), C))
        corrupted.append(_write(tmp_path / "bad" / p.name, z, bad_t))
    cfg2 = EnsembleConfig(
        members=tuple(map(str, corrupted)), out=tmp_path / "o2", method=method, temperature=True, n_boot=50
    )
    m2 = run_ensemble(cfg2, select_mask=mask)
    assert _fitted_state(tmp_path / "o1") == _fitted_state(tmp_path / "o2")
    assert m1["best_member"] == m2["best_member"]
    assert m1["ensemble"]["top1"] != m2["ensemble"]["top1"]  # the report numbers did see the change


def test_select_data_protocol_ignores_every_evaluated_label(tmp_path: Path, three_files) -> None:
    paths, t = three_files
    ts = _targets(120, seed=9)
    sel = [
        _write(
            tmp_path / "sel" / f"{i}.npz", _member(ts, acc, 2.0, seed=10 + i), ts, [f"train/{j}" for j in range(120)]
        )
        for i, acc in enumerate((0.8, 0.7, 0.6))
    ]
    outs = []
    for k, t_eval in enumerate((t, (t + 2) % C)):
        files = [_write(tmp_path / f"ev{k}" / p.name, read_predictions(p).logits, t_eval) for p in paths]
        cfg = EnsembleConfig(
            members=tuple(map(str, files)),
            out=tmp_path / f"out{k}",
            method="weighted",
            temperature=True,
            select_data=tuple(map(str, sel)),
            n_boot=50,
        )
        m = run_ensemble(cfg)
        assert m["protocol"]["mode"] == "select-data" and m["protocol"]["n_report"] == N
        outs.append(_fitted_state(tmp_path / f"out{k}"))
    assert outs[0] == outs[1]
    # predictions on the evaluated samples are refused as selection data
    with pytest.raises(DataError, match="shares 240 samples"):
        run_ensemble(
            EnsembleConfig(members=tuple(map(str, paths)), out=tmp_path / "x", select_data=tuple(map(str, paths)))
        )


def test_best_member_is_chosen_on_select_not_report(tmp_path: Path) -> None:
    t = _targets(200)
    mask = np.zeros(200, dtype=bool)
    mask[:100] = True
    # a: perfect on select, 40% on report; b: 70% everywhere
    a = np.where(mask[:, None], 5.0 * np.eye(C)[t], 0.0) + np.where(~mask[:, None], _member(t, 0.4, 2.0, seed=1), 0.0)
    b = _member(t, 0.7, 2.0, seed=2)
    paths = [_write(tmp_path / "a.npz", a, t), _write(tmp_path / "b.npz", b, t)]
    m = run_ensemble(EnsembleConfig(members=tuple(map(str, paths)), out=tmp_path / "o", n_boot=50), select_mask=mask)
    assert m["best_member"]["name"] == "a" and m["best_member"]["chosen_on"] == "select"
    assert m["members"][0]["top1"] < m["members"][1]["top1"]  # on report, b is better


def test_paired_result_and_apply_ensemble_round_trip(tmp_path: Path, three_files) -> None:
    paths, t = three_files
    for method in ("greedy", "stack", "vote"):
        out = tmp_path / method
        m = run_ensemble(
            EnsembleConfig(members=tuple(map(str, paths)), out=out, method=method, temperature=True, n_boot=100)
        )
        probs = apply_ensemble(out / "weights.json", paths)
        assert probs.shape == (N, C)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)
        written = read_predictions(out / "predictions" / "val.npz")
        report = ~stratified_select_mask(t, 0.5, 0)
        np.testing.assert_allclose(np.exp(written.logits), probs[report], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(written.targets, t[report])
        vs = m["vs_best_member"]
        assert vs["split"] == "report" and 0.0 <= vs["p_gain_positive"] <= 1.0
        assert vs["gain_ci"][0] <= vs["gain"] <= vs["gain_ci"][1]
        fitted, doc = load_fitted(out)
        assert fitted.method == method and len(doc["protocol"]["select_sample_ids"]) == int((~report).sum())
    with pytest.raises(ConfigError, match="3 members"):
        apply_ensemble(tmp_path / "stack", paths[:2])


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_end_to_end(tmp_path: Path, three_files, capsys: pytest.CaptureFixture[str]) -> None:
    paths, _t = three_files
    out = tmp_path / "ens"
    rc = main(
        ["ensemble", *map(str, paths), "--method", "weighted", "--temperature", "--n-boot", "100", "--out", str(out)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "fitted on select" in text and "numbers from report" in text and "vs best member" in text
    m = json.loads((out / "metrics.json").read_text())
    for row in [m["ensemble"], *m["members"]]:
        assert row["split"] == "report" and row["n"] == N // 2
        assert {"top1", "top1_ci", "top5", "nll", "ece"} <= set(row)
    assert m["best_member"]["chosen_on"] == "select"
    assert m["vs_best_member"]["split"] == "report" and m["diversity"]["split"] == "report"
    assert np.asarray(m["diversity"]["disagreement"]).shape == (3, 3)
    assert m["protocol"]["n_select"] + m["protocol"]["n_report"] == N
    assert m["ensemble"]["top1"] >= max(r["top1"] for r in m["members"]) - 0.02
    # the ensemble's predictions have exactly the members' format
    with np.load(out / "predictions" / "val.npz") as mine, np.load(paths[0]) as theirs:
        assert sorted(mine.files) == sorted(theirs.files)
        for k in mine.files:
            assert mine[k].dtype.kind == theirs[k].dtype.kind, k
        assert mine["logits"].dtype == np.float32 and mine["targets"].dtype == np.int64
    w = json.loads((out / "weights.json").read_text())
    assert w["method"] == "weighted" and len(w["weights"]) == 3 and len(w["temperatures"]) == 3
    assert w["protocol"]["seed"] == 0 and w["protocol"]["select_fraction"] == 0.5
    assert [mm["path"] for mm in w["members"]] == [str(p.resolve()) for p in paths]


def test_cli_refuses_mismatch_with_a_message(tmp_path: Path, three_files, capsys: pytest.CaptureFixture[str]) -> None:
    paths, t = three_files
    bad = _write(
        tmp_path / "shuffled.npz",
        read_predictions(paths[1]).logits[::-1],
        t[::-1],
        [f"val/images/val_{i}.JPEG" for i in range(N)][::-1],
    )
    rc = main(["ensemble", str(paths[0]), str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "shuffled.npz" in err and "different order" in err
    assert main(["ensemble", str(paths[0]), "--out", str(tmp_path / "o")]) == 2
    assert "at least two members" in capsys.readouterr().err


def test_cli_class_names_from_data(tmp_path: Path, tiny_folder: Path) -> None:
    t = np.array([0, 0, 1, 1, 2, 2] * 4)
    n = len(t)
    ids = [f"val/images/val_{i}.JPEG" for i in range(n)]
    wrong = (t + 1) % 3  # members 0 and 1 take class k for k+1 on every fourth sample: the vote follows
    paths = []
    for i in range(3):
        pred = np.where((np.arange(n) % 4 == 0) & (i < 2), wrong, t)
        paths.append(_write(tmp_path / f"m{i}.npz", 3.0 * np.eye(3)[pred], t, ids, classes=tuple(WNIDS)))
    out = tmp_path / "o"
    assert main(["ensemble", *map(str, paths), "--method", "vote", "--data", str(tiny_folder), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    names = {WORDS[w] for w in WNIDS}
    assert m["ensemble"]["most_confused"]
    for pair in m["ensemble"]["most_confused"]:
        assert pair["true_name"] in names and pair["predicted_name"] in names
    assert {r["name"] for r in m["ensemble"]["per_class"]} == names
    assert not (out / "stack.npz").exists()
