"""Slurm preemption: `#SBATCH --signal=SIGUSR1@T --requeue` asks a job to checkpoint T seconds before
its time runs out; the job saves, requeues itself and exits, and its next start resumes.

Lightning's own handler (SLURMEnvironment's auto_requeue) saves inside the signal handler, wherever
each rank happens to be: one rank can enter the checkpoint's barrier while another is inside the
step's all-reduce, and then both wait. Here the handler only raises a flag; at the end of the next
optimizer step every rank learns whether any rank got the signal (one all-reduce), they save
`last.ckpt` together at that step boundary and training stops; once every rank has left the process
group, rank 0 runs `scontrol requeue` (which ends the job's tasks at once, so it comes last). The
checkpoint is exactly the step the run had reached, so the requeued job continues with nothing lost
and nothing trained twice.
"""

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class JobRequeued(Exception):
    """Training stopped for a Slurm requeue; the job's next start resumes from the checkpoint."""


class RequeueOnSignal(L.Callback):
    def __init__(self, checkpoint: Path, signum: int = signal.SIGUSR1) -> None:
        self.checkpoint, self.signum = checkpoint, signum
        self.signalled = False  # this rank got the signal
        self.saved_at: int | None = None  # the global step saved for the requeue
        self._step_seen = -1

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Left in place after training: SIGUSR1's default action ends the process, and a signal during
        # the final report should not (the steps are done; the report finishes or the time limit ends it).
        signal.signal(self.signum, self._handle)
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_seen:
            return  # inside an accumulation: no optimizer step ended here
        self._step_seen = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        self.saved_at = trainer.global_step
        log.info("signal %d: saved %s at step %d", self.signum, self.checkpoint, trainer.global_step)
        trainer.should_stop = True

    def requeue_job(self) -> None:
        """`scontrol requeue` this job (rank 0, after every rank has stopped)."""
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
        log.info("requeueing Slurm job %s; its next start resumes from %s", job, self.checkpoint)
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            log.warning(
                "scontrol requeue %s failed (%s); resubmit the job to continue from %s",
                job,
                result.stderr.strip(),
                self.checkpoint,
            )
