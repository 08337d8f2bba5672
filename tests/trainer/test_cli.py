import os
import subprocess
import sys
from pathlib import Path

import pytest

from specdec.trainer import cli
from specdec.trainer.config import compose_recipe, recipe_names

SCRIPTS = Path(sys.executable).parent


@pytest.mark.parametrize("main", [cli.prep_main, cli.train_main, cli.eval_main, cli.export_main])
def test_help_lists_every_recipe_and_group(main, capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in recipe_names():
        assert f"\n  {name} " in out
    for group in cli.GROUPS:
        assert f"\n  {group} " in out


def test_no_arguments_prints_usage_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert cli.train_main([]) == 2
    assert capsys.readouterr().out.startswith("usage: specdec-train recipe=NAME")


def test_unknown_recipe_exits_2_naming_the_recipes(capsys: pytest.CaptureFixture) -> None:
    assert cli.train_main(["recipe=nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specdec-train: recipe=nope: no such recipe. The recipes are: ctc_smollm2")


def test_console_script_refuses_an_unknown_key_with_one_message_and_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [SCRIPTS / "specdec-train", "recipe=tiny", "trainer.nonsense=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "specdec-train: recipe=tiny: trainer.nonsense: unknown key; TrainerConfig has: accelerator, devices, "
        "num_nodes, strategy, precision, max_steps, max_epochs, accumulate_grad_batches, gradient_clip_val, "
        "log_every_n_steps"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written for a refused config


def test_config_goes_to_run_dir_and_hydra_leaves_cwd_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    # no drafter in run1 yet: export stops with its message, after the config is written
    assert cli.export_main(["recipe=tiny", "run.dir=run1", "data.max_samples=3", "export.format=sglang"]) == 2
    assert os.getcwd() == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1"]  # no outputs/ or .hydra/
    overrides = ["run.dir=run1", "data.max_samples=3", "export.format=sglang"]
    assert compose_recipe("run1/export-config.yaml", []) == compose_recipe("tiny", overrides)
    assert "export.drafter=run1/drafter: no drafter there" in capsys.readouterr().err


def test_train_on_the_tiny_recipe_runs_the_whole_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """recipe=tiny: cache, 8 steps with the eval hook, checkpoints, the drafter, the final report."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli.train_main(["recipe=tiny", f"run.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "trained 8 steps on " in out and "trained    tau " in out and "untrained  tau " in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"trained", "untrained", "ngram"}  # n-gram lookup: the zero-training baseline
    assert report["trained"]["greedy_matches_target"] == 1.0 and report["trained"]["k"] == 4
    assert report["ngram"]["k"] == 8 and report["ngram"]["drafter"] == "ngram"
    assert report["trained"]["ar_tokens_per_s"] == report["untrained"]["ar_tokens_per_s"]  # one shared baseline
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "drafter").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(tmp_path / "logs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ttt", "train/sim_tau", "train/acc_step_0", "lr", "eval/tau"} <= tags
    assert [event.step for event in events.Scalars("eval/tau")] == [4, 8]  # eval.every_n_steps=4

    # specdec-eval reads the saved drafter back, here drafting trees
    argv = ["recipe=tiny", f"run.dir={tmp_path}", f"eval.drafter={tmp_path}/drafter", "eval.tree_width=2"]
    assert cli.eval_main([*argv, f"eval.out={tmp_path}/trees.json"]) == 0
    trees = json.loads((tmp_path / "trees.json").read_text())
    assert trees["trained"]["tree_width"] == 2 and trees["trained"]["greedy_matches_target"] == 1.0


def test_a_run_serving_the_hybrid_reports_it_beside_the_drafter_alone_and_lookup(tmp_path: Path) -> None:
    """eval.ngram_first: the trained row is lookup (up to 8) with the drafter at eval.k elsewhere;
    specdec-eval's rows take it too, at their own k."""
    import json

    argv = ["recipe=tiny", f"run.dir={tmp_path}", "trainer.max_steps=2", "eval.k=2", "eval.ngram_first=true"]
    assert cli.train_main(argv) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"trained", "trained, fixed K", "untrained", "ngram"}
    assert report["trained"]["mode"] == "ngram_first" and report["trained"]["k"] == 8
    assert report["trained, fixed K"]["k"] == 2 and report["trained, fixed K"]["mode"] is None
    assert all(row["greedy_matches_target"] == 1.0 for row in report.values())
    rows = (
        f"[{{name: hybrid, drafter: {tmp_path}/drafter, k: 1}}, "  # eval.ngram_first=true: the hybrid
        f"{{name: alone, drafter: {tmp_path}/drafter, k: 1, ngram_first: false}}]"
    )
    assert cli.eval_main([*argv, f"eval.compare={rows}", f"eval.out={tmp_path}/compare.json"]) == 0
    compare = json.loads((tmp_path / "compare.json").read_text())
    assert (compare["hybrid"]["mode"], compare["hybrid"]["k"]) == ("ngram_first", 8)
    assert (compare["alone"]["mode"], compare["alone"]["k"]) == (None, 1)
    assert all(row["greedy_matches_target"] == 1.0 for row in compare.values())


def test_a_target_path_that_does_not_exist_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.train_main(["recipe=tiny", f"run.dir={tmp_path}", "target.path=/no/such/model"]) == 2
    assert "target.path=/no/such/model does not exist" in capsys.readouterr().err


def test_a_draft_whose_tokenizer_differs_from_the_target_exits_2(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = [f"run.dir={tmp_path}", f"draft.init={tiny_llama_dir}", "target.random_init={num_hidden_layers: 1}"]
    assert cli.train_main(["recipe=pard_smollm2", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"The draft tokenizer ({tiny_llama_dir}) disagrees with the target's" in err


def test_prep_on_the_tiny_recipe_builds_a_cache_from_sharegpt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["recipe=tiny", f"run.dir={tmp_path}", "data.max_samples=6", "data.max_length=64"]
    assert cli.prep_main(argv) == 0
    out = capsys.readouterr().out
    assert f"cache {tmp_path}/cache (complete)" in out
    assert "layers [1, 2, 3, 4]" in out
    per_token = int(out.split(" bytes per token (bf16)")[0].rsplit(" ", 1)[1])
    assert 4 * 64 * 2 + 5 <= per_token < 1.1 * (4 * 64 * 2 + 5)  # 4 layers x hidden 64 in bf16, id, mask, headers
    from specdec.data_prep import HiddenStateCache

    cache = HiddenStateCache(tmp_path / "cache")
    assert cache.layers == [1, 2, 3, 4] and cache[0]["hidden"].shape[1:] == (4, 64)


@pytest.mark.slow
def test_prep_on_the_real_target_and_sharegpt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["recipe=smollm2_eagle3", f"run.dir={tmp_path}", "data.max_samples=6", "data.max_length=96"]
    assert cli.prep_main(argv) == 0
    out = capsys.readouterr().out
    assert "layers [2, 15, 27, 30]" in out
    from specdec.data_prep import HiddenStateCache

    cache = HiddenStateCache(tmp_path / "cache")
    assert cache[0]["hidden"].shape[1:] == (4, 576) and cache[0]["loss_mask"].any()


@pytest.fixture(scope="module")
def smollm2_shaped_drafter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Llama with SmolLM2's tokenizer, saved as a plain HF directory."""
    from specdec.data_prep import TargetConfig, asset_path, load_target

    shape = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    draft = load_target(
        TargetConfig(
            path=str(asset_path("smollm2_gguf")), random_init={**shape, "num_key_value_heads": 1, "head_dim": 16}
        ),
        seed=5,
    )
    path = tmp_path_factory.mktemp("drafter")
    draft.model.save_pretrained(path)
    draft.tokenizer.save_pretrained(path)
    return path


def test_eval_writes_the_report_and_the_plot(
    smollm2_shaped_drafter: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    argv = [
        "recipe=tiny",
        f"run.dir={tmp_path}",
        f"eval.drafter={smollm2_shaped_drafter}",
        "eval.num_prompts=3",
        "eval.max_new_tokens=12",
        "eval.k=3",
    ]
    assert cli.eval_main(argv) == 0
    report = json.loads((tmp_path / "eval.json").read_text())["drafter"]
    assert report["num_prompts"] == 3 and report["k"] == 3 and report["greedy_matches_target"] == 1.0
    # tau - 1 is the mean accepted per step: the sum of P(accepted > i) over positions, and K x accept_rate
    assert len(report["accept_rate_per_pos"]) == 3 and report["drafted_per_step"] == 3
    assert report["tau"] == pytest.approx(1 + sum(report["accept_rate_per_pos"]))
    assert report["tau"] == pytest.approx(1 + 3 * report["accept_rate"])
    assert report["speedup"] == pytest.approx(report["tokens_per_s"] / report["ar_tokens_per_s"])
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tau " in capsys.readouterr().out


def test_eval_without_a_drafter_says_what_to_give(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.eval_main(["recipe=tiny", f"run.dir={tmp_path}"]) == 2
    assert "eval.drafter: required" in capsys.readouterr().err


def test_eval_compare_is_read_from_a_hydra_override_and_survives_the_saved_config(tmp_path: Path) -> None:
    from specdec.trainer.config import CompareConfig, to_yaml

    rows = "[{name: a, drafter: runs/x/drafter, k: 8}, {name: b, drafter: some/lm, untrained: true, mode: causal_lm}]"
    cfg = compose_recipe("tiny", [f"eval.compare={rows}"])
    assert cfg.eval.compare == [
        CompareConfig(name="a", drafter="runs/x/drafter", k=8),
        CompareConfig(name="b", drafter="some/lm", untrained=True, mode="causal_lm"),
    ]
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert compose_recipe(str(tmp_path / "config.yaml"), []) == cfg  # the run's config.yaml is a recipe again
    assert compose_recipe("tiny", [f"eval.compare={rows}", "eval.compare.0.k=3"]).eval.compare[0].k == 3


def test_eval_compare_refuses_a_row_without_its_name_naming_the_key() -> None:
    from specdec.trainer.config import RecipeError

    with pytest.raises(RecipeError, match=r"eval\.compare\[1\]\.name: required"):
        compose_recipe("tiny", ["eval.compare=[{name: a, drafter: x}, {drafter: y}]"])


@pytest.fixture(scope="module")
def tiny_eagle3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EAGLE-3 drafter for the tiny recipe's target, saved as specdec-train saves one (seed 1: not
    the untrained start, which specdec-eval rebuilds with run.seed 0)."""
    import torch

    from specdec.data_prep import load_target
    from specdec.trainer.drafters.draft_vocab import draft_vocab
    from specdec.trainer.drafters.eagle3 import EAGLE3, new_eagle3

    cfg = compose_recipe("tiny", [])
    target = load_target(cfg.target, seed=cfg.run.seed)
    counts = torch.arange(target.model.config.vocab_size).flip(0)  # the draft vocabulary: the lowest ids
    d2t, t2d = draft_vocab(counts, cfg.draft.vocab_size)
    draft = new_eagle3(target.model, d2t, t2d, seed=1)
    return EAGLE3.save(draft, tmp_path_factory.mktemp("eagle3"), target.model.config, (1, 2, 3))


def _counting(calls: list[str], name: str, function):
    def counted(*args):
        calls.append(name)
        return function(*args)

    return counted


def test_eval_compare_measures_each_row_at_its_own_k_against_one_baseline(
    tiny_eagle3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import dataclasses
    import json

    from specdec.trainer.drafters import DRAFTERS
    from specdec.trainer.drafters.eagle3 import EAGLE3

    calls = []  # the directory is loaded once for its three rows; the untrained start is built once
    counted = dataclasses.replace(
        EAGLE3,
        load=_counting(calls, "load", EAGLE3.load),
        untrained_like=_counting(calls, "untrained_like", EAGLE3.untrained_like),
        modes={"chain": _counting(calls, "chain", EAGLE3.session)},
    )
    monkeypatch.setitem(DRAFTERS, "eagle3", counted)
    rows = (
        f"[{{name: trained, drafter: {tiny_eagle3_dir}, k: 2}}, {{name: start, drafter: {tiny_eagle3_dir}, "
        f"untrained: true, k: 3, tree_width: 2}}, {{name: trained-chain, drafter: {tiny_eagle3_dir}, mode: chain}}, "
        f"{{name: dynamic, drafter: {tiny_eagle3_dir}, k: 3, tree_width: 3, tree_min_confidence: 0.5}}]"
    )
    argv = ["recipe=tiny", f"run.dir={tmp_path}", "eval.num_prompts=2", "eval.max_new_tokens=8", "eval.k=4"]
    assert cli.eval_main([*argv, f"eval.compare={rows}"]) == 0
    assert calls == ["load", "untrained_like", "chain"]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report) == ["trained", "start", "trained-chain", "dynamic"]
    assert [row["k"] for row in report.values()] == [2, 3, 4, 3]  # a row without k takes eval.k
    assert [row["tree_width"] for row in report.values()] == [1, 2, 1, 3]  # and eval.tree_width
    assert [row["tree_min_confidence"] for row in report.values()] == [0, 0, 0, 0.5]
    assert report["dynamic"]["drafted_per_step"] < 9  # sized by the drafter's confidence, not 3 x 3
    assert [len(row["accept_rate_per_pos"]) for row in report.values()] == [2, 3, 4, 3]
    assert len({row["ar_tokens_per_s"] for row in report.values()}) == 1  # one shared baseline
    assert all(row["greedy_matches_target"] == 1.0 for row in report.values())
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["trained", "start", "trained-chain"]
    assert [line.split()[3:5] for line in lines[2:5]] == [
        ["k=2,", "accepted"],
        ["k=3", "tree_width=2,"],
        ["k=4", "chain,"],
    ]
    assert lines[3].split()[4] == "tree_width=2,"  # printed for a tree only
    assert lines[5].split()[4:8] == ["tree_width=3", "dynamic", "(min", "confidence"]
    assert all(" ms/step" in line for line in lines[2:6])


def test_eval_compare_refuses_bad_rows_in_one_message_before_loading_anything(
    tiny_eagle3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lm = tmp_path / "some-lm"  # not a saved drafter: read as a causal LM
    rows = (
        f"[{{name: a, drafter: {tiny_eagle3_dir}}}, "
        f"{{name: a, drafter: {tiny_eagle3_dir}, mode: parallel, k: 0, tree_width: 0, tree_min_confidence: 1}}, "
        f"{{name: c, drafter: {lm}, untrained: true, mode: parallel}}]"
    )
    assert cli.eval_main(["recipe=tiny", f"run.dir={tmp_path}", f"eval.compare={rows}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("specdec-eval: eval.compare[1].name: 'a' is also the name of ")
    assert "eval.compare[1].k: 0; expected null (eval.k) or at least one draft token" in err
    assert "eval.compare[1].tree_width: 0; expected null (eval.tree_width), 1 or more" in err
    assert "eval.compare[1].tree_min_confidence: 1.0; expected a probability in [0, 1)" in err
    assert (
        f"eval.compare[1].mode: 'parallel' is not a serving mode of the eagle3 drafter in {tiny_eagle3_dir}; "
        "choose null (its default session)"
    ) in err
    assert f"eval.compare[2].untrained: true, but {lm} is not a drafter saved by specdec-train" in err
    assert "eval.compare[2].mode: 'parallel', but " in err
    assert not (tmp_path / "eval.json").exists()
