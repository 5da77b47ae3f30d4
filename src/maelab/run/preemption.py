"""Surviving preemption and time limits on SLURM: save ``last.ckpt`` at a step boundary, then let
submitit requeue the job.

One component owns the requeue: submitit. It launched the job (``hydra/launcher=slurm``), so it
knows how to run the same Hydra job again (same config, same sweep directory and job number),
and it counts timeouts against ``max_num_timeout`` while preemptions requeue without limit.
Lightning's own SLURM auto-requeue stays off (``run/build.py`` passes
``SLURMEnvironment(auto_requeue=False)``): it would be a second owner, and it saves from inside
the signal handler, in the middle of a step, which cannot resume exactly.

What maelab adds in between: when submitit's warning signal (USR2, ``signal_delay_s`` before the
limit) arrives, this callback only notes it. At the end of the next optimizer step the ranks agree
to stop and all of them take part in writing ``last.ckpt`` (atomically); at an epoch's last step
they wait until its validation has run. Once that batch's metrics are logged, submitit's own
handler runs: on rank 0 it requeues the job and exits, on the other ranks it does nothing and the
rank exits. A signal in the last epoch requeues the job after training, so that the final
evaluation runs in the next job instead of being cut off.

Outside submitit a SIGTERM (``timeout``, ``kill``, a pipeline passing one on) is handled the same
way up to the save; the run then stops with exit status 143 instead of requeueing, and
``ckpt_path=last`` resumes it exactly.

The requeued job (the same submitit job id, recorded in ``checkpoints/submitit_job``) resumes
from ``last.ckpt``, even when its command names another ``ckpt_path``: that was where the first
attempt started. Another job that finds a ``last.ckpt`` it did not write is refused, as outside
submitit (``run/fit.resolve_ckpt_path``). It continues at the same step, sample order and random
states.
"""

import logging
import signal
from pathlib import Path

import lightning as L

from maelab.callbacks.last_checkpoint import LastCheckpoint
from maelab.run.slurm import OWNER_FILE, hand_over_to_submitit, submitit_job_id, submitit_signal, under_submitit

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    def __init__(self, dirpath: str, check_every_n_steps: int = 10):
        self.path = Path(dirpath) / "last.ckpt"
        # with several ranks the check is a collective and a host sync: every n steps, not every one
        self.check_every_n_steps = check_every_n_steps
        self.received: tuple[int, object] | None = None
        self.active = False  # listening for the signals, from the start of training to its end
        self.submitit = False
        self.handover = None  # submitit's handler
        self.previous_sigterm = None
        self.saved = False
        self.handed_over = False  # submitit's handler ran: the job ends to be requeued, not failed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's signal connector, which puts back at teardown the handlers it found
        self.active = True
        self.submitit = under_submitit()  # the same on every rank: all of them join the step check
        self.previous_sigterm = signal.getsignal(signal.SIGTERM)
        # SLURM sends SIGTERM first on a preemption, `timeout` and `kill` send it alone; Lightning's
        # own handler would stop the run without saving (or requeueing)
        signal.signal(signal.SIGTERM, self._note)
        if not self.submitit:
            return
        job = submitit_job_id()
        if trainer.is_global_zero and job is not None:  # lets a requeue of this job, and only it, resume
            self.path.parent.mkdir(parents=True, exist_ok=True)
            (self.path.parent / OWNER_FILE).write_text(job + "\n")
        signum = submitit_signal()
        self.handover = signal.getsignal(signum)
        signal.signal(signum, self._note)
        log.info("%s from submitit: last.ckpt is saved at the next step, then submitit requeues", signum.name)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self._restore_handlers()
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            # in the last epoch or after it: the final evaluation may not fit before the kill, so the
            # job is requeued now and the requeued one resumes at the end of training to evaluate
            if not self.saved:  # arrived after this epoch's save point: the final state is not on disk yet
                self._write(trainer)
            self._hand_over()

    def _restore_handlers(self) -> None:
        self.active = False
        signal.signal(signal.SIGTERM, self.previous_sigterm)
        if self.submitit:
            signal.signal(submitit_signal(), self.handover)

    def _note(self, signum: int, frame) -> None:
        if self.received is None:
            log.warning("received %s: saving at the next optimizer step", signal.Signals(signum).name)
        self.received = (signum, frame)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Lightning resumes exactly from checkpoints written here, at the end of a batch
        if not self.active or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # outside training, or mid-accumulation (gradients are not in checkpoints)
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last step: its validation and epoch-end hooks run first (on_train_epoch_end)
        if trainer.world_size == 1 or trainer.global_step % self.check_every_n_steps == 0:
            self._save_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and not self.saved:
            self._save_if_signalled(trainer)

    def _save_if_signalled(self, trainer: L.Trainer) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        written = any(  # LastCheckpoint wrote this very state moments ago: a second write only costs time
            isinstance(c, LastCheckpoint) and c.path == self.path and c.saved_step == trainer.global_step
            for c in trainer.callbacks
        )
        if not written:
            trainer.save_checkpoint(self.path, weights_only=False)  # every rank takes part
        then = "submitit requeues the job" if self.submitit else "stopping; resume with ckpt_path=last"
        log.warning("saved %s at step %d; %s", self.path, trainer.global_step, then)
        self.saved = True

    # The hand-over waits for whichever comes next, so that this batch's metrics are logged first.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.saved:
            self._restore_handlers()
            self._hand_over()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_batch_start(trainer, pl_module, None, 0)

    def _hand_over(self) -> None:
        signum, frame = self.received or (submitit_signal() if self.submitit else signal.SIGTERM, None)
        if not self.submitit:  # a plain SIGTERM: the run stops, as the sender asked, with its state saved
            raise SystemExit(128 + signum)
        self.handed_over = True
        hand_over_to_submitit(self.handover, frame)
