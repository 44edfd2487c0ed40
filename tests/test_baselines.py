"""The paper's baselines: WizardLM-7b evaluated as given (wizardlm7b_eval) and the llama7b target fine-tuned on a
user-supplied WizardLM 70K file (wizardlm70k_sft). Both compose on the llama7b protocol, and a missing required
path is one `error:` line before any stage runs."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from teams_rl.pipeline import fingerprints, plan
from tests.conftest import compose_config
from tests.test_bad_inputs import CONFIG, check, run_cli_like, stage_folders


def pairs_file(path, n=3, tag="m"):
    path.write_text(json.dumps([{"instruction": f"{tag} instruction {i}", "output": f"{tag} answer {i}"}
                                for i in range(n)]))
    return path


def test_wizardlm7b_eval_evaluates_the_given_checkpoint_with_the_llama7b_protocol(tmp_path):
    members, nonmembers = pairs_file(tmp_path / "m.json"), pairs_file(tmp_path / "n.json", tag="n")
    checkpoint = tmp_path / "wizardlm-7b"
    checkpoint.mkdir()
    cfg = compose_config(["+experiment=wizardlm7b_eval", f"evaluate.model={checkpoint}",
                          f"privacy.members={members}", f"privacy.nonmembers={nonmembers}"], tmp_path)
    main = compose_config(["+experiment=llama7b"], tmp_path)
    assert plan(cfg) == ["evaluate_base", "evaluate", "privacy", "report"]   # nothing trained or generated
    assert cfg.privacy.model == str(checkpoint) and cfg.privacy.reference_model == main.target.model
    assert OmegaConf.to_container(cfg.evaluate.benchmarks) == OmegaConf.to_container(main.evaluate.benchmarks)
    assert list(cfg.privacy.attacks) == list(main.privacy.attacks) and cfg.privacy.match_size is True
    # the same base-model evaluation as the main run
    assert fingerprints(cfg, plan(cfg))["evaluate_base"] == fingerprints(main, plan(main))["evaluate_base"]


def test_wizardlm70k_sft_fine_tunes_the_llama7b_target_on_the_given_file(tmp_path):
    data, nonmembers = pairs_file(tmp_path / "w70k.json"), pairs_file(tmp_path / "n.json", tag="n")
    cfg = compose_config(["+experiment=wizardlm70k_sft", f"finetune.dataset={data}",
                          f"privacy.nonmembers={nonmembers}"], tmp_path)
    main = compose_config(["+experiment=llama7b"], tmp_path)
    assert plan(cfg) == ["finetune", "evaluate_base", "evaluate", "privacy", "report"]
    assert cfg.privacy.members == str(data)   # the training file is the member set
    assert OmegaConf.to_container(cfg.target) == OmegaConf.to_container(main.target)
    assert OmegaConf.to_container(cfg.deepspeed) == OmegaConf.to_container(main.deepspeed)
    assert cfg.finetune.nproc_per_node == main.finetune.nproc_per_node == 4


@pytest.mark.parametrize("experiment, given, missing", [
    ("wizardlm7b_eval", [], "evaluate.model"),
    ("wizardlm7b_eval", ["evaluate.model=WizardLMTeam/WizardLM-7B-V1.0"], "privacy.members"),
    ("wizardlm7b_eval", ["evaluate.model=WizardLMTeam/WizardLM-7B-V1.0", "privacy.members={m}"], "privacy.nonmembers"),
    ("wizardlm70k_sft", [], "finetune.dataset"),
    ("wizardlm70k_sft", ["finetune.dataset={m}"], "privacy.nonmembers"),
])
def test_a_missing_required_path_stops_before_any_stage(compose, tmp_path, capsys, experiment, given, missing):
    members = pairs_file(tmp_path / "m.json")
    overrides = [f"+experiment={experiment}", *[g.format(m=members) for g in given]]
    code, line, artifacts = run_cli_like(compose, tmp_path, overrides, capsys)
    check(code, line, CONFIG, f"+experiment={experiment} needs {missing}=...")
    assert not stage_folders(artifacts), "a stage started"
