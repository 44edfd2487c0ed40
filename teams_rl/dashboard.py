"""wandb dashboards as code: one saved workspace with a section per stage, built with `wandb-workspaces`.

    python -m teams_rl.dashboard                                   # offline: writes the spec, prints its path
    WANDB_MODE=online python -m teams_rl.dashboard --entity E      # saves the workspace to E/teams_rl

Every stage is its own wandb run (`teams_rl.tracking`: job_type = stage, group = experiment, tags =
`group=choice` for the Hydra choices in TAGGED_GROUPS), so the workspace groups the runs by experiment and can
be narrowed to runs with given tags (`--tag rl=trpo --tag operators=teams_rl`: all of them) or one experiment.
Offline (WANDB_MODE offline/disabled, no --entity, or no API key) nothing touches the network: the workspace
is serialised through its pydantic model as the JSON that `Workspace.save()` would upload.

The panels plot only keys the stages log (checked against a real smoke run by tests/test_dashboard.py); a
family whose members depend on the config (operator names, drop reasons) is a regex or a logged table.
"""

from __future__ import annotations

import argparse
import json
import netrc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from teams_rl.errors import TeamsRLError

DEFAULT_OUT = Path("outputs") / "dashboard" / "workspace.json"
BENCHMARKS = ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "average")
ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "ref")
QUALITY = ("distinct_1", "distinct_2", "self_bleu", "vendi", "words_mean")
# (stage, role) pairs the default pipeline spends queries on; every role's costs are in report/llm_accounting
COST_ROLES = (("policy", "instructor"), ("generate", "expert"))


@dataclass(frozen=True)
class Panel:
    """One panel: `line` (history over steps), `bar` (one value per run and key), `media` (logged images) or
    `table` (a logged wandb.Table). `keys` are logged keys; `regex` matches a family of them (line only)."""

    kind: str
    title: str
    keys: tuple[str, ...] = ()
    regex: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def sections() -> list[Section]:
    """The workspace's sections, top to bottom."""
    q = "generate/quality"
    return [
        Section("Policy", (
            Panel("line", "Mean reward per update", ("policy/mean_reward", "policy/mean_episode_return")),
            Panel("line", "Operator probabilities of the policy", regex="^policy/op_prob/.*"),
            Panel("line", "Operators chosen in the rollouts", regex="^policy/action_frac/.*"),
            Panel("line", "Policy entropy", ("policy/entropy",)),
            Panel("media", "Learning curve", ("policy/learning_curve",)),
        )),
        Section("Generate: records and drops", (
            Panel("bar", "Records", ("generate/evolutions", "generate/dataset/size", "generate/dataset/train",
                                     "generate/dataset/heldout", "generate/dropped")),
            Panel("table", "Drops by reason", ("generate/dropped_by_reason",)),
            Panel("bar", "LLM calls", ("generate/calls/expert/evolve", "generate/calls/expert/answer",
                                       "generate/calls/total")),
            Panel("media", "Lengths and operator mix", ("generate/lengths", "generate/operators")),
        )),
        Section("Generate: quality (seeds vs generated)", tuple(
            Panel("bar", metric, (f"{q}/seeds/{metric}", f"{q}/overall/{metric}")) for metric in QUALITY
        ) + (
            Panel("bar", "IFD of the generated records", (f"{q}/overall/ifd_mean", f"{q}/overall/ifd_median",
                                                         f"{q}/overall/ifd_n")),
            Panel("bar", "n per figure", (f"{q}/seeds/n", f"{q}/overall/n", f"{q}/overall/self_bleu_n",
                                          f"{q}/overall/vendi_n")),
            Panel("line", "Vendi per operator and step", regex=f"^{q}/(operator|step)/.*/vendi$"),
            Panel("table", "Quality per operator and step (with n)", ("report/dataset_quality",)),
        )),
        Section("Finetune", (
            Panel("line", "Training loss", ("finetune/loss",)),
            Panel("line", "Tokens per second", ("finetune/tokens_per_s",)),
            Panel("line", "Learning rate and gradient norm", ("finetune/lr", "finetune/grad_norm")),
            Panel("bar", "First and final loss", ("finetune/first_loss", "finetune/final_loss")),
        )),
        Section("Evaluate: base vs fine-tuned", tuple(
            Panel("bar", bench, (f"eval/base/{bench}", f"eval/finetuned/{bench}")) for bench in BENCHMARKS
        ) + (
            Panel("bar", "Fine-tuned minus base", tuple(f"eval/delta/{b}" for b in BENCHMARKS)),
            Panel("table", "Open LLM v1 table", ("report/openllm_v1",)),
        )),
        Section("Privacy: membership inference", (
            Panel("bar", "ROC-AUC per attack", tuple(f"privacy/{a}/auc" for a in ATTACKS)),
            Panel("bar", "TPR at 1% FPR", tuple(f"privacy/{a}/tpr@1%fpr" for a in ATTACKS)),
            Panel("bar", "Members and non-members (n)", ("privacy/n_members", "privacy/n_nonmembers")),
            Panel("media", "ROC curves", ("privacy/roc",)),
            Panel("table", "Attacks with intervals", ("privacy/attacks",)),
        )),
        Section("Cost per role", tuple(
            Panel("bar", f"{role} ({stage})", tuple(f"cost/{stage}/{role}/{c}" for c in
                                                    ("queries", "prompt_tokens", "completion_tokens", "usd")))
            for stage, role in COST_ROLES
        ) + (
            Panel("table", "LLM accounting, every role", ("report/llm_accounting",)),
        )),
    ]


def build(entity: str, project: str, *, name: str = "teams_rl", tags: list[str] = (), experiment: str | None = None):
    """The `wandb_workspaces` Workspace (constructing it sends nothing)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    def panel(p: Panel):
        if p.kind == "line":
            return wr.LinePlot(title=p.title, x="Step", y=list(p.keys), metric_regex=p.regex)
        if p.kind == "bar":
            return wr.BarPlot(title=p.title, metrics=list(p.keys), orientation="v")
        if p.kind == "media":
            return wr.MediaBrowser(title=p.title, media_keys=list(p.keys))
        if p.kind == "table":
            return wr.WeavePanelSummaryTable(table_name=p.keys[0])
        raise TeamsRLError(f"dashboard: unknown panel kind {p.kind!r}")

    filters = [expr.Tags().isin([tag]) for tag in tags]      # each tag required: the filters are AND'd
    if experiment:
        filters.append(expr.Metric("Group") == experiment)
    workspace = ws.Workspace(
        entity=entity, project=project, name=name,
        sections=[ws.Section(name=s.name, panels=[panel(p) for p in s.panels], is_open=True) for s in sections()],
        runset_settings=ws.RunsetSettings(groupby=[expr.Metric("Group")], filters=expr.And(*filters) if filters else ""),
    )
    if filters:
        # wandb-workspaces 0.4.13 turns the filters into a string and parses it back, which rewrites the `=`
        # inside a tag (`rl=trpo` -> `rl==trpo`); its load/save round trip replays a stashed filter tree instead
        tree = expr.filters_tree_to_v2(expr._filter_items_to_filters_tree(filters))
        object.__setattr__(workspace, "_stashed_filters_v2", tree)
        object.__setattr__(workspace, "_stashed_filter_string", workspace.runset_settings.filters)
    return workspace


def spec_json(workspace) -> dict:
    """The view as `Workspace.save()` would upload it (entity, project, name and the spec), without saving."""
    view = workspace._to_model()
    out = view.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"spec"})
    out["spec"] = json.loads(view.spec.model_dump_json(by_alias=True, exclude_none=True))
    return out


def logged_in() -> bool:
    """An API key in the environment or in ~/.netrc for the wandb host (checked without a request)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def offline_reason(entity: str | None) -> str | None:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={mode}"
    if not entity:
        return "no --entity"
    if not logged_in():
        return "no wandb API key (run `wandb login` or set WANDB_API_KEY)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m teams_rl.dashboard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--entity", help="wandb entity to save the workspace to (online)")
    ap.add_argument("--project", default="teams_rl", help="wandb project (default: teams_rl, as conf/logger/wandb)")
    ap.add_argument("--name", default="teams_rl", help="the workspace's name")
    ap.add_argument("--tag", action="append", default=[], help="only runs with this tag, e.g. rl=trpo (repeatable)")
    ap.add_argument("--experiment", help="only the runs of this experiment (the wandb group)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"offline spec file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    try:
        workspace = build(args.entity or "offline", args.project, name=args.name, tags=args.tag,
                          experiment=args.experiment)
        reason = offline_reason(args.entity)
        if reason is None:
            try:
                workspace.save()
            except Exception as err:  # an HTTP or GraphQL error: one line, not a traceback
                raise TeamsRLError(f"dashboard: saving to {args.entity}/{args.project} failed: "
                                   f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
            print(f"dashboard: saved workspace '{args.name}' to {args.entity}/{args.project}: {workspace.url}")
            return 0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(spec_json(workspace), indent=2, sort_keys=True))
        tmp.replace(args.out)
    except TeamsRLError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    panels = sum(len(s.panels) for s in sections())
    print(f"dashboard: offline ({reason}): wrote the workspace spec ({len(sections())} sections, {panels} panels) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
