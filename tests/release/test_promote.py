"""promote: a candidate is scored against the repository's version on a held-out split with compare's paired
bootstrap; a planted worse model (the trained weights with noise added) is refused, a better one (the
trained model against an early checkpoint of its run) is published, and each decision is a line of
promotions.jsonl with its figures."""

from __future__ import annotations

import gc
import json
import os
import shutil

import pytest
import torch
from torch.fx import graph_module
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from heavyranker.checkpoint import load_checkpoint, save_checkpoint
from heavyranker.cli import main
from heavyranker.errors import UserError
from heavyranker.eval.compare import loaded_model, score, validation_split
from heavyranker.eval.evaluator import evaluation_tasks
from heavyranker.eval.metrics import rce
from heavyranker.handlers import EXIT_REFUSED
from heavyranker.release.follow import Promoter
from heavyranker.release.promote import PromotionRule, promote
from heavyranker.serve.repository import ModelRepository
from heavyranker.serve.scorer import MANIFEST, Scorer
from heavyranker.serve.served_program import ServedProgram
from heavyranker.train.loop import Trainer
from tests.conftest import CONFIGS, SMALL_SPLITS, small_config
from tests.release.test_follow_promote import promote_setting

STEPS, EARLY = 60, 5
FAST = ("train_data.global_batch_size=64", "training.eval_log_every_n=1000", "training.train_log_every_n=100")
RUN = (
    f"training.num_train_steps={STEPS}",
    f"training.checkpoint_every_n={EARLY}",
    "training.checkpoint_max_to_keep=null",
)


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("run")
    config = small_config(small_data, save_dir, *FAST, *RUN)
    Trainer(config).run()
    return config, save_dir / "checkpoints"


@pytest.fixture(scope="module")
def noisy(run, tmp_path_factory):
    """The trained weights with noise of their own scale added: a model that scores worse everywhere."""
    _, checkpoints = run
    state = load_checkpoint(checkpoints / f"step_{STEPS}.pt")
    gen = torch.Generator().manual_seed(0)
    noisy = {
        name: value + 2.0 * value.std() * torch.randn(value.shape, generator=gen)
        if value.is_floating_point() and value.numel() > 1 and "running" not in name
        else value
        for name, value in state["model"].items()
    }
    return save_checkpoint(tmp_path_factory.mktemp("noisy"), STEPS + 1, {"model": noisy, "step": STEPS + 1})


def test_a_better_model_is_published_and_a_worse_one_refused(run, noisy, tmp_path):
    config, checkpoints = run
    repository = ModelRepository(tmp_path / "repo", "ranker")
    first = promote(config, repository, checkpoint=str(checkpoints / f"step_{EARLY}.pt"), format="pt2")
    assert first.published and first.version == 1 and first.tasks == {}
    better = promote(config, repository, checkpoint=str(checkpoints / f"step_{STEPS}.pt"), format="pt2")
    assert better.published and better.version == 2, better.reason
    # RCE rises over training: on most tasks the whole interval is above 0.
    improved = [t for t, f in better.tasks.items() if f["low"] > 0 and f["candidate"] > f["current"]]
    assert len(improved) >= len(better.tasks) // 2
    worse = promote(config, repository, checkpoint=str(noisy), format="pt2")
    assert not worse.published and worse.version is None
    assert any(f["worse"] and f["high"] < 0 for f in worse.tasks.values())
    assert worse.reason.startswith("rce worse than version 2 beyond the interval on ")
    assert repository.versions() == [1, 2]
    assert json.loads((repository.version_folder(2) / MANIFEST).read_text())["checkpoint"]["step"] == STEPS
    lines = repository.decisions()
    assert [line["published"] for line in lines] == [True, True, False]
    assert lines[2]["current"] == {"version": 2, "step": STEPS}
    assert lines[2]["tasks"] == {t: pytest.approx(f, nan_ok=True) for t, f in worse.tasks.items()}
    assert lines[2]["candidate"] == {"checkpoint": str(noisy), "step": STEPS + 1}


def test_the_checkpoint_a_version_serves_is_not_scored_against_itself(run, tmp_path):
    """Was refused as worse than itself: the eager model and its program differ by float rounding alone,
    which a task with one or two positives put wholly below 0. A file rewritten since is judged again."""
    config, checkpoints = run
    candidate = tmp_path / "checkpoints" / f"step_{STEPS}.pt"
    candidate.parent.mkdir()
    shutil.copyfile(checkpoints / f"step_{STEPS}.pt", candidate)
    repository = ModelRepository(tmp_path / "repo", "ranker")
    assert promote(config, repository, checkpoint=str(candidate)).version == 1
    again = promote(config, repository, checkpoint=str(candidate))
    assert not again.published and again.tasks == {}
    assert again.reason == "version 1 is this checkpoint already, exported as onnx fp32"
    later = repository.published(1) + 10  # the file written again after the version was published
    os.utime(candidate, (later, later))
    assert promote(config, repository, checkpoint=str(candidate)).tasks
    as_int8 = promote(config, repository, checkpoint=str(candidate), precision="int8")
    assert as_int8.tasks, "another program of the checkpoint is judged"


def torch_leftovers() -> dict[str, int]:
    """What torch holds for the process's life of the programs exported and loaded (release/leftovers.py)."""
    gc.collect()
    shape_envs = [o for o in gc.get_objects() if type(o) is ShapeEnv]  # isinstance: deprecation warnings
    return {
        "fake tensor cache entries": sum(len(env.fake_tensor_cache) for env in shape_envs),
        "shape env lru entries": sum(
            member.cache_info().currsize
            for member in vars(ShapeEnv).values()
            if hasattr(member, "cache_info")
        ),
        "generated sources": len(graph_module._loader.eval_cache),
    }


def test_promotions_in_one_process_leave_nothing_behind(small_data, run, tmp_path):
    """A follow run promotes in its training process for weeks: each promotion grew it by ~1 MiB that torch
    kept, for the process's life, of the programs it exported and loaded (release/leftovers.py); and the
    programs it scored, cyclic garbage, waited for the process's next full collection."""
    _, checkpoints = run
    setting = promote_setting(tmp_path / "repo", every_steps=EARLY)
    promoter = Promoter(small_config(small_data, tmp_path / "run", *RUN, setting))
    promoter(checkpoints / f"step_{EARLY}.pt", EARLY)
    before, programs = torch_leftovers(), graph_modules()
    gc.disable()
    try:
        for step in (STEPS, EARLY):  # each one exported, loaded and scored against the version
            promoter(checkpoints / f"step_{step}.pt", step)
        assert graph_modules() == programs  # freed, not waiting as garbage
    finally:
        gc.enable()
    assert torch_leftovers() == before
    assert before["shape env lru entries"] == 0
    assert len(ModelRepository(tmp_path / "repo", "ranker").decisions()) == 3  # each one promoted


def graph_modules() -> int:
    """torch programs tracked by the collector, garbage not yet freed included."""
    return sum(issubclass(type(o), graph_module.GraphModule) for o in gc.get_objects())


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_a_candidate_is_judged_as_the_program_it_publishes(run, tmp_path, precision):
    """fp32 too (it was judged as the checkpoint's eager model, which differs from its program by float
    rounding: enough, on a task with a positive or two, for an interval wholly below 0)."""
    config, checkpoints = run
    repository = ModelRepository(tmp_path / "repo", "ranker")
    promote(config, repository, checkpoint=str(checkpoints / f"step_{EARLY}.pt"))
    trained = checkpoints / f"step_{STEPS}.pt"
    decision = promote(config, repository, checkpoint=str(trained), precision=precision)
    assert decision.published and decision.version == 2, decision.reason
    lowered = {"precision": "int8", "table_precision": "fp32"} if precision == "int8" else {}
    assert decision.candidate == {"checkpoint": str(trained), "step": STEPS, **lowered}
    published = repository.version_folder(2)
    assert json.loads((published / MANIFEST).read_text())["precision"] == precision
    # The candidate's RCE is the published program's, which rounding moves off the checkpoint's own.
    split, data = validation_split(config, None, "")
    tasks = evaluation_tasks(config, data)
    model, _, _ = loaded_model(config, data, tasks, str(trained), None)
    program = ServedProgram(Scorer(published))
    as_served, as_trained = score(config, [(program, published, STEPS), (model, trained, STEPS)], data)
    for j, task in enumerate(tasks):
        judged = decision.tasks[task]["candidate"]
        served = rce(as_served.labels[:, j], as_served.probs[:, j], as_served.weights[:, j])
        assert judged == pytest.approx(served, rel=1e-12, nan_ok=True)
    moved = [rce(s.labels[:, 0], s.probs[:, 0], s.weights[:, 0]) for s in (as_served, as_trained)]
    assert moved[0] != moved[1]


def test_a_precision_without_its_format_is_refused_before_any_work(run, tmp_path):
    config, _ = run
    repository = ModelRepository(tmp_path / "repo", "ranker")
    with pytest.raises(UserError, match="bf16 with format onnx: onnxruntime's CPU provider has no bf16"):
        promote(config, repository, precision="bf16")
    assert repository.decisions() == []


def test_a_tolerance_beyond_the_loss_lets_the_worse_model_through(run, noisy, tmp_path):
    config, checkpoints = run
    repository = ModelRepository(tmp_path / "repo", "ranker")
    promote(config, repository, checkpoint=str(checkpoints / f"step_{STEPS}.pt"), format="pt2")
    refused = promote(config, repository, checkpoint=str(noisy), format="pt2")
    lowest = min(f["high"] for f in refused.tasks.values())
    allowed = promote(
        config, repository, checkpoint=str(noisy), format="pt2", rule=PromotionRule(tolerance=-lowest + 1)
    )
    assert allowed.published and allowed.version == 2


def test_the_rule_names_what_it_does_not_know(run, tmp_path):
    config, _ = run
    repository = ModelRepository(tmp_path / "repo", "ranker")
    with pytest.raises(UserError, match="no task 'nope'"):
        promote(config, repository, rule=PromotionRule(tasks=("nope",)))
    with pytest.raises(UserError, match="no validation split 'nope'"):
        promote(config, repository, split="nope")


def test_the_command_exits_1_when_it_refuses(small_data, run, noisy, tmp_path, capsys):
    config, checkpoints = run
    sets = [f"train_data.inputs={small_data}/train/*.gz", f"training.save_dir={checkpoints.parent}", *FAST]
    sets += [f"validation_data.{s}.inputs={small_data}/{s}/*.gz" for s in SMALL_SPLITS]
    sets = [arg for value in sets for arg in ("--set", value)]
    common = ["promote", "--config", str(CONFIGS / "local_small.yaml"), *sets, "--repository", str(tmp_path)]
    assert main([*common, "--format", "pt2"]) == 0
    assert capsys.readouterr().out == "published as version 1: the repository has no version yet\n"
    assert main([*common, "--checkpoint", str(noisy), "--metric", "auroc"]) == EXIT_REFUSED
    assert capsys.readouterr().out.startswith("refused: auroc worse than version 1 beyond the interval on ")
    assert main([*common, "--checkpoint", str(noisy), "--weighted"]) == EXIT_REFUSED
    assert capsys.readouterr().out == (
        "refused: the engagement-weighted sum of rce differences is worse than version 1's beyond the "
        "interval\n"
    )
    weighted = ModelRepository(tmp_path, "heavyranker").decisions()[-1]["weighted"]
    assert weighted["worse"] and weighted["high"] < 0 and set(weighted["weights"]) == set(config.task_names)
