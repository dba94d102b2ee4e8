"""Ctrl-C or SIGTERM (a scheduler's preemption, ``docker stop``, ``timeout``) during training loses no
steps: the loop finishes the optimizer step it is in, saves a checkpoint and exits with 128 + the signal's
number; the same command with ``--resume_from_checkpoint latest`` then continues exactly. A second signal
quits at once without saving."""

import logging
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# a launcher that forwards the signal the terminal already sent its whole process group (torch's elastic
# agent does) delivers it twice within milliseconds: that is one request, not a second one
SAME_REQUEST_S = 1.0


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal after saving ``checkpoint``; exits the program with 128 + ``signum``."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopRequests:
    """While entered, SIGINT and SIGTERM request a stop instead of killing the process; the training loop
    polls ``agreed`` at each optimizer step. Outside, the signals act as they did before."""

    def __init__(self):
        self.signum, self._at, self._previous, self._pid = None, 0.0, {}, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread
            self._pid = os.getpid()
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a DataLoader worker forked while this was in place, not yet ignoring
            return
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
            logger.warning('%s: stopping after this step and saving a checkpoint; send it again to quit '
                           'without saving.', signal.Signals(signum).name)
        elif time.monotonic() - self._at > SAME_REQUEST_S:
            self.__exit__()
            signal.raise_signal(signum)  # to the handler from before: KeyboardInterrupt, or the default exit

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop; every process gets the same answer at the same step, as
        the checkpoint must be saved by all of them. Across processes this is one small all-reduce."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        if self.signum is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()


def restore_stop_signals() -> None:
    """The shell launchers start accelerate with SIGINT and SIGTERM ignored, so that it waits while this
    process saves (it would otherwise return to the prompt after 0.25 s, or die and leave this process
    running alone): this process, inheriting that, takes both back."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, default)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the loader's workers too; they must keep
    serving batches until the step ends, and are shut down with the loader."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
