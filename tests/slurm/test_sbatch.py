"""slurm/train.sbatch and slurm/prep.sbatch submitted as they are to a real one-node Slurm
(slurm/cluster.sh), two CPU tasks standing in for two GPUs: a job requeued mid-run from outside
(`scontrol requeue`: SIGTERM, resume from the last periodic checkpoint) and one preempted by its
SIGUSR1 (save at the next step, requeue itself) both come back, resume and end with the weights of an
uninterrupted run and one continuous TensorBoard curve; two prep tasks build the cache one process
builds. CI installs Slurm (.ci/run); without slurmctld these tests are skipped, saying so."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from specdec.data_prep import HiddenStateCache
from specdec.trainer import cli

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# the #SBATCH lines ask for 8 GPUs and 12 CPUs per task; here: 2 CPU tasks on the one node
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00"]
STEPS = 40
TRAIN = [
    "recipe=tiny",
    "trainer.accelerator=cpu",
    "trainer.strategy=ddp",
    f"trainer.max_steps={STEPS}",
    "run.checkpoint_every_n_steps=2",
    "eval.every_n_steps=1000",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("slurmctld") is None or os.geteuid() != 0,
        reason="needs Debian's slurm-wlm and root (.ci/run installs it where the machine allows)",
    ),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(ROOT / "slurm/cluster.sh"), "start", str(state)], check=True, timeout=120)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    yield env
    subprocess.run(["bash", str(ROOT / "slurm/cluster.sh"), "stop", str(state)], check=False, timeout=120)


def _sbatch(env: dict, script: str, out: Path, args: list[str], *, wait: bool = False) -> str:
    command = ["sbatch", "--parsable", *CPU_JOB, f"--output={out}", *(["--wait"] if wait else []), script, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert result.returncode == 0, f"{result.stderr}\n{out.read_text() if out.exists() else ''}"
    return result.stdout.strip().split(";")[0]


def _job(env: dict, job: str) -> dict[str, str]:
    """scontrol's fields of the job ({} once Slurm forgot it)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout)) if result.returncode == 0 else {}


def _until(what: str, check, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _while_running(env: dict, job: str, out: Path, what: str, check) -> None:
    """Wait for `check` while the job runs; a job that ended first fails the test with its log."""

    def done_or_failed():
        if check():
            return True
        if _job(env, job).get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"):
            raise AssertionError(f"the job ended before {what}:\n{out.read_text()[-3000:]}")
        return False

    _until(what, done_or_failed)


def _checkpoint_step(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True, mmap=True)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    optimizer = checkpoint["optimizer_states"][0]["state"]
    return {**checkpoint["state_dict"], **{f"adam.{i}.{k}": v for i, s in optimizer.items() for k, v in s.items()}}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same two-rank run, never stopped, started by Lightning's own launcher."""
    run_dir = tmp_path_factory.mktemp("whole")
    command = [str(BIN / "specdec-train"), *TRAIN, f"run.dir={run_dir}", "trainer.devices=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(whole_run: Path) -> dict[str, torch.Tensor]:
    return _final_weights(whole_run)


def _check_resumed(run_dir: Path, log: str, job: str, expected: dict[str, torch.Tensor]) -> None:
    first, _, second = log.partition("(restart 1)")
    assert second, log[-3000:]  # the job came back once
    assert "trained " not in first  # the first start was stopped mid-run
    assert "resuming from" in second and f"trained {STEPS} steps" in second and "tau" in second
    found = _final_weights(run_dir)
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=0, atol=1e-6, msg=key)
    events = EventAccumulator(str(run_dir / "logs" / job))  # run.log_version=$SLURM_JOB_ID
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(STEPS)), steps  # one curve: no step missing, none twice


def _interrupted_job(env: dict, tmp_path: Path, after_step: int, interrupt: list[str]) -> tuple[Path, str, str]:
    """(run dir, job id, log) of train.sbatch interrupted by `interrupt JOB` once step `after_step` is
    checkpointed, then left to come back and finish."""
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    job = _sbatch(env, str(ROOT / "slurm/train.sbatch"), out, [*TRAIN, f"run.dir={run_dir}"])
    _while_running(
        env, job, out, f"the checkpoint of step {after_step}", lambda: _checkpoint_step(run_dir) >= after_step
    )
    subprocess.run([*interrupt, job], env=env, check=True)
    _until("the job to finish", lambda: _job(env, job).get("JobState") in ("COMPLETED", "FAILED"), 600)
    assert _job(env, job)["JobState"] == "COMPLETED", out.read_text()[-3000:]
    return run_dir, job, out.read_text()


def test_a_job_requeued_from_outside_resumes_from_its_checkpoint(cluster, uninterrupted, tmp_path: Path) -> None:
    # SIGTERM now, then back in the queue; Slurm holds it for cred_expire (10 s, slurm/cluster.sh)
    run_dir, job, log = _interrupted_job(cluster, tmp_path, 4, ["scontrol", "requeue"])
    _check_resumed(run_dir, log, job, uninterrupted)


def test_a_job_signalled_before_its_time_limit_saves_requeues_itself_and_resumes(
    cluster, uninterrupted, tmp_path: Path
) -> None:
    # what --signal=SIGUSR1@120 sends to every task 120 s before the time limit
    run_dir, job, log = _interrupted_job(cluster, tmp_path, 2, ["scancel", "--signal=USR1"])
    saved = re.search(r"signal 10: saved \S+ at step (\d+)", log)
    assert saved and 2 <= int(saved.group(1)) < STEPS, log[-3000:]
    assert f"requeueing Slurm job {job}" in log
    _check_resumed(run_dir, log, job, uninterrupted)


def test_two_prep_tasks_build_the_cache_one_process_builds(cluster, tmp_path: Path) -> None:
    prep = ["recipe=tiny", "cache.shard_tokens=256"]  # several shards, so both tasks write some
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.prep_main([*prep, f"run.dir={one}"]) == 0
    out = tmp_path / "prep.out"
    job = _sbatch(cluster, str(ROOT / "slurm/prep.sbatch"), out, [*prep, f"run.dir={two}"], wait=True)
    log = out.read_text()
    assert "[rank 0/2]" in log and "[rank 1/2]" in log, log[-3000:]
    assert _job(cluster, job).get("JobState") == "COMPLETED"
    expected, found = HiddenStateCache(one / "cache"), HiddenStateCache(two / "cache")
    assert len(found) == len(expected) >= 8 and len(list((two / "cache").glob("shard-*.json"))) > 2
    for index in range(len(expected)):
        for key, value in expected[index].items():
            assert torch.equal(found[index][key], value), (index, key)


def test_two_eval_tasks_write_the_report_one_process_writes(cluster, whole_run: Path, tmp_path: Path) -> None:
    measure = ["recipe=tiny", f"run.dir={tmp_path}", f"eval.drafter={whole_run / 'drafter'}", "eval.num_prompts=5"]
    assert cli.eval_main([*measure, f"eval.out={tmp_path / 'one.json'}"]) == 0
    command = ["srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "specdec-eval"]
    result = subprocess.run(
        [*command, *measure, f"eval.out={tmp_path / 'two.json'}"],
        env=cluster,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("report ") == 1  # rank 0 prints and writes; rank 1 decoded its share
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert one.keys() == two.keys() == {"trained", "untrained", "ngram"}
    for name in one:
        for key in ("tau", "accept_rate_per_pos", "num_prompts", "new_tokens", "verify_steps", "greedy_matches_target"):
            assert two[name][key] == one[name][key], (name, key)
