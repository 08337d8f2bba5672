"""specdec-export on the tiny recipe: each format loads back into the engine with the same tokens,
the layer ids each engine reads name the layers the drafter was trained on, the speculators
package's own config classes accept the speculators export, the model card's numbers are the eval
report's, and the push: a dry run lists the files, a token never shows, errors exit 2."""

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from specdec.data_prep import TargetConfig, load_target
from specdec.data_prep.assets import asset_path
from specdec.eval.engine import SpecConfig, generate
from specdec.eval.prompts import load_prompts
from specdec.trainer import cli, hub
from specdec.trainer.config import compose_recipe
from specdec.trainer.drafters import saved_kind
from specdec.trainer.drafters.pard import PardDraftConfig, new_pard
from specdec.trainer.drafters.pard import save as save_pard
from specdec.trainer.train import eos_token_ids

FAKE_TOKEN = "hf_FAKEtokenNEVERshown0123456789"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipe=tiny trained with export.format=sglang: the run ends with its export."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    assert cli.train_main(["recipe=tiny", f"run.dir={run_dir}", "export.format=sglang"]) == 0
    return run_dir


def _export(run_dir: Path, out: Path, *overrides: str) -> int:
    return cli.export_main(["recipe=tiny", f"run.dir={run_dir}", f"export.dir={out}", *overrides])


def _decode(target, drafter_dir: Path, prompts) -> tuple[list, list]:
    """(new tokens, accepted per step) of greedy speculative decoding with the drafter in drafter_dir."""
    model, layers = saved_kind(drafter_dir).load(drafter_dir, target.model)
    session = saved_kind(drafter_dir).session(model, layers)
    result = generate(
        target.model,
        [prompt.token_ids for prompt in prompts],
        drafter=session,
        cfg=SpecConfig(k=3, max_new_tokens=12),
        eos_token_ids=eos_token_ids(target),
    )
    return result.new_tokens, result.accepted


def test_train_with_export_format_ends_with_the_export_and_its_card(run: Path) -> None:
    export = run / "export"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    card = (export / "README.md").read_text()
    report = json.loads((run / "eval.json").read_text())
    trained = report["trained"]
    rows = [line for line in card.splitlines() if line.startswith(f"| {trained['bench']} |")]
    assert len(rows) == 1  # the trained drafter's row; its untrained start is not this drafter
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[7] == f"{trained['tau']:.3f}"
    assert cells[8] == " ".join(f"{rate:.2f}" for rate in trained["accept_rate_per_pos"])
    assert cells[9] == f"{trained['tokens_per_s']:.1f} ({trained['speedup']:.2f}x)"
    assert (cells[3], cells[1], cells[12]) == (str(trained["k"]), str(trained["num_prompts"]), trained["date"])
    assert (export / "training_recipe.yaml").read_text() == (run / "config.yaml").read_text()
    provenance = json.loads((export / "specdec_provenance.json").read_text())
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    assert provenance["cache"]["key_hash"] == manifest["key_hash"]
    assert provenance["target_layers"] == [1, 2, 3]


@pytest.mark.parametrize("fmt", ["sglang", "speculators"])
def test_each_eagle3_export_loads_back_with_the_same_weights_tokens_and_tau(run: Path, tmp_path: Path, fmt) -> None:
    out = tmp_path / fmt
    assert _export(run, out, f"export.format={fmt}") == 0
    assert not any(name.startswith("embed_tokens") for name in load_file(out / "model.safetensors"))
    cfg = compose_recipe("tiny", [f"run.dir={run}"])
    target = load_target(cfg.target, seed=cfg.run.seed)
    kind = saved_kind(out)
    assert kind is saved_kind(run / "drafter")
    source, source_layers = kind.load(run / "drafter", target.model)
    exported, exported_layers = kind.load(out, target.model)
    assert exported_layers == source_layers == (1, 2, 3)
    exported_state = exported.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(exported_state[name], tensor), name
    prompts = load_prompts("mtbench", target.tokenizer, num_prompts=3)
    tokens, accepted = _decode(target, run / "drafter", prompts)
    assert _decode(target, out, prompts) == (tokens, accepted)  # identical tokens, so identical tau


def test_the_layer_ids_each_engine_reads_are_the_cached_layers(run: Path, tmp_path: Path) -> None:
    """SGLang's ids name the decoder layer whose output is taken, vLLM's (and speculators') the HF
    hidden-state index; both must pick the target states the drafter was trained on."""
    assert _export(run, tmp_path / "sglang", "export.format=sglang") == 0
    assert _export(run, tmp_path / "speculators", "export.format=speculators") == 0
    sglang_ids = json.loads((tmp_path / "sglang" / "config.json").read_text())["eagle_config"][
        "eagle_aux_hidden_state_layer_ids"
    ]
    vllm_ids = json.loads((tmp_path / "speculators" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"]
    cfg = compose_recipe("tiny", [f"run.dir={run}"])
    cached = list(cfg.cache.layers[:-1])  # the last cached layer is the teacher's final state
    assert vllm_ids == cached and sglang_ids == [i - 1 for i in cached]

    target = load_target(cfg.target, seed=cfg.run.seed)
    outputs = {}
    hooks = [
        target.model.model.layers[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i in sglang_ids
    ]
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        hidden = target.model(ids, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    for sglang_id, vllm_id in zip(sglang_ids, vllm_ids, strict=True):
        layer_output = outputs[sglang_id][0] if isinstance(outputs[sglang_id], tuple) else outputs[sglang_id]
        assert torch.equal(layer_output, hidden[vllm_id])  # the same physical tensor, whichever engine reads it


def test_the_speculators_export_validates_with_the_speculators_packages_own_classes(run: Path, tmp_path: Path) -> None:
    from speculators import SpeculatorModelConfig
    from speculators.models.eagle3 import Eagle3SpeculatorConfig

    out = tmp_path / "speculators"
    assert _export(run, out, "export.format=speculators") == 0
    config = SpeculatorModelConfig.from_pretrained(str(out), local_files_only=True)
    assert isinstance(config, Eagle3SpeculatorConfig)
    assert config.eagle_aux_hidden_state_layer_ids == [1, 2, 3]
    assert config.norm_before_residual is False  # written out: vLLM reads a missing one as true
    assert config.transformer_layer_config.model_type == "llama"
    assert config.transformer_layer_config.hidden_size == 64
    assert config.speculators_config.verifier.name_or_path == str(asset_path("smollm2_gguf"))
    assert config.speculators_config.verifier.architectures == ["LlamaForCausalLM"]
    assert config.speculators_config.proposal_methods[0].speculative_tokens == 4  # eval.k
    raw = json.loads((out / "config.json").read_text())
    # what the package accepts without checking (a missing speculators_config, an unknown key)
    assert set(raw) <= set(Eagle3SpeculatorConfig.model_fields) | {"torch_dtype"}
    layer_keys = {name for name in load_file(out / "model.safetensors") if name.startswith("layers.0.")}
    assert "layers.0.self_attn.q_proj.weight" in layer_keys and not any("midlayer" in n for n in layer_keys)


def test_a_format_that_does_not_fit_the_drafter_is_refused_with_those_that_do(run, tmp_path, capsys) -> None:
    assert _export(run, tmp_path / "hf", "export.format=hf") == 2
    err = capsys.readouterr().err
    assert (
        "export.format: hf, which does not fit the eagle3 drafter" in err
        and "it exports as: sglang, speculators" in err
    )
    assert not (tmp_path / "hf").exists()


def test_without_an_eval_report_the_card_says_not_measured(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "card"
    assert _export(run, out, "export.format=sglang", "export.reports=[]") == 0
    card = (out / "README.md").read_text()
    assert "Not measured" in card and "| tau |" not in card
    report = json.loads((run / "eval.json").read_text())
    assert f"{report['trained']['tau']:.3f}" not in card


def test_an_export_dir_that_is_not_an_export_is_left_alone(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _export(run, out, "export.format=sglang") == 2
    assert "is not a specdec export" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert _export(run, tmp_path / "again", "export.format=sglang") == 0
    assert _export(run, tmp_path / "again", "export.format=speculators") == 0  # an earlier export is replaced
    assert json.loads((tmp_path / "again" / "config.json").read_text())["speculators_model_type"] == "eagle3"


def test_a_checkpoint_exports_the_drafter_it_holds(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "from_ckpt"
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert _export(run, out, "export.format=sglang", f"export.drafter={checkpoint}") == 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    exported = load_file(out / "model.safetensors")
    for name, tensor in exported.items():
        assert torch.equal(tensor, state[f"draft.{name}"].to(tensor.dtype)), name


# ---- the hf format: PARD and plain drafters ----


def test_a_pard_drafter_exports_as_a_plain_causal_lm_that_serves_the_same_tokens(
    tiny_llama_dir: Path, tmp_path
) -> None:
    draft_cfg = PardDraftConfig(init=str(tiny_llama_dir), mask_token_id=3, k=3)
    drafter = save_pard(new_pard(draft_cfg, torch.float32), tmp_path / "run" / "drafter", None, ())
    out = tmp_path / "export"
    argv = [
        "recipe=pard_smollm2",
        f"target.path={tiny_llama_dir}",
        "target.dtype=float32",
        f"draft.init={tiny_llama_dir}",
        "draft.mask_token_id=3",
        "draft.num_layers=null",
        f"run.dir={tmp_path / 'run'}",
        f"export.dir={out}",
    ]
    assert cli.export_main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.pard_token, model.config.spd_type) == (3, "pard")
    source = AutoModelForCausalLM.from_pretrained(drafter)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and '"parallel_drafting": true' in card

    target = load_target(TargetConfig(path=str(tiny_llama_dir)))
    prompts = [[1, 4, 6, 8], [2, 5, 7]]
    results = []
    for directory in (drafter, out):
        kind = saved_kind(directory)
        session = kind.session(*kind.load(directory, target.model))
        result = generate(
            target.model, prompts, drafter=session, cfg=SpecConfig(k=3, max_new_tokens=10), eos_token_ids=set()
        )
        results.append((result.new_tokens, result.accepted))
    assert results[0] == results[1]


# ---- the push ----


class FakeApi:
    """HfApi as far as the push uses it; records its calls."""

    calls: ClassVar[list] = []
    exists: ClassVar[bool] = False

    def __init__(self, token=None) -> None:
        FakeApi.calls.append(("init", token is not None))

    def repo_exists(self, repo_id):
        return FakeApi.exists

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

        return Commit()


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch):
    FakeApi.calls, FakeApi.exists = [], False
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return FakeApi


def test_a_dry_run_lists_the_files_and_the_repo_without_network(run, tmp_path, fake_api, capsys) -> None:
    out = tmp_path / "dry"
    assert _export(run, out, "export.format=sglang", "export.push_to=me/tiny-eagle3", "export.dry_run=true") == 0
    printed = capsys.readouterr().out
    assert fake_api.calls == []  # no Hub client was even made
    assert "dry run, nothing sent" in printed and "huggingface.co/me/tiny-eagle3" in printed
    for path in out.iterdir():
        assert f"    {path.name}  " in printed
    assert "token: found" in printed and FAKE_TOKEN not in printed


def test_a_push_creates_the_repo_and_uploads_the_export(run, tmp_path, fake_api, capsys) -> None:
    out = tmp_path / "push"
    argv = ["export.format=sglang", "export.push_to=me/tiny-eagle3", "export.revision=v1"]
    assert _export(run, out, *argv) == 0
    assert fake_api.calls[1] == ("create_repo", "me/tiny-eagle3", {"private": True, "exist_ok": True})
    assert fake_api.calls[2] == ("create_branch", "me/tiny-eagle3", {"branch": "v1", "exist_ok": True})
    upload = fake_api.calls[3][1]
    assert (upload["folder_path"], upload["revision"], upload["delete_patterns"]) == (out, "v1", None)
    assert "pushed: https://huggingface.co/me/tiny-eagle3/commit/abc" in capsys.readouterr().out

    fake_api.exists = True
    assert _export(run, out, *argv) == 2
    assert "the repo exists. Set export.overwrite=true" in capsys.readouterr().err
    assert _export(run, out, *argv, "export.overwrite=true") == 0
    assert fake_api.calls[-1][1]["delete_patterns"] == "*"  # the export replaces what was there


def test_no_token_no_network_and_a_refused_token_exit_2_and_never_show_it(run, tmp_path, monkeypatch, capsys, caplog):
    out, argv = tmp_path / "push", ["export.format=sglang", "export.push_to=me/tiny-eagle3"]
    monkeypatch.setattr(hub, "get_token", lambda: None)
    assert _export(run, out, *argv) == 2
    assert "no Hugging Face token. Set HF_TOKEN" in capsys.readouterr().err

    monkeypatch.undo()
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert _export(run, out, *argv) == 2
    captured = capsys.readouterr()
    assert "could not be reached" in captured.err

    class Refused(FakeApi):
        def repo_exists(self, repo_id):
            response = type("Response", (), {"status_code": 401, "headers": {}, "request": None})()
            raise HfHubHTTPError(f"401 Unauthorized: token {FAKE_TOKEN} is invalid", response=response)

    monkeypatch.setattr(hub, "HfApi", Refused)
    assert _export(run, out, *argv) == 2
    refused = capsys.readouterr()
    assert "the Hub answered 401: the token was refused" in refused.err
    shown = captured.out + captured.err + refused.out + refused.err + caplog.text
    written = b"".join(path.read_bytes() for path in run.parent.rglob("*") if path.is_file())
    assert FAKE_TOKEN not in shown and FAKE_TOKEN.encode() not in written


def test_a_bad_repo_id_is_refused_before_anything_is_written(run: Path, tmp_path: Path, capsys) -> None:
    assert _export(run, tmp_path / "x", "export.format=sglang", "export.push_to=not a repo") == 2
    assert "export.push_to=not a repo: expected a Hub repo id ORG/NAME" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_trainers_raw_output_dir_is_refused_with_how_to_export_it(run: Path, tmp_path: Path, capsys) -> None:
    """SpecForge's output_dir holds `{run_id}-step{N}/training_state.pt` pickles and no config.json."""
    raw = tmp_path / "out" / "anchor-step8"
    raw.mkdir(parents=True)
    (raw / "training_state.pt").write_bytes(b"not read")
    argv = ["recipe=tiny", f"run.dir={run}", f"eval.drafter={raw.parent}", "eval.num_prompts=1"]
    assert cli.eval_main(argv) == 2
    assert "a directory without config.json, so not a drafter" in capsys.readouterr().err
